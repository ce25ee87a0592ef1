"""Node GPU probe on NVML: read every GPU, judge it with :mod:`gpuforge.health`, and optionally serve the
readings on ``/metrics`` under dcgm-exporter's metric names and labels.

Layers, so that everything but the NVML calls runs on a CPU in tests:

* a *reader* does the NVML calls and returns plain records (:class:`NvmlReader`); :class:`RecordedReader`
  replays records saved by :func:`record_snapshot` (``tests/fixtures/nvml/*.json``);
* :class:`Probe` turns records into :class:`~gpuforge.health.GpuReading` objects (units, missing and lost
  GPUs, XID window, windowed increases) and into exposition samples;
* :func:`probe_table`, :func:`serve`, :func:`slurm_healthcheck` are what the CLI calls; ``python -m
  gpuforge_probe`` (:func:`main`) is a small stand-alone entry (no Prefect, no CLI module) used by
  bench/device_check.sh.

``pynvml`` (package nvidia-ml-py) is imported inside :class:`NvmlReader` only, ``prometheus_client`` inside
the functions that serve or parse, so importing this module needs neither.

Record format (one per GPU)::

    {"index": 0, "uuid": "GPU-…", "name": "NVIDIA H200", "pci_bus_id": "00000000:…", "minor_number": 0,
     "values": {"temperature_gpu": 31, "power_usage_mw": 74000, …},   # raw NVML units
     "unsupported": ["nvlink_crc_flit_total", …],                      # NVML_ERROR_NOT_SUPPORTED
     "errors": {"field": "NVML message"}, "lost": false}               # other errors; GPU_IS_LOST
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gpuforge.health import (
    DCGM_METRICS,
    NVLINK_ERROR_METRICS,
    XID_COUNT_METRIC,
    XID_NAMES,
    GpuReading,
    GpuVerdict,
    Thresholds,
    Verdict,
    fleet_window,
    format_table,
    judge,
    readings_from_query_results,
    resolve_thresholds,
    thresholds_for,
    verdicts_json,
)

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class ProbeError(RuntimeError):
    """The probe cannot read GPUs at all (no driver, NVML missing). ``str()`` is a one-line message."""


# --------------------------------------------------------------------------------------------------
# Raw NVML field -> (canonical value key, scale). Canonical keys are gpuforge.health.VALUE_KEYS.
# FB used comes from nvmlDeviceGetMemoryInfo (v1), which counts driver-reserved memory as used (615 MiB on
# the recorded H200, where nvidia-smi shows "Used 0 MiB, Reserved 616 MiB"); dcgm-exporter reports that
# part separately as DCGM_FI_DEV_FB_RESERVED. No health rule reads FB values.
# --------------------------------------------------------------------------------------------------

RAW_FIELDS: dict[str, tuple[str, float]] = {
    "temperature_gpu": ("gpu_temp", 1.0),
    "memory_temp": ("memory_temp", 1.0),
    "power_usage_mw": ("power_usage", 1e-3),
    "enforced_power_limit_mw": ("power_limit", 1e-3),
    "utilization_gpu": ("gpu_util", 1.0),
    "memory_used_bytes": ("fb_used", 1.0 / MIB),
    "memory_free_bytes": ("fb_free", 1.0 / MIB),
    "ecc_volatile_corrected": ("ecc_sbe_vol", 1.0),
    "ecc_volatile_uncorrected": ("ecc_dbe_vol", 1.0),
    "remapped_rows_correctable": ("remap_correctable", 1.0),
    "remapped_rows_uncorrectable": ("remap_uncorrectable", 1.0),
    "remapped_rows_pending": ("remap_pending", 1.0),
    "remapped_rows_failure": ("remap_failure", 1.0),
    "clocks_event_reasons": ("clock_event_reasons", 1.0),
    "pcie_link_gen": ("pcie_link_gen", 1.0),
    "pcie_link_gen_max": ("pcie_link_gen_max", 1.0),
    "pcie_link_width": ("pcie_link_width", 1.0),
    "pcie_link_width_max": ("pcie_link_width_max", 1.0),
}

#: Raw NVLink error totals (NVML field values) -> dcgm-exporter metric names; summed into nvlink_errors.
RAW_NVLINK: dict[str, str] = dict(
    zip(
        ("nvlink_crc_flit_total", "nvlink_crc_data_total", "nvlink_replay_total", "nvlink_recovery_total"),
        NVLINK_ERROR_METRICS,
        strict=True,
    )
)

#: Recorded but not exported or judged: NVML's own temperature thresholds (documentation of defaults).
RAW_INFO_FIELDS = (
    "temp_threshold_shutdown",
    "temp_threshold_slowdown",
    "temp_threshold_gpu_max",
    "temp_threshold_mem_max",
    "pcie_replay_counter",
)

#: Metric families the probe exports, with HELP text. Names are dcgm-exporter's (see health.DCGM_METRICS).
EXPORTED_HELP: dict[str, str] = {
    "DCGM_FI_DEV_GPU_TEMP": "GPU temperature (in C).",
    "DCGM_FI_DEV_MEMORY_TEMP": "Memory temperature (in C).",
    "DCGM_FI_DEV_POWER_USAGE": "Power draw (in W).",
    "DCGM_FI_DEV_ENFORCED_POWER_LIMIT": "Enforced power limit (in W).",
    "DCGM_FI_DEV_GPU_UTIL": "GPU utilization (in %).",
    "DCGM_FI_DEV_FB_USED": "Framebuffer memory used (in MiB).",
    "DCGM_FI_DEV_FB_FREE": "Framebuffer memory free (in MiB).",
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": "Total number of single-bit volatile ECC errors.",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": "Total number of double-bit volatile ECC errors.",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": "Number of remapped rows for correctable errors.",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": "Number of remapped rows for uncorrectable errors.",
    "DCGM_FI_DEV_ROW_REMAP_PENDING": "Whether a row remap is pending (1) until the GPU is reset.",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": "Whether remapping of rows has failed.",
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": "Current clock event (throttle) reasons, NVML bitmask.",
    "DCGM_FI_DEV_PCIE_LINK_GEN": "Current PCIe link generation.",
    "DCGM_FI_DEV_PCIE_LINK_WIDTH": "Current PCIe link width.",
    "DCGM_FI_DEV_PCIE_MAX_LINK_GEN": "Maximum PCIe link generation.",
    "DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH": "Maximum PCIe link width.",
    **{m: "NVLink error counter total for all lanes." for m in NVLINK_ERROR_METRICS},
    "DCGM_FI_DEV_XID_ERRORS": "Value of the last XID error encountered.",
    XID_COUNT_METRIC: "Count of XID errors within the window (label xid).",
    "gpuforge_gpu_verdict": "gpuforge health verdict of the GPU (1 for the current verdict label).",
    "gpuforge_probe_up": "1 when the probe could read NVML at the last scrape.",
}

_EXPORTED_VALUE_KEYS = {k: m for k, m in DCGM_METRICS.items() if k != "xid_last"}


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------


class Reader(Protocol):
    """Where GPU records come from. :class:`NvmlReader` (real) and :class:`RecordedReader` (fixtures)."""

    def open(self) -> None: ...
    def close(self) -> None: ...
    def driver_version(self) -> str: ...
    def snapshot(self) -> list[dict[str, Any]]: ...
    def watch_xids(self, callback: Callable[[str, int], None], stop: threading.Event) -> None: ...


class NvmlReader:
    """The only code that talks to NVML. Every field is read on its own so that one unsupported field
    (NVML_ERROR_NOT_SUPPORTED, e.g. NVLink on a single-GPU machine) only drops that field."""

    def __init__(self) -> None:
        self._nv: Any = None

    def open(self) -> None:
        try:
            import pynvml
        except ImportError as e:  # pragma: no cover - dependency of the project
            raise ProbeError(f"nvidia-ml-py (pynvml) is not installed: {e}") from e
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise ProbeError(_no_driver_message(e)) from e
        self._nv = pynvml

    def close(self) -> None:
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except self._nv.NVMLError:
                pass
            self._nv = None

    def _text(self, value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def driver_version(self) -> str:
        return self._text(self._nv.nvmlSystemGetDriverVersion())

    def nvml_version(self) -> str:
        try:
            return self._text(self._nv.nvmlSystemGetNVMLVersion())
        except self._nv.NVMLError:
            return ""

    def snapshot(self) -> list[dict[str, Any]]:
        nv = self._nv
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as e:
            raise ProbeError(f"NVML cannot count GPUs: {e}") from e
        records = []
        for index in range(count):
            record = self._read_device(index)
            if record is not None:
                records.append(record)
        return records

    def _read_device(self, index: int) -> dict[str, Any] | None:
        nv = self._nv
        rec: dict[str, Any] = {"index": index, "values": {}, "unsupported": [], "errors": {}, "lost": False}
        try:
            h = nv.nvmlDeviceGetHandleByIndex(index)
        except nv.NVMLError as e:
            if _code(nv, e) == nv.NVML_ERROR_GPU_IS_LOST:
                rec["lost"] = True
                return rec
            log.warning("GPU %d: cannot get a handle (%s); treating it as absent", index, e)
            return None
        ident = {
            "uuid": lambda: self._text(nv.nvmlDeviceGetUUID(h)),
            "name": lambda: self._text(nv.nvmlDeviceGetName(h)),
            "pci_bus_id": lambda: self._text(nv.nvmlDeviceGetPciInfo(h).busId),
            "minor_number": lambda: nv.nvmlDeviceGetMinorNumber(h),
        }
        for key, fn in ident.items():
            try:
                rec[key] = fn()
            except nv.NVMLError as e:
                if _code(nv, e) == nv.NVML_ERROR_GPU_IS_LOST:
                    rec["lost"] = True
                    return rec
                rec["errors"][key] = str(e)
        for key, fn in self._field_readers(h).items():
            try:
                value = fn()
            except nv.NVMLError as e:
                code = _code(nv, e)
                if code == nv.NVML_ERROR_GPU_IS_LOST:
                    rec["lost"] = True
                    return rec
                if code in (nv.NVML_ERROR_NOT_SUPPORTED, getattr(nv, "NVML_ERROR_FUNCTION_NOT_FOUND", -1)):
                    rec["unsupported"].append(key)
                else:
                    rec["errors"][key] = str(e)
                continue
            if isinstance(value, dict):  # several fields from one call
                rec["values"].update(value)
            else:
                rec["values"][key] = value
        self._read_field_values(h, rec)
        return rec

    def _field_readers(self, h: Any) -> dict[str, Callable[[], Any]]:
        nv = self._nv

        def remapped() -> dict[str, int]:
            corr, unc, pending, failure = nv.nvmlDeviceGetRemappedRows(h)
            return {
                "remapped_rows_correctable": corr,
                "remapped_rows_uncorrectable": unc,
                "remapped_rows_pending": int(bool(pending)),
                "remapped_rows_failure": int(bool(failure)),
            }

        def memory() -> dict[str, int]:
            info = nv.nvmlDeviceGetMemoryInfo(h)
            return {"memory_used_bytes": int(info.used), "memory_free_bytes": int(info.free)}

        def clock_events() -> int:
            fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
            try:
                if fn is not None:
                    return int(fn(h))
            except nv.NVMLError as e:
                if _code(nv, e) != getattr(nv, "NVML_ERROR_FUNCTION_NOT_FOUND", -1):
                    raise
            return int(nv.nvmlDeviceGetCurrentClocksThrottleReasons(h))

        def threshold(kind: int) -> Callable[[], int]:
            return lambda: int(nv.nvmlDeviceGetTemperatureThreshold(h, kind))

        corrected, uncorrected = nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        return {
            "temperature_gpu": lambda: int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "power_usage_mw": lambda: int(nv.nvmlDeviceGetPowerUsage(h)),
            "enforced_power_limit_mw": lambda: int(nv.nvmlDeviceGetEnforcedPowerLimit(h)),
            "utilization_gpu": lambda: int(nv.nvmlDeviceGetUtilizationRates(h).gpu),
            "memory": memory,
            "ecc_volatile_corrected": lambda: int(nv.nvmlDeviceGetTotalEccErrors(h, corrected, nv.NVML_VOLATILE_ECC)),
            "ecc_volatile_uncorrected": lambda: int(
                nv.nvmlDeviceGetTotalEccErrors(h, uncorrected, nv.NVML_VOLATILE_ECC)
            ),
            "remapped_rows": remapped,
            "clocks_event_reasons": clock_events,
            "pcie_link_gen": lambda: int(nv.nvmlDeviceGetCurrPcieLinkGeneration(h)),
            "pcie_link_gen_max": lambda: int(nv.nvmlDeviceGetMaxPcieLinkGeneration(h)),
            "pcie_link_width": lambda: int(nv.nvmlDeviceGetCurrPcieLinkWidth(h)),
            "pcie_link_width_max": lambda: int(nv.nvmlDeviceGetMaxPcieLinkWidth(h)),
            "temp_threshold_shutdown": threshold(nv.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN),
            "temp_threshold_slowdown": threshold(nv.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
            "temp_threshold_gpu_max": threshold(nv.NVML_TEMPERATURE_THRESHOLD_GPU_MAX),
            "temp_threshold_mem_max": threshold(nv.NVML_TEMPERATURE_THRESHOLD_MEM_MAX),
        }

    def _read_field_values(self, h: Any, rec: dict[str, Any]) -> None:
        """Memory temperature, NVLink error totals and PCIe replays through nvmlDeviceGetFieldValues;
        each field has its own return code."""
        nv = self._nv
        wanted = {
            "memory_temp": nv.NVML_FI_DEV_MEMORY_TEMP,
            "nvlink_crc_flit_total": nv.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL,
            "nvlink_crc_data_total": nv.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL,
            "nvlink_replay_total": nv.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL,
            "nvlink_recovery_total": nv.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL,
            "pcie_replay_counter": nv.NVML_FI_DEV_PCIE_REPLAY_COUNTER,
        }
        try:
            results = nv.nvmlDeviceGetFieldValues(h, list(wanted.values()))
        except nv.NVMLError as e:
            if _code(nv, e) == nv.NVML_ERROR_GPU_IS_LOST:
                rec["lost"] = True
            else:
                rec["unsupported"].extend(wanted)
            return
        for key, fv in zip(wanted, results, strict=True):
            ret = int(fv.nvmlReturn)
            if ret == nv.NVML_SUCCESS:
                rec["values"][key] = _field_value(nv, fv)
            elif ret == nv.NVML_ERROR_NOT_SUPPORTED:
                rec["unsupported"].append(key)
            else:
                rec["errors"][key] = str(nv.NVMLError(ret))

    def watch_xids(self, callback: Callable[[str, int], None], stop: threading.Event) -> None:
        """Blocking loop (run it in a thread): NVML XID critical-error events -> ``callback(uuid, xid)``."""
        nv = self._nv
        try:
            events = nv.nvmlEventSetCreate()
        except nv.NVMLError as e:
            log.warning("XID events unavailable: nvmlEventSetCreate: %s", e)
            return
        registered = 0
        try:
            for index in range(nv.nvmlDeviceGetCount()):
                try:
                    h = nv.nvmlDeviceGetHandleByIndex(index)
                    nv.nvmlDeviceRegisterEvents(h, nv.nvmlEventTypeXidCriticalError, events)
                    registered += 1
                except nv.NVMLError as e:
                    log.warning("GPU %d: XID events unavailable: %s", index, e)
            if not registered:
                return
            while not stop.is_set():
                try:
                    data = nv.nvmlEventSetWait_v2(events, 500)
                except nv.NVMLError as e:
                    if _code(nv, e) == nv.NVML_ERROR_TIMEOUT:
                        continue
                    log.warning("XID event wait failed, XID watch stops: %s", e)
                    return
                try:
                    uuid = self._text(nv.nvmlDeviceGetUUID(data.device))
                except nv.NVMLError:
                    uuid = ""
                callback(uuid, int(data.eventData))
        finally:
            try:
                nv.nvmlEventSetFree(events)
            except nv.NVMLError:
                pass


def _code(nv: Any, e: Exception) -> int | None:
    return getattr(e, "value", None)


def _field_value(nv: Any, fv: Any) -> float | int:
    attr = {
        nv.NVML_VALUE_TYPE_DOUBLE: "dVal",
        nv.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
        nv.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        nv.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        nv.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        getattr(nv, "NVML_VALUE_TYPE_SIGNED_INT", 5): "siVal",
        getattr(nv, "NVML_VALUE_TYPE_UNSIGNED_SHORT", 6): "usVal",
    }.get(int(fv.valueType), "ullVal")
    return getattr(fv.value, attr)


def _no_driver_message(e: Exception) -> str:
    return (
        f"no NVIDIA driver: NVML failed to initialise ({e}); is the driver installed and "
        f"libnvidia-ml.so.1 on the library path?"
    )


class RecordedReader:
    """Replays recorded records (the JSON that :func:`record_snapshot` writes).

    ``data`` is either one recording ``{"gpus": [...], ...}`` or ``{"snapshots": [[...], [...]], ...}``;
    each :meth:`snapshot` returns the next one and the last repeats, so a GPU can disappear between calls.
    ``xid_events`` (``[{"uuid": ..., "xid": 79}]``) are delivered by :meth:`watch_xids`. ``no_driver``
    makes :meth:`open` fail like a machine without a driver."""

    def __init__(self, data: Mapping[str, Any] | str | Path, *, no_driver: bool = False) -> None:
        if isinstance(data, str | Path):
            data = json.loads(Path(data).read_text())
        self.data = dict(data)
        self.snapshots: list[list[dict[str, Any]]] = (
            [list(s) for s in self.data["snapshots"]] if "snapshots" in self.data else [list(self.data["gpus"])]
        )
        self.no_driver = no_driver
        self.calls = 0
        self.opened = False

    def open(self) -> None:
        if self.no_driver:
            raise ProbeError(_no_driver_message(RuntimeError("NVML Shared Library Not Found")))
        self.opened = True

    def close(self) -> None:
        self.opened = False

    def driver_version(self) -> str:
        return str(self.data.get("driver_version", ""))

    def snapshot(self) -> list[dict[str, Any]]:
        snap = self.snapshots[min(self.calls, len(self.snapshots) - 1)]
        self.calls += 1
        return json.loads(json.dumps(snap))

    def watch_xids(self, callback: Callable[[str, int], None], stop: threading.Event) -> None:
        for event in self.data.get("xid_events", []):
            callback(str(event["uuid"]), int(event["xid"]))
        stop.wait()


# --------------------------------------------------------------------------------------------------
# Probe logic
# --------------------------------------------------------------------------------------------------


@dataclass
class _Known:
    uuid: str
    index: int
    name: str | None = None
    pci_bus_id: str | None = None
    minor_number: int | None = None


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Probe:
    """Reads GPUs through ``reader`` and keeps what serving needs between scrapes: the GPUs seen so far
    (a GPU seen once and absent now is reported ``present=False``), XID events within the window, and
    a short history of counters for windowed increases. ``clock`` is injectable for tests."""

    reader: Reader
    node: str = field(default_factory=lambda: default_node_name())
    table: Mapping[str, Thresholds] = field(default_factory=lambda: resolve_thresholds(None))
    clock: Callable[[], float] = time.time
    window_s: float | None = None

    def __post_init__(self) -> None:
        if self.window_s is None:  # the fleet's window: the XIDs it would still count, the same verdict
            self.window_s = float(fleet_window(self.table)[0].window_s)
        self.driver = ""
        self.known: dict[str, _Known] = {}
        self.records: list[dict[str, Any]] = []
        self.snapshot_ts: float | None = None
        self.xid_events: deque[tuple[float, str, int]] = deque()
        self.last_xid: dict[str, int] = {}
        self.history: dict[str, deque[tuple[float, dict[str, float]]]] = {}
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._xid_thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def open(self) -> Probe:
        self.reader.open()
        self.driver = self.reader.driver_version()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._xid_thread is not None:
            self._xid_thread.join(timeout=5)
        self.reader.close()

    def start_xid_watch(self) -> None:
        self._xid_thread = threading.Thread(
            target=self.reader.watch_xids, args=(self.record_xid, self._stop), name="gpuforge-xid-watch", daemon=True
        )
        self._xid_thread.start()

    def record_xid(self, uuid: str, xid: int) -> None:
        with self._lock:
            self.xid_events.append((self.clock(), uuid, xid))
            self.last_xid[uuid] = xid
        log.warning("XID %d on GPU %s: %s", xid, uuid or "?", XID_NAMES.get(xid, "see NVIDIA's XID catalogue"))

    # -- reading --------------------------------------------------------------------------------------
    def refresh(self) -> list[dict[str, Any]]:
        """Take one snapshot from the reader and remember the GPUs and counters in it."""
        records = self.reader.snapshot()
        now = self.clock()
        with self._lock:
            self.records, self.snapshot_ts = records, now
            for rec in records:
                uuid = rec.get("uuid") or self._uuid_by_index(rec["index"])
                if uuid:
                    rec["uuid"] = uuid
                    known = self.known.get(uuid) or _Known(uuid=uuid, index=rec["index"])
                    known.index = rec["index"]
                    for attr in ("name", "pci_bus_id", "minor_number"):
                        if rec.get(attr) is not None:
                            setattr(known, attr, rec[attr])
                    self.known[uuid] = known
                for key in rec.get("unsupported", []):
                    if (uuid or str(rec["index"]), key) not in self._logged:
                        self._logged.add((uuid or str(rec["index"]), key))
                        log.info("GPU %s: %s not supported by NVML on this GPU; series omitted", rec["index"], key)
                if uuid and not rec.get("lost"):
                    hist = self.history.setdefault(uuid, deque())
                    hist.append((now, _counters(rec)))
            assert self.window_s is not None
            while self.xid_events and self.xid_events[0][0] < now - self.window_s:
                self.xid_events.popleft()
            for hist in self.history.values():  # keep one sample at or before the window start as base
                while len(hist) > 2 and hist[1][0] <= now - self.window_s:
                    hist.popleft()
        return records

    def _uuid_by_index(self, index: int) -> str | None:
        for k in self.known.values():
            if k.index == index:
                return k.uuid
        return None

    def readings(self, expected_gpus: int | None = None) -> list[GpuReading]:
        """Readings for the last snapshot: one per GPU in it, ``present=False`` for GPUs seen before
        but absent now and for indices below ``expected_gpus`` never seen."""
        with self._lock:
            out: list[GpuReading] = []
            seen_uuids: set[str] = set()
            seen_index: set[int] = set()
            now = self.clock()
            age = None if self.snapshot_ts is None else max(0.0, now - self.snapshot_ts)
            for rec in self.records:
                uuid = rec.get("uuid")
                seen_index.add(rec["index"])
                if uuid:
                    seen_uuids.add(uuid)
                known = self.known.get(uuid or "")
                model = rec.get("name") or (known.name if known else None)
                if rec.get("lost"):
                    out.append(
                        GpuReading(
                            node=self.node,
                            gpu=rec["index"],
                            uuid=uuid,
                            model=model,
                            values={"gpu_lost": 1.0},
                            age_s=age,
                            xids=self._xids(uuid),
                        )
                    )
                    continue
                values = canonical_values(rec)
                values["xid_last"] = float(self.last_xid.get(uuid or "", 0))
                values.update(self._increases(uuid))
                out.append(
                    GpuReading(
                        node=self.node,
                        gpu=rec["index"],
                        uuid=uuid,
                        model=model,
                        values=values,
                        age_s=age,
                        xids=self._xids(uuid),
                    )
                )
            for known in self.known.values():
                if known.uuid not in seen_uuids:
                    out.append(
                        GpuReading(
                            node=self.node,
                            gpu=known.index,
                            uuid=known.uuid,
                            model=known.name,
                            present=False,
                            xids=self._xids(known.uuid),
                        )
                    )
                    seen_index.add(known.index)
            for i in range(expected_gpus or 0):
                if i not in seen_index:
                    out.append(GpuReading(node=self.node, gpu=i, present=False))
            out.sort(key=lambda r: (r.gpu, r.uuid or ""))
            return out

    def _xids(self, uuid: str | None) -> list[int]:
        return sorted({x for _, u, x in self.xid_events if uuid and u == uuid})

    def _increases(self, uuid: str | None) -> dict[str, float]:
        """Windowed increases once two snapshots exist (a single snapshot has no window: health then
        falls back to totals). A counter lower than its oldest value was reset: its current value counts."""
        hist = self.history.get(uuid or "")
        if not hist or len(hist) < 2:
            return {}
        (_, first), (_, last) = hist[0], hist[-1]
        out = {}
        for key in ("ecc_sbe_increase", "remap_correctable_increase", "nvlink_error_increase"):
            if key in last:
                base = first.get(key, last[key])
                out[key] = last[key] - base if last[key] >= base else last[key]
        return out

    def verdicts(self, expected_gpus: int | None = None) -> list[GpuVerdict]:
        return [judge(r, thresholds_for(r.model, self.table)) for r in self.readings(expected_gpus)]

    # -- exposition -----------------------------------------------------------------------------------
    def samples(self) -> list[Sample]:
        """dcgm-exporter-named samples for the last snapshot; lost, vanished and unsupported ones omitted."""
        verdicts = {(v.gpu, v.uuid): v.verdict for v in self.verdicts()}
        out: list[Sample] = []
        with self._lock:
            records = list(self.records)
            counts: dict[tuple[str, int], int] = {}
            for _, uuid, xid in self.xid_events:
                counts[(uuid, xid)] = counts.get((uuid, xid), 0) + 1
        for rec in records:
            if rec.get("lost"):
                continue
            labels = self.labels(rec)
            values = canonical_values(rec)
            for key, metric in _EXPORTED_VALUE_KEYS.items():
                if values.get(key) is not None:
                    out.append(Sample(metric, labels, float(values[key])))
            raw = rec.get("values", {})
            for raw_key, metric in RAW_NVLINK.items():
                if raw.get(raw_key) is not None:
                    out.append(Sample(metric, labels, float(raw[raw_key])))
            last = self.last_xid.get(rec.get("uuid") or "", 0)
            out.append(
                Sample(
                    DCGM_METRICS["xid_last"],
                    {**labels, "err_code": str(last), "err_msg": XID_NAMES.get(last, "")},
                    float(last),
                )
            )
            for (uuid, xid), n in sorted(counts.items()):
                if uuid == rec.get("uuid"):
                    out.append(
                        Sample(
                            XID_COUNT_METRIC,
                            {**labels, "xid": str(xid), "window_size_in_ms": str(int(self.window_s * 1000))},
                            float(n),
                        )
                    )
            verdict = verdicts.get((rec["index"], rec.get("uuid")))
            if verdict is not None:
                for v in Verdict:
                    out.append(
                        Sample("gpuforge_gpu_verdict", {**labels, "verdict": v.value}, 1.0 if v == verdict else 0.0)
                    )
        return out

    def labels(self, rec: Mapping[str, Any]) -> dict[str, str]:
        """dcgm-exporter's label set for a GPU series."""
        minor = rec.get("minor_number")
        return {
            "gpu": str(rec["index"]),
            "UUID": rec.get("uuid") or "",
            "pci_bus_id": rec.get("pci_bus_id") or "",
            "device": f"nvidia{minor if minor is not None else rec['index']}",
            "modelName": rec.get("name") or "",
            "Hostname": self.node,
            "DCGM_FI_DRIVER_VERSION": self.driver,
        }


def canonical_values(rec: Mapping[str, Any]) -> dict[str, float | None]:
    """Raw record values in NVML units -> health value keys in dcgm units (W, MiB). Unsupported or
    failed fields are simply absent."""
    raw = rec.get("values", {})
    out: dict[str, float | None] = {}
    for raw_key, (key, scale) in RAW_FIELDS.items():
        if raw.get(raw_key) is not None:
            out[key] = round(float(raw[raw_key]) * scale, 3)
    nvlink = [float(raw[k]) for k in RAW_NVLINK if raw.get(k) is not None]
    if nvlink:
        out["nvlink_errors"] = sum(nvlink)
    return out


def _counters(rec: Mapping[str, Any]) -> dict[str, float]:
    values = canonical_values(rec)
    pairs = {
        "ecc_sbe_increase": "ecc_sbe_vol",
        "remap_correctable_increase": "remap_correctable",
        "nvlink_error_increase": "nvlink_errors",
    }
    return {inc: float(values[total]) for inc, total in pairs.items() if values.get(total) is not None}


def default_node_name() -> str:
    """``NODE_NAME`` (Kubernetes downward API, as dcgm-exporter uses) or the host name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


# --------------------------------------------------------------------------------------------------
# Functions the CLI calls
# --------------------------------------------------------------------------------------------------


def probe_table(
    config_thresholds: Mapping[str, Any] | None = None,
    *,
    reader: Reader | None = None,
    node: str | None = None,
    expected_gpus: int | None = None,
) -> list[GpuVerdict]:
    """Read every GPU once and judge it. Raises :class:`ProbeError` when NVML cannot start."""
    probe = Probe(reader or NvmlReader(), node=node or default_node_name(), table=resolve_thresholds(config_thresholds))
    probe.open()
    try:
        probe.refresh()
        return probe.verdicts(expected_gpus)
    finally:
        probe.close()


def slurm_healthcheck(
    config_thresholds: Mapping[str, Any] | None = None,
    *,
    reader: Reader | None = None,
    node: str | None = None,
    expected_gpus: int | None = None,
    fail_on: Iterable[Verdict] = (Verdict.UNHEALTHY, Verdict.UNKNOWN),
) -> tuple[int, str]:
    """For Slurm's HealthCheckProgram: ``(exit_code, one_line_reason)``. 0 when no GPU has a verdict in
    ``fail_on`` (degraded GPUs are named in the reason but do not fail), 1 when one does, 2 when NVML
    cannot start (no driver). The reason starts with "gpuforge:" so the drain script can tell its own
    drains from others'."""
    try:
        verdicts = probe_table(config_thresholds, reader=reader, node=node, expected_gpus=expected_gpus)
    except ProbeError as e:
        return 2, _one_line(f"gpuforge: {e}")
    if not verdicts:
        return 1, "gpuforge: no GPUs found by NVML"
    failing = set(fail_on)
    bad = [v for v in verdicts if v.verdict in failing]
    if bad:
        parts = [f"GPU{v.gpu} {v.verdict.value}: {v.reasons[0] if v.reasons else '-'}" for v in bad]
        return 1, _one_line("gpuforge: " + "; ".join(parts))
    degraded = [v for v in verdicts if v.verdict == Verdict.DEGRADED]
    if degraded:
        parts = [f"GPU{v.gpu}: {v.reasons[0]}" for v in degraded]
        return 0, _one_line(f"gpuforge: {len(verdicts)} GPUs ok, degraded " + "; ".join(parts))
    return 0, f"gpuforge: {len(verdicts)} GPUs healthy"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_addr(value: str) -> tuple[str, int]:
    """``"ADDR:PORT"`` (``"[::1]:9400"`` for IPv6) -> (addr, port); a bare port binds 127.0.0.1."""
    if value.isdigit():
        return "127.0.0.1", int(value)
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected ADDR:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Collector:
    def __init__(self, probe: Probe, min_refresh_s: float) -> None:
        self.probe, self.min_refresh_s = probe, min_refresh_s
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = 1.0
        with self._lock:
            ts = self.probe.snapshot_ts
            if ts is None or self.probe.clock() - ts >= self.min_refresh_s:
                try:
                    self.probe.refresh()
                except Exception as e:  # NVML failing mid-serve: report down, keep serving
                    log.error("probe refresh failed: %s", e)
                    up = 0.0
            samples = self.probe.samples() if up else []
        families: dict[str, Any] = {}
        for s in samples:
            fam = families.get(s.name)
            if fam is None:
                fam = families[s.name] = GaugeMetricFamily(
                    s.name, EXPORTED_HELP.get(s.name, s.name), labels=list(s.labels)
                )
            fam.add_metric(list(s.labels.values()), s.value)
        yield from families.values()
        g = GaugeMetricFamily("gpuforge_probe_up", EXPORTED_HELP["gpuforge_probe_up"])
        g.add_metric([], up)
        yield g


@dataclass
class ProbeServer:
    probe: Probe
    httpd: Any
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.probe.close()


def serve(
    addr: str = "127.0.0.1",
    port: int = 9400,
    *,
    config_thresholds: Mapping[str, Any] | None = None,
    reader: Reader | None = None,
    node: str | None = None,
    min_refresh_s: float = 1.0,
    watch_xids: bool = True,
    block: bool = True,
) -> ProbeServer:
    """Serve ``/metrics`` on ``addr:port`` only (default loopback; inside a pod use 0.0.0.0 for the scrape).
    Each scrape re-reads NVML at most every ``min_refresh_s``. ``port=0`` picks a free port
    (``ProbeServer.port``). With ``block`` it serves until interrupted; otherwise it returns at once.
    Raises :class:`ProbeError` when NVML cannot start."""
    from prometheus_client import CollectorRegistry, start_http_server

    probe = Probe(reader or NvmlReader(), node=node or default_node_name(), table=resolve_thresholds(config_thresholds))
    probe.open()
    try:
        probe.refresh()
        if watch_xids:
            probe.start_xid_watch()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(probe, min_refresh_s))  # type: ignore[arg-type]
        httpd, thread = start_http_server(port, addr=addr, registry=registry)
    except BaseException:
        probe.close()
        raise
    server = ProbeServer(probe, httpd, thread)
    log.info("gpuforge probe serving http://%s:%d/metrics", addr, server.port)
    if block:
        try:
            while thread.is_alive():
                thread.join(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    return server


# --------------------------------------------------------------------------------------------------
# Reading an exposition back (device check, tests) and recording fixtures
# --------------------------------------------------------------------------------------------------


def query_results_from_exposition(text: str, now: float) -> dict[str, list[dict]]:
    """Parse a ``/metrics`` text into the shape of Prometheus instant-query answers for
    :data:`gpuforge.health.HEALTH_QUERIES`, as if Prometheus had just scraped it at ``now``: every sample in
    ``values``, a ``fresh`` timestamp of ``now`` per GPU, XID counts in ``xid_count``."""
    from prometheus_client.parser import text_string_to_metric_families

    results: dict[str, list[dict]] = {"values": [], "fresh": [], "xid_count": []}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            item = {"metric": {"__name__": s.name, **s.labels}, "value": [now, repr(float(s.value))]}
            if s.name == XID_COUNT_METRIC:
                results["xid_count"].append(item)
            elif s.name != DCGM_METRICS["xid_last"]:
                results["values"].append(item)
            if s.name == DCGM_METRICS["gpu_temp"]:
                results["fresh"].append({"metric": dict(s.labels), "value": [now, repr(now)]})
    return results


def readings_from_exposition(
    text: str, expected: Mapping[str, int | None] | None = None, now: float | None = None
) -> list[GpuReading]:
    """Readings from a ``/metrics`` text through the same code as the fleet path."""
    now = time.time() if now is None else now
    return readings_from_query_results(query_results_from_exposition(text, now), expected or {}, now)


def record_snapshot(reader: Reader | None = None) -> dict[str, Any]:
    """One recording of every GPU, for ``tests/fixtures/nvml/*.json`` (RecordedReader reads it back)."""
    reader = reader or NvmlReader()
    reader.open()
    try:
        data: dict[str, Any] = {
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "hostname": socket.gethostname(),
            "driver_version": reader.driver_version(),
        }
        nvml_version = getattr(reader, "nvml_version", None)
        if callable(nvml_version):
            data["nvml_version"] = nvml_version()
        data["gpus"] = reader.snapshot()
        return data
    finally:
        reader.close()


def load_config(path: str | Path) -> dict[str, Any]:
    """A thresholds config file, its sections at the top or under ``thresholds`` (as in the gpuforge config's
    ``health``): JSON (``.json``) or YAML (ruamel.yaml, imported only for YAML)."""
    p = Path(path)
    text = p.read_text()
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        from ruamel.yaml import YAML

        data = YAML(typ="safe").load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at the top level")
    return data["thresholds"] if isinstance(data.get("thresholds"), dict) else data


def main(argv: list[str] | None = None) -> int:
    """``python -m gpuforge_probe``: a stand-alone entry for nodes and the device check."""
    ap = argparse.ArgumentParser(prog="python -m gpuforge_probe", description=__doc__.splitlines()[0])
    ap.add_argument("--serve", metavar="ADDR:PORT", help="serve /metrics (default address 127.0.0.1)")
    ap.add_argument("--config", metavar="FILE", help="thresholds config (JSON or YAML)")
    ap.add_argument("--json", action="store_true", help="print verdicts as JSON")
    ap.add_argument("--slurm-healthcheck", action="store_true", help="one-line reason, exit 1 when unhealthy")
    ap.add_argument("--expected-gpus", type=int, default=None, help="GPUs this node should have")
    ap.add_argument("--node", default=None, help="node name for the Hostname label (default $NODE_NAME)")
    ap.add_argument("--fixture", metavar="FILE", help="read a recorded fixture instead of NVML")
    ap.add_argument("--record", metavar="FILE", help="write raw NVML records as JSON and exit")
    ap.add_argument("--scrape", metavar="URL", help="scrape a probe or dcgm-exporter /metrics and judge it")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config) if args.config else None
        reader: Reader | None = RecordedReader(args.fixture) if args.fixture else None
        if args.record:
            data = record_snapshot(reader)
            Path(args.record).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            print(f"recorded {len(data['gpus'])} GPU(s) to {args.record}")
            return 0
        if args.scrape:
            return _scrape(args.scrape, config, args.json)
        if args.slurm_healthcheck:
            code, reason = slurm_healthcheck(config, reader=reader, node=args.node, expected_gpus=args.expected_gpus)
            print(reason)
            return code
        if args.serve:
            addr, port = parse_addr(args.serve)
            serve(addr, port, config_thresholds=config, reader=reader, node=args.node)
            return 0
        verdicts = probe_table(config, reader=reader, node=args.node, expected_gpus=args.expected_gpus)
    except ProbeError as e:
        print(f"gpuforge probe: {e}", file=sys.stderr)
        return 2
    print(verdicts_json(verdicts) if args.json else format_table(verdicts))
    return 0 if all(v.verdict in (Verdict.HEALTHY, Verdict.DEGRADED) for v in verdicts) else 1


def _scrape(url: str, config: Mapping[str, Any] | None, as_json: bool) -> int:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    now = time.time()
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    print(f"# {len(series)} series from {url}")
    for line in series:
        print(line)
    table = resolve_thresholds(config)
    verdicts = [judge(r, thresholds_for(r.model, table)) for r in readings_from_exposition(text, now=now)]
    print(verdicts_json(verdicts) if as_json else format_table(verdicts))
    return 0 if all(v.verdict in (Verdict.HEALTHY, Verdict.DEGRADED) for v in verdicts) else 1
