"""GPU health: the pure domain core.

This module decides whether a GPU is healthy. It imports no client library (no Prefect, no requests,
no kubernetes, no pynvml): the probe (:mod:`gpuforge.probe`, NVML on the node) and the fleet flow
(Prometheus over dcgm-exporter) both turn what they read into :class:`GpuReading` objects and hand them
to :func:`judge`.

Fleet use (``tasks.prometheus.evaluate_fleet`` owns the ``prometheus_api_client.PrometheusConnect``)::

    queries = fleet_queries(table)  # table: thresholds per model, from the config
    results = {name: prom.custom_query(query) for name, query in queries.items()}
    look = closer_look(results, expected={"node-a": 8, "node-b": None}, table=table)
    results |= {name: prom.custom_query(query) for name, query in look.queries.items()}
    fleet = fleet_health(results, look, expected, table, now=time.time())
    fleet.counts(), fleet.verdicts, fleet.healthy, fleet.table_rows()

The fleet queries summarise: one series per node for the GPUs it exports, and series only for what might be a
fault. The nodes they cannot call healthy (a suspect, a count short of the expected one, an XID, a burst) are
looked at closely with up to three more queries about those nodes alone, and their GPUs judged one by one; every
other node's GPUs are counted healthy. So the number of queries is fixed (``len(fleet_queries(table))``, six, and
at most three more) whatever the number of GPUs, and what Prometheus sends back, and Python reads, grows with the
nodes and the faults rather than with every value of every GPU.

Value keys
----------
A reading's ``values`` uses the canonical keys of :data:`VALUE_KEYS` (``gpu_temp``, ``power_usage`` …);
:func:`dcgm_metrics` maps the instantaneous ones to the metric names of one dcgm-exporter version's contract
(:mod:`gpuforge.metric_contract`); :data:`DCGM_METRICS` holds the pinned exporter's, which the probe also uses
for its own ``/metrics`` so that the same queries, dashboard and alerts work with either source. Readings are
parsed under any known version's names, values brought to the units the rules are written in.

Rules (see :func:`judge`)
-------------------------
* **unhealthy**: a fatal XID seen within the window (XID 79 "fallen off the bus" named as such), ECC
  double-bit (uncorrectable) errors > 0, a row-remap failure, more uncorrectable remapped rows than
  allowed, the GPU lost by NVML, or a GPU expected on the node but absent.
* **degraded**: a pending row remap, a burst of correctable remaps or single-bit ECC errors, GPU or
  memory temperature above threshold, power over the limit, a degrading clock-event (throttle) reason,
  NVLink errors, and (opt-in) a PCIe link narrower than its maximum.
* **unknown**: no metrics for the GPU, no freshness timestamp, or metrics older than ``stale_after_s``.
  A GPU is never healthy by default; evidence of a fatal fault still makes it unhealthy when its other
  metrics are stale.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from pydantic import BaseModel, Field, field_validator

from gpuforge import metric_contract
from gpuforge.metric_contract import Contract

# --------------------------------------------------------------------------------------------------
# Metric names and value keys
# --------------------------------------------------------------------------------------------------

#: The value keys of instantaneous values (gauges and totals): each is a role of the metric contract
#: (:mod:`gpuforge.metric_contract`), which names its metric per dcgm-exporter version.
#: ``DCGM_FI_DEV_ROW_REMAP_PENDING`` is DCGM's own field name (dcgm_fields.h, field 397); it is not in
#: dcgm-exporter's default CSV, so a fleet that wants the pending rule adds it to the exporter config.
#: Clock events: DCGM >= 3.3 calls field 112 ``DCGM_FI_DEV_CLOCKS_EVENT_REASONS``; the older
#: ``DCGM_FI_DEV_CLOCK_THROTTLE_REASONS`` is what the probe exports and both are accepted here.
INSTANT_KEYS: tuple[str, ...] = (
    "gpu_temp", "memory_temp", "power_usage", "power_limit", "gpu_util", "fb_used", "fb_free", "ecc_sbe_vol",
    "ecc_dbe_vol", "remap_correctable", "remap_uncorrectable", "remap_pending", "remap_failure",
    "clock_event_reasons", "pcie_link_gen", "pcie_link_width", "pcie_link_gen_max", "pcie_link_width_max",
    "xid_last",
)  # fmt: skip


def dcgm_metrics(contract: Contract) -> dict[str, str]:
    """Value key -> the metric name `contract`'s exporter serves it under."""
    return {key: contract.metric(key) for key in INSTANT_KEYS}


def nvlink_error_metrics(contract: Contract) -> tuple[str, ...]:
    """The four NVLink error totals under `contract`'s names; summed per GPU into ``nvlink_errors``."""
    return tuple(contract.metric(role) for role in metric_contract.NVLINK_ROLES)


#: The names of the exporter the pinned GPU Operator ships (what the probe exports, what readers ask for unless
#: they are handed another contract).
DCGM_METRICS: dict[str, str] = dcgm_metrics(metric_contract.PINNED)
NVLINK_ERROR_METRICS: tuple[str, ...] = nvlink_error_metrics(metric_contract.PINNED)
#: dcgm-exporter's computed XID counter (label ``xid``), enabled in a custom CSV; the probe exports it too.
XID_COUNT_METRIC = metric_contract.PINNED.metric("xid_count")

#: Other metric names that map onto a value key (aliases).
DCGM_ALIASES: dict[str, str] = {
    "DCGM_FI_DEV_CLOCKS_EVENT_REASONS": "clock_event_reasons",
}

#: Windowed increases computed by Prometheus (or by the serving probe from its own history).
WINDOW_KEYS: tuple[str, ...] = ("ecc_sbe_increase", "remap_correctable_increase", "nvlink_error_increase")

#: The fleet query that finds the GPUs whose last-XID gauge showed anything within the window; its answer
#: only narrows :func:`xid_recent_query` and is no reading of its own.
XID_SEEN = "xid_seen"

#: Every key a reading's ``values`` may hold. ``gpu_lost`` (1.0) is set by the probe when NVML reports
#: NVML_ERROR_GPU_IS_LOST.
VALUE_KEYS: tuple[str, ...] = (*INSTANT_KEYS, "nvlink_errors", *WINDOW_KEYS, "gpu_lost")

#: Keys that count as "metrics of the GPU" for the unknown rule (anything but XIDs and loss).
_CORE_KEYS = frozenset(VALUE_KEYS) - {"xid_last", "gpu_lost"}

# Clock-event (throttle) reason bits, from nvml.h nvmlClocksEventReason*.
CLOCK_EVENT_REASONS: dict[int, str] = {
    0x1: "GPU idle",
    0x2: "applications clocks setting",
    0x4: "SW power cap",
    0x8: "HW slowdown",
    0x10: "sync boost",
    0x20: "SW thermal slowdown",
    0x40: "HW thermal slowdown",
    0x80: "HW power brake slowdown",
    0x100: "display clock setting",
}

#: Short descriptions of well-known XIDs (NVIDIA's XID catalogue), used in reasons.
XID_NAMES: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup",
    48: "double-bit ECC error",
    56: "display engine error",
    57: "error programming video memory interface",
    58: "unstable video memory interface",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapper recording failure",
    65: "video processor exception",
    68: "NVDEC0 exception",
    69: "graphics engine class error",
    73: "NVENC2 error",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    80: "corrupted data sent to GPU",
    81: "VGA subsystem error",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}

# --------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------

#: Fatal XIDs: Azure NHC's list (48,56,57,58,62,63,64,65,68,69,73,74,79,80,81,92,119,120, "within last
#: 2 h") plus 94 and 95 (contained/uncontained ECC errors, which gpud also treats as fatal; gpud exempts 94
#: from reboot escalation only). Source: shared/reference/upstream-gpu-stack.md section 4.
DEFAULT_FATAL_XIDS: tuple[int, ...] = (
    48,
    56,
    57,
    58,
    62,
    63,
    64,
    65,
    68,
    69,
    73,
    74,
    79,
    80,
    81,
    92,
    94,
    95,
    119,
    120,
)

#: HW slowdown 0x8 | SW thermal 0x20 | HW thermal 0x40 | HW power brake 0x80. Idle (0x1), SW power cap
#: (0x4) and the clock settings are normal operation (Azure NHC warns on all but idle and SW power cap).
DEFAULT_THROTTLE_MASK = 0x8 | 0x20 | 0x40 | 0x80

_WINDOW_RE = re.compile(r"^(\d+)([smhd])$")
_WINDOW_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Thresholds(BaseModel, extra="forbid"):
    """Limits for one GPU family. Every field is documented with its source.

    Power is judged two ways: when the reading carries the enforced power limit (the probe always does;
    dcgm-exporter does with ``DCGM_FI_DEV_ENFORCED_POWER_LIMIT`` in its CSV) the GPU is degraded when
    ``power_usage > power_limit * max_power_fraction``; otherwise when ``power_usage > max_power_w`` (if
    set). Windowed rules (bursts) use the increase over ``xid_window``; when a reading has no windowed
    value, the single-bit ECC rule falls back to the volatile total since the last driver load (what Azure
    NHC checks), and the NVLink rule to the NVLink error totals; the correctable-remap rule needs a window.
    """

    max_gpu_temp_c: float = Field(
        85.0,
        description="GPU core temperature above which the GPU is degraded. NVML 'GPU Max Operating "
        "Temp' (NVML_TEMPERATURE_THRESHOLD_GPU_MAX); 85 °C is the A100 SXM4 value, a conservative default.",
    )
    max_memory_temp_c: float = Field(
        95.0,
        description="HBM temperature above which the GPU is degraded. NVML 'Memory Max Operating "
        "Temp' (NVML_TEMPERATURE_THRESHOLD_MEM_MAX), 95 °C on A100/H100/H200; gpud: HBM > mem max.",
    )
    max_power_w: float | None = Field(
        None, description="Absolute power ceiling in W, used only when the reading has no power limit."
    )
    max_power_fraction: float = Field(
        1.0, gt=0, description="Degraded when power usage > enforced limit × this fraction ('over limit')."
    )
    correctable_remap_burst: int = Field(
        1,
        ge=0,
        description="Degraded when correctable remapped rows grow by more than this within the "
        "window. gpuforge's own choice: no peer sets one (pending remaps are judged separately).",
    )
    max_uncorrectable_remapped_rows: int = Field(
        512, ge=0, description="Unhealthy when uncorrectable remapped rows exceed this (Azure NHC: > 512)."
    )
    sbe_burst: int = Field(
        10000,
        ge=0,
        description="Degraded when correctable (single-bit) ECC errors grow by more than this "
        "within the window. Azure NHC H100 conf: SRAM correctable > 10000 (check_gpu_ecc 20000000 10000).",
    )
    nvlink_error_burst: int = Field(
        0,
        ge=0,
        description="Degraded when NVLink CRC/replay/recovery errors grow by more than this "
        "(Google cluster-toolkit: errors > 0).",
    )
    xid_window: str = Field(
        "2h", description="How far back a fatal XID counts, a Prometheus duration (Azure NHC: last 2 h)."
    )
    stale_after_s: float = Field(
        120.0,
        gt=0,
        description="Metrics older than this make the verdict unknown: eight dcgm-exporter "
        "scrape intervals of 15 s (GPU Operator ServiceMonitor default).",
    )
    fatal_xids: list[int] = Field(
        default_factory=lambda: list(DEFAULT_FATAL_XIDS),
        description="XIDs that make a GPU unhealthy (Azure NHC list + 94, 95).",
    )
    throttle_mask: int = Field(
        DEFAULT_THROTTLE_MASK,
        ge=0,
        description="Clock-event reason bits that degrade: HW slowdown 0x8, "
        "SW thermal 0x20, HW thermal 0x40, power brake 0x80 (Azure NHC / gpud hw-slowdown).",
    )
    pcie_width_degraded: bool = Field(
        False,
        description="Degrade when the PCIe link is narrower than its maximum. Off by default: no "
        "peer sets a threshold (gpud parses lspci in testdata only); the generation is never judged because "
        "idle GPUs lower it to save power.",
    )

    @field_validator("xid_window")
    @classmethod
    def _check_window(cls, v: str) -> str:
        if not _WINDOW_RE.match(v):
            raise ValueError(f"xid_window must look like '90s', '30m', '2h' or '1d', got {v!r}")
        return v

    @property
    def window_s(self) -> int:
        m = _WINDOW_RE.match(self.xid_window)
        assert m is not None
        return int(m.group(1)) * _WINDOW_UNIT_S[m.group(2)]


_BASE = Thresholds()


def _family(gpu_c: float, mem_c: float, power_w: float) -> Thresholds:
    update = {"max_gpu_temp_c": gpu_c, "max_memory_temp_c": mem_c, "max_power_w": power_w}
    return _BASE.model_copy(update=update)


#: Built-in thresholds per GPU family. Temperatures are NVML's max operating temperatures
#: (nvmlDeviceGetTemperatureThreshold GPU_MAX / MEM_MAX; older nvidia-smi -q "GPU Max Operating Temp" /
#: "Memory Max Operating Temp"). H200: 87/95 °C as read with NVML on an H200 SXM, driver 580.159.04
#: (tests/fixtures/nvml/h200.json; its nvidia-smi -q shows "GPU T.Limit Temp 51 C" at 36 °C, i.e. 87 °C).
#: A100 SXM4 85/95 °C and H100 SXM5 87/95 °C are the published nvidia-smi values, not recorded here.
#: Power ceilings are the SXM TDPs (A100 400 W, H100/H200 700 W; the H200 reported a 700 W enforced
#: limit), used only when a reading has no power limit.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "default": _BASE,
    "A100": _family(85.0, 95.0, 400.0),
    "H100": _family(87.0, 95.0, 700.0),
    "H200": _family(87.0, 95.0, 700.0),
}

#: Family -> a regex over the whole model name, in RE2 syntax (no lookaround) so that the rendered alert rules match
#: ``modelName`` with the very pattern the probe and the fleet judge by: the family's name, not preceded by a letter
#: or digit, not followed by a digit ("GH200" is no H200, "H20" no H200). Checked in this order: the first wins.
FAMILY_REGEX: dict[str, str] = {
    family: f"(?is)(.*[^a-z0-9])?{family.lower()}([^0-9].*)?" for family in ("H200", "H100", "A100")
}
_FAMILY_PATTERNS = tuple((family, re.compile(regex)) for family, regex in FAMILY_REGEX.items())


def model_family(model_name: str | None) -> str:
    """Family of a dcgm ``modelName``/NVML name: "NVIDIA H100 80GB HBM3" -> "H100"; else "default"."""
    for family, pattern in _FAMILY_PATTERNS:
        if model_name and pattern.fullmatch(model_name):
            return family
    return "default"


def resolve_thresholds(sections: Mapping[str, Thresholds | Mapping[str, Any]] | None) -> dict[str, Thresholds]:
    """The effective thresholds table of a config's ``health.thresholds``: what the probe, the fleet evaluation
    and the alert rules all judge by, so that a GPU gets one verdict from each.

    ``sections`` maps a family ("H100", "H200", "A100", "default") or an exact model name to a partial section,
    either the config's validated :class:`Thresholds` (only the fields it sets count) or a plain mapping (a probe
    config file). The "default" section is laid over every built-in family, then each named section over that
    (an exact model name over its family's defaults). The table holds every built-in family, so
    :func:`thresholds_for` always finds one. Unknown fields raise pydantic's ValidationError."""
    families = {f.casefold(): f for f in DEFAULT_THRESHOLDS}
    partial: dict[str, dict[str, Any]] = {}
    for key, section in (sections or {}).items():
        key = families.get(key.casefold(), key)  # "h100" is the H100 family, not a model named "h100"
        if isinstance(section, Thresholds):
            partial[key] = section.model_dump(exclude_unset=True)
        elif isinstance(section, Mapping):
            partial[key] = dict(section)
        else:
            raise ValueError(f"thresholds section {key!r} must be a mapping, got {type(section).__name__}")
    if not partial:
        return dict(DEFAULT_THRESHOLDS)
    default_part = partial.get("default", {})
    table: dict[str, Thresholds] = {}
    for name in {*DEFAULT_THRESHOLDS, *partial}:
        base = DEFAULT_THRESHOLDS.get(name) or DEFAULT_THRESHOLDS[model_family(name)]
        table[name] = Thresholds.model_validate({**base.model_dump(), **default_part, **partial.get(name, {})})
    return table


def thresholds_for(model_name: str | None, table: Mapping[str, Thresholds] = DEFAULT_THRESHOLDS) -> Thresholds:
    """The thresholds of a GPU model in a table from :func:`resolve_thresholds`: its exact model name's section
    (case-insensitive), else its family's."""
    if model_name:
        for key, thresholds in table.items():
            if key.casefold() == model_name.casefold():
                return thresholds
    return table[model_family(model_name)]


def exact_model_keys(table: Mapping[str, Thresholds]) -> list[str]:
    """The table's sections named by an exact model name rather than a family (they win over the family)."""
    return sorted(k for k in table if k not in DEFAULT_THRESHOLDS)


# --------------------------------------------------------------------------------------------------
# Readings and verdicts
# --------------------------------------------------------------------------------------------------


class Verdict(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


#: Severity order, worst last (used to pick a node's worst verdict).
SEVERITY: dict[Verdict, int] = {
    Verdict.HEALTHY: 0,
    Verdict.DEGRADED: 1,
    Verdict.UNKNOWN: 2,
    Verdict.UNHEALTHY: 3,
}


@dataclass(slots=True, kw_only=True)
class GpuReading:
    """What is known about one GPU at one moment, whatever the source.

    ``present`` is False only when the GPU is known to be absent (its node reports other GPUs, or the
    probe saw it earlier, but not this one now). ``age_s`` is the age of the newest sample (None: no
    freshness information, which makes the verdict unknown). ``xids`` are the XIDs seen within the
    window. ``node_silent``: the GPU's node exports no DCGM series at all, which points at the exporter or
    its scrape rather than at the GPU. A plain dataclass: readings are built by this package's own parsers
    (8,192 per fleet run) and only handed to :func:`judge`; the verdicts are the validated, serialised model."""

    node: str
    gpu: int
    uuid: str | None = None
    model: str | None = None
    values: dict[str, float | None] = field(default_factory=dict)
    age_s: float | None = None
    present: bool = True
    xids: list[int] = field(default_factory=list)
    node_silent: bool = False


class GpuVerdict(BaseModel):
    node: str
    gpu: int
    uuid: str | None = None
    model: str | None = None
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list)
    values: dict[str, float | None] = Field(default_factory=dict)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


def _known(values: Mapping[str, float | None]) -> dict[str, float]:
    """The values that are numbers (None and NaN dropped), as floats."""
    return {k: float(x) for k, x in values.items() if x is not None and x == x}  # NaN != NaN


def _xid_text(xid: int) -> str:
    name = XID_NAMES.get(xid)
    return f"XID {xid} ({name})" if name else f"XID {xid}"


def judge(reading: GpuReading, thresholds: Thresholds) -> GpuVerdict:
    """Judge one GPU. Unhealthy beats unknown beats degraded beats healthy; healthy needs fresh metrics."""
    v = _known(reading.values)
    t = thresholds
    bad: list[str] = []
    warn: list[str] = []

    def verdict(kind: Verdict, reasons: list[str]) -> GpuVerdict:
        return GpuVerdict(  # validated: pydantic's Rust validator is faster than its Python model_construct
            node=reading.node,
            gpu=reading.gpu,
            uuid=reading.uuid,
            model=reading.model,
            verdict=kind,
            reasons=reasons,
            values=dict(reading.values),
        )

    if not reading.present:
        return verdict(Verdict.UNHEALTHY, [f"GPU {reading.gpu} missing (expected on {reading.node})"])

    # --- unhealthy: evidence of a fatal fault counts even when other metrics are stale -------------
    if v.get("gpu_lost"):
        bad.append("GPU lost (NVML: GPU is lost, fallen off the bus)")
    fatal = set(t.fatal_xids)
    for xid in sorted(set(reading.xids)):
        if xid in fatal:
            bad.append(f"{_xid_text(xid)} within {t.xid_window}")
    dbe = v.get("ecc_dbe_vol")
    if dbe is not None and dbe > 0:
        bad.append(f"ECC DBE volatile {_fmt(dbe)} > 0")
    failure = v.get("remap_failure")
    if failure is not None and failure > 0:
        bad.append("row remap failure")
    unc = v.get("remap_uncorrectable")
    if unc is not None and unc > t.max_uncorrectable_remapped_rows:
        bad.append(f"uncorrectable remapped rows {_fmt(unc)} > {t.max_uncorrectable_remapped_rows}")
    if bad:
        return verdict(Verdict.UNHEALTHY, bad)

    # --- unknown: absent or stale -------------------------------------------------------------------
    if _CORE_KEYS.isdisjoint(v):
        if reading.node_silent:
            return verdict(Verdict.UNKNOWN, ["no GPU metrics from the node at all (dcgm-exporter down or not scraped)"])
        return verdict(Verdict.UNKNOWN, ["no GPU metrics"])
    if reading.age_s is None:
        return verdict(Verdict.UNKNOWN, ["no freshness timestamp for GPU metrics"])
    if reading.age_s > t.stale_after_s:
        return verdict(
            Verdict.UNKNOWN, [f"metrics stale: age {_fmt(round(reading.age_s))} s > {_fmt(t.stale_after_s)} s"]
        )

    # --- degraded -----------------------------------------------------------------------------------
    if v.get("remap_pending"):
        warn.append("row remap pending (GPU reset needed)")
    inc = v.get("remap_correctable_increase")
    if inc is not None and inc > t.correctable_remap_burst:
        warn.append(f"correctable remapped rows +{_fmt(inc)} in {t.xid_window} > {t.correctable_remap_burst}")
    sbe_inc = v.get("ecc_sbe_increase")
    sbe_tot = v.get("ecc_sbe_vol")
    if sbe_inc is not None:
        if sbe_inc > t.sbe_burst:
            warn.append(f"ECC SBE +{_fmt(sbe_inc)} in {t.xid_window} > {t.sbe_burst}")
    elif sbe_tot is not None and sbe_tot > t.sbe_burst:
        warn.append(f"ECC SBE volatile {_fmt(sbe_tot)} > {t.sbe_burst}")
    temp = v.get("gpu_temp")
    if temp is not None and temp > t.max_gpu_temp_c:
        warn.append(f"GPU temp {_fmt(temp)} °C > {_fmt(t.max_gpu_temp_c)} °C")
    mtemp = v.get("memory_temp")
    if mtemp is not None and mtemp > t.max_memory_temp_c:
        warn.append(f"memory temp {_fmt(mtemp)} °C > {_fmt(t.max_memory_temp_c)} °C")
    power, limit = v.get("power_usage"), v.get("power_limit")
    if power is not None:
        if limit is not None and limit > 0:
            cap = limit * t.max_power_fraction
            if power > cap:
                warn.append(f"power {_fmt(power)} W > limit {_fmt(cap)} W")
        elif t.max_power_w is not None and power > t.max_power_w:
            warn.append(f"power {_fmt(power)} W > {_fmt(t.max_power_w)} W")
    reasons_bits = v.get("clock_event_reasons")
    if reasons_bits is not None:
        active = int(reasons_bits) & t.throttle_mask
        if active:
            names = [name for bit, name in CLOCK_EVENT_REASONS.items() if active & bit]
            warn.append(f"clock events 0x{int(reasons_bits):x}: {', '.join(names) or 'unnamed bits'}")
    nv_inc, nv_tot = v.get("nvlink_error_increase"), v.get("nvlink_errors")
    if nv_inc is not None:
        if nv_inc > t.nvlink_error_burst:
            warn.append(f"NVLink errors +{_fmt(nv_inc)} in {t.xid_window} > {t.nvlink_error_burst}")
    elif nv_tot is not None and nv_tot > t.nvlink_error_burst:
        warn.append(f"NVLink errors {_fmt(nv_tot)} > {t.nvlink_error_burst}")
    if t.pcie_width_degraded:
        width, wmax = v.get("pcie_link_width"), v.get("pcie_link_width_max")
        if width is not None and wmax is not None and width < wmax:
            warn.append(f"PCIe link width x{_fmt(width)} < x{_fmt(wmax)}")
    if warn:
        return verdict(Verdict.DEGRADED, warn)
    return verdict(Verdict.HEALTHY, [])


def judge_all(readings: Iterable[GpuReading], table: Mapping[str, Thresholds] = DEFAULT_THRESHOLDS) -> list[GpuVerdict]:
    """Judge each reading with the thresholds of its model (a table from :func:`resolve_thresholds`)."""
    by_model: dict[str | None, Thresholds] = {}
    verdicts = []
    for r in readings:
        if r.model not in by_model:
            by_model[r.model] = thresholds_for(r.model, table)
        verdicts.append(judge(r, by_model[r.model]))
    return verdicts


# --------------------------------------------------------------------------------------------------
# Fleet evaluation over Prometheus
# --------------------------------------------------------------------------------------------------


def health_queries(window: str = "2h", step: str = "1m", contract: Contract = metric_contract.PINNED) -> dict[str, str]:
    """The per-GPU health queries over every GPU (instant queries), which the probe answers from its own history.
    The fleet asks the summary of :func:`fleet_queries` instead, and per GPU only about the nodes it cannot clear.

    * ``values``: every instantaneous DCGM metric in one selector (the series keep ``__name__``).
    * ``fresh``: ``timestamp()`` of the GPU temperature sample, for staleness.
    * ``xid_recent``: XID values the last-XID gauge showed within the window, one series per GPU and value
      (see :func:`xid_recent_expr`).
    * ``xid_count``: ``DCGM_EXP_XID_ERRORS_COUNT`` (per ``xid``) > 0 within the window, where enabled;
      this also sees repeats of the same XID, which the gauge cannot.
    * ``*_increase``: windowed increases of the single-bit ECC total, correctable remapped rows and NVLink
      errors (bursts).
    """
    if not _WINDOW_RE.match(window) or not _WINDOW_RE.match(step):
        raise ValueError(f"window and step must be Prometheus durations like '2h', got {window!r}, {step!r}")
    metrics, nvlink_metrics = dcgm_metrics(contract), nvlink_error_metrics(contract)
    xid = metrics["xid_last"]
    names = sorted({*metrics.values(), *DCGM_ALIASES, *nvlink_metrics} - {xid})
    selector = '{__name__=~"' + "|".join(names) + '"}'
    nvlink = '{__name__=~"' + "|".join(nvlink_metrics) + '"}'
    return {
        "values": selector,
        "fresh": f"timestamp({metrics['gpu_temp']})",
        "xid_recent": xid_recent_expr("", window, step, contract),
        "xid_count": f"max_over_time({contract.metric('xid_count')}[{window}]) > 0",
        "ecc_sbe_increase": f"increase({metrics['ecc_sbe_vol']}[{window}])",
        "remap_correctable_increase": f"increase({metrics['remap_correctable']}[{window}])",
        "nvlink_error_increase": f"increase((sum without(__name__) ({nvlink}))[{window}:{step}])",
    }


def xid_recent_expr(matchers: str, window: str, step: str, contract: Contract = metric_contract.PINNED) -> str:
    """XID values the last-XID gauge showed within ``window``, one series per GPU and value, minus values the same
    series already showed a window ago: the gauge keeps only the last XID and never resets, so a plain instant
    read would report an XID from last week. ``matchers`` narrow the gauge (e.g. ``hostname=~"a|b"``; "" for
    all). Caveat: a series whose labels change (exporter pod renamed) looks new, so its last XID counts again for
    one window.

    Where the exporter labels each XID value's series with ``err_code`` (dcgm-exporter, the probe, the lab's
    simulator), :func:`xid_values_expr` is exact. An exporter without that label has one series whose value
    changes: its values are sampled every ``step`` by a subquery (plus the current one) and counted by value
    (label ``xid``), so that a fatal XID followed by a larger harmless one still shows; there alone a value
    visible for less than a step can be missed. Each half selects the other's series away, so it costs nothing
    where it does not apply."""
    gauge = f'{contract.metric("xid_last")}{{{matchers}{", " if matchers else ""}err_code=""}}'
    sampled = (
        f'(max_over_time((count_values without() ("xid", {gauge} > 0))[{window}:{step}])'
        f' or count_values without() ("xid", {gauge} > 0))'
        f' unless count_values without() ("xid", {gauge} offset {window} > 0)'
    )
    return f"({xid_values_expr(matchers, window, contract=contract)}) or ({sampled})"


def xid_values_expr(
    matchers: str, window: str, xids: Iterable[int] | None = None, contract: Contract = metric_contract.PINNED
) -> str:
    """The XIDs (only those in ``xids`` when given) an exporter that puts each XID value on its own series
    (label ``err_code``) showed within ``window``, minus those the same series already showed a window ago. The
    maximum of each series over the window reads every sample Prometheus took, so an XID visible for a single
    scrape counts for the whole window; the answer keeps ``err_code``, which the readings take as the XID."""
    where = f"{matchers}, " if matchers else ""
    xid = contract.metric("xid_last")
    codes = f'err_code=~"{"|".join(str(x) for x in sorted(xids))}"' if xids is not None else 'err_code!=""'
    return f'max_over_time({xid}{{{where}{codes}}}[{window}]) > 0 unless {xid}{{{where}err_code!=""}} offset {window}'


#: The queries with the default window (``DEFAULT_THRESHOLDS["default"].xid_window``). A fleet with
#: another window calls :func:`health_queries` with it; one window serves the whole fleet.
HEALTH_QUERIES: dict[str, str] = health_queries(_BASE.xid_window)

# Labels gpuforge.health reads a series' GPU by (any case; exported_* after relabelling): everything else
# (pci_bus_id, device, driver version, instance, job, pod ...) is dropped server-side from every answer.
_KEEP_LABELS = (
    "__name__", "gpu", "UUID", "gpu_uuid", "modelName", "model_name", "Hostname", "hostname",
    "exported_Hostname", "exported_hostname", "node", "exported_node", "kubernetes_node", "nodename",
)  # fmt: skip
_IDENTITY_LABELS = ("UUID", "gpu_uuid", "modelName", "model_name")
_NODE_LABELS = tuple(label for label in _KEEP_LABELS if label not in ("__name__", "gpu", *_IDENTITY_LABELS))
# Judged by no rule (the table shows them where a probe reports them): not fetched for the fleet.
_UNUSED_VALUES = ("gpu_util", "fb_used", "fb_free", "pcie_link_gen", "pcie_link_gen_max")
_PCIE_WIDTH = ("pcie_link_width", "pcie_link_width_max")
# Totals judged only through their windowed increase (an old total is history, not a fault): not fetched.
_TOTALS = ("ecc_sbe_vol", "remap_correctable")


def fleet_window(table: Mapping[str, Thresholds]) -> tuple[Thresholds, str]:
    """The thresholds with the longest window and the subquery step for it. One window serves every GPU, for the
    fleet queries, the probe's XID memory and the alert rules alike, so that they give one verdict."""
    longest = max(table.values(), key=lambda t: t.window_s)
    return longest, "1m" if longest.window_s >= 600 else f"{max(1, longest.window_s // 10)}s"


def fleet_queries(table: dict[str, Thresholds], contract: Contract = metric_contract.PINNED) -> dict[str, str]:
    """The fleet queries for a thresholds table: a fixed number, whatever the GPU count. They summarise the fleet:
    a healthy GPU is counted in its node's one series and shows in no other answer, so what Prometheus sends back,
    and what gpuforge decodes and judges, grows with the nodes and the faults, not with every GPU's every value.
    One window serves the fleet: the longest `xid_window` of any family; the subquery step scales with it (1m
    for windows of 10 minutes and more, a tenth of the window below that).

    * `gpus`: how many GPUs each node exports (its temperature series, per model): one series per node;
    * `suspects`: the nodes with a GPU that any rule might judge less than healthy: metrics older than the
      shortest `stale_after_s`, a temperature or power above the lowest limit of any model, a degrading
      clock-event bit of any model, an error counter or flag not 0, a PCIe link narrower than its maximum (when
      any model judges that). Each test is as loose as the loosest model's, so a node is looked at whenever
      its GPUs' own thresholds might fail (`closer_look`), and judged there by `judge` itself;
    * the windowed increases only where they are above 0 (every burst threshold is >= 0), per GPU: their
      answers are read as they are for the nodes looked at closely;
    * `xid_seen`: the nodes whose GPUs showed any XID in the window; the exact XIDs are asked for those nodes
      alone by `xid_recent_query`.

    What Prometheus reads is what the time goes to (about 10 µs a series here), so each query reads only what a
    rule needs, and the answers carry no label that does not identify a node or GPU."""
    longest, step = fleet_window(table)
    window = longest.xid_window
    metrics = dcgm_metrics(contract)
    hosts = ", ".join(_NODE_LABELS)
    models = ", ".join(label for label in _IDENTITY_LABELS if label not in ("UUID", "gpu_uuid"))  # not per GPU
    temp = metrics["gpu_temp"]
    # The fleet asks only which GPUs showed any XID at all (one pass over the gauge's samples), and
    # `xid_recent_query` asks the exact question about those GPUs' nodes alone: where it must fall back to a
    # subquery (an exporter without `err_code`) that is 120 evaluations over a 2 h window (0.8 CPU s for
    # 8,192 GPUs, measured). The filter reaches one lookback (5 min) before the window, as far back as the
    # subquery's first step can see.
    queries = {
        "gpus": f"count by ({hosts}, {models}) ({temp})",
        "suspects": f"count by ({hosts}) ({' or '.join(f'({test})' for test in _suspect_tests(table, metrics))})",
        XID_SEEN: f"max by ({hosts}) (max_over_time({metrics['xid_last']}[{longest.window_s + 300}s]) > 0)",
    }
    for name, key in (("ecc_sbe_increase", "ecc_sbe_vol"), ("remap_correctable_increase", "remap_correctable")):
        queries[name] = f"increase({metrics[key]}[{window}]) > 0"
    # increase() drops the metric name, so the four NVLink totals of a GPU would collide: each non-zero increase
    # keeps its counter's name in a label until they are summed (filtered first, the joins are tiny).
    per_counter = " or ".join(
        f'label_replace(increase({m}[{window}]) > 0, "counter", "{m}", "", "")' for m in nvlink_error_metrics(contract)
    )
    queries["nvlink_error_increase"] = f"sum without(counter) ({per_counter})"
    return queries


def _suspect_tests(table: Mapping[str, Thresholds], metrics: Mapping[str, str]) -> list[str]:
    """PromQL filters that keep every GPU whose own thresholds might judge it less than healthy (see `judge`): each
    compares with the loosest limit of any model in `table`, so it keeps a superset, which `judge` then sorts."""

    def lowest(field: str) -> float:
        return min(getattr(t, field) for t in table.values())

    def selector(*keys: str) -> str:
        return f'{{__name__=~"{_names_pattern(metrics, keys)}"}}'

    temp, power, limit = metrics["gpu_temp"], metrics["power_usage"], metrics["power_limit"]
    tests = [
        f"timestamp({temp}) < time() - {lowest('stale_after_s'):g}",
        f"{temp} > {lowest('max_gpu_temp_c'):g}",
        f"{metrics['memory_temp']} > {lowest('max_memory_temp_c'):g}",
        f"{power} > {limit} * {lowest('max_power_fraction'):g}",
        f"{selector('ecc_dbe_vol', 'remap_pending', 'remap_failure')} != 0",
        f"{metrics['remap_uncorrectable']} > {lowest('max_uncorrectable_remapped_rows'):g}",
    ]
    watts = [t.max_power_w for t in table.values() if t.max_power_w is not None]
    if watts:  # judged by the absolute ceiling only where the GPU reports no limit
        tests.append(f"{power} > {min(watts):g} unless {limit} > 0")
    # PromQL has no bitwise AND: a run of mask bits lo..hi is set when value mod 2^(hi+1) >= 2^lo.
    mask = functools.reduce(operator.or_, (t.throttle_mask for t in table.values()), 0)
    reasons = selector("clock_event_reasons")
    tests += [f"{reasons} % {2 ** (hi + 1)} >= {2**lo}" for lo, hi in _bit_runs(mask)]
    if any(t.pcie_width_degraded for t in table.values()):
        tests.append(f"{metrics['pcie_link_width']} < {metrics['pcie_link_width_max']}")
    return tests


def _names_pattern(metrics: Mapping[str, str], keys: Iterable[str]) -> str:
    """The metric names of value keys as one regex alternation, the aliases of those keys included."""
    keys = set(keys)
    names = {metrics[k] for k in keys} | {alias for alias, k in DCGM_ALIASES.items() if k in keys}
    return "|".join(sorted(names))


def _bit_runs(mask: int) -> list[tuple[int, int]]:
    """The runs of set bits in `mask`, lowest first, as (lowest bit, highest bit): 0xE8 -> [(3, 3), (5, 7)]."""
    runs: list[tuple[int, int]] = []
    for bit in range(mask.bit_length()):
        if mask >> bit & 1:
            if runs and runs[-1][1] == bit - 1:
                runs[-1] = (runs[-1][0], bit)
            else:
                runs.append((bit, bit))
    return runs


class HealthyGpus(NamedTuple):
    """A node's GPUs that the fleet summary found healthy, counted rather than listed."""

    gpus: int
    model: str | None


@dataclass(frozen=True)
class CloserLook:
    """What the fleet summary left to judge GPU by GPU (see :func:`closer_look`)."""

    nodes: frozenset[str]  # casefolded names of the nodes whose GPUs are judged one by one
    healthy: dict[str, HealthyGpus]  # node (as `expected` spells it) -> its GPUs, every one found healthy
    queries: dict[str, str]  # the per-GPU questions about `nodes` alone (none when there is nothing to look at)


def closer_look(
    results: Mapping[str, list[dict]],
    expected: Mapping[str, int | None],
    table: dict[str, Thresholds],
    contract: Contract = metric_contract.PINNED,
    closely: Iterable[str] = (),
) -> CloserLook:
    """The nodes whose GPUs the answers to :func:`fleet_queries` cannot call healthy, and the queries that read
    those nodes' GPUs one by one: a node in `suspects`, the increases or `xid_seen`; a node exporting another
    number of GPUs than `expected` says; and the nodes in `closely` (gpu-health's release of one node). Every
    other node in `gpus` is healthy, its GPUs counted. An expected node in no answer at all is neither: its GPUs
    are judged unknown (:func:`fleet_health`)."""
    spelled = {n.casefold(): n for n in expected}
    wanted = {n.casefold() for n in closely}
    nodes: dict[str, tuple[str, str]] = {}  # casefolded node -> (node label, name as the series spell it)
    counts: dict[str, int] = {}
    models: dict[str, set[str]] = {}
    # node label -> names as the series spell them: every node a suspect, an XID or a burst names
    look = _nodes_by_label(item for name in ("suspects", XID_SEEN, *WINDOW_KEYS) for item in results.get(name) or ())
    for item in results.get("gpus") or ():
        metric = item.get("metric") or {}
        label = _node_label(metric)
        if label is None:
            continue
        key = metric[label].casefold()
        nodes[key] = (label, metric[label])
        counts[key] = counts.get(key, 0) + int(_sample_value(item) or 0)
        if model := _pick(metric, _roles(tuple(metric)).model):
            models.setdefault(key, set()).add(model)
    for key, (label, name) in nodes.items():
        count = expected.get(spelled.get(key, ""))
        if key in wanted or (count is not None and counts[key] != count):
            look.setdefault(label, set()).add(name)
    closer = frozenset(name.casefold() for names in look.values() for name in names)
    healthy = {
        spelled.get(key, name): HealthyGpus(counts[key], ", ".join(sorted(models.get(key, ()))) or None)
        for key, (_, name) in nodes.items()
        if key not in closer
    }
    queries: dict[str, str] = {}
    if look:
        metrics = dcgm_metrics(contract)
        skip = {*_UNUSED_VALUES, *_TOTALS, "xid_last"}
        if not any(t.pcie_width_degraded for t in table.values()):
            skip |= set(_PCIE_WIDTH)
        names = _names_pattern(metrics, set(metrics) - skip)
        labels = ", ".join(_KEEP_LABELS)
        # The GPU's UUID and model come with `fresh`: the bigger answer carries only node and index.
        where = ", ".join(label for label in _KEEP_LABELS if label not in _IDENTITY_LABELS)
        queries["values"] = _narrowed(look, lambda m: f'max by ({where}) ({{__name__=~"{names}", {m}}})')
        queries["fresh"] = _narrowed(look, lambda m: f"max by ({labels}) (timestamp({metrics['gpu_temp']}{{{m}}}))")
    xid_recent = xid_recent_query(table, results.get(XID_SEEN) or [], contract)
    if xid_recent is not None:
        queries["xid_recent"] = xid_recent
    return CloserLook(closer, healthy, queries)


def _node_label(metric: Mapping[str, str]) -> str | None:
    """The name of the label a series names its node by (see :func:`node_of`)."""
    return next((name for name in _roles(tuple(metric)).node if metric[name]), None)


def _nodes_by_label(items: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    """Node label name -> the names of the nodes the answer items name under it, as the series spell them."""
    nodes: dict[str, set[str]] = {}
    for item in items:
        metric = item.get("metric") or {}
        if label := _node_label(metric):
            nodes.setdefault(label, set()).add(metric[label])
    return nodes


def _narrowed(nodes: Mapping[str, set[str]], expr: Callable[[str], str]) -> str:
    """`expr` of a label matcher, once per node label (or'ed), for exactly those nodes (a "." in a name is a dot)."""
    parts = []
    for label, names in sorted(nodes.items()):
        alternatives = "|".join(re.escape(n) for n in sorted(names))
        parts.append(f"({expr(f'{label}=~{json.dumps(alternatives)}')})")
    return " or ".join(parts)


def xid_recent_query(
    table: dict[str, Thresholds], seen: list[dict], contract: Contract = metric_contract.PINNED
) -> str | None:
    """The exact ``xid_recent`` query (see :func:`health_queries`) for the nodes of the GPUs in the answer to
    the fleet's ``xid_seen`` query; None when no GPU showed an XID (a healthy fleet needs no second query)."""
    nodes = _nodes_by_label(seen)
    if not nodes:
        return None
    longest, step = fleet_window(table)
    return _narrowed(nodes, lambda matcher: xid_recent_expr(matcher, longest.xid_window, step, contract))


def fleet_health(
    results: Mapping[str, list[dict]],
    look: CloserLook,
    expected: Mapping[str, int | None],
    table: Mapping[str, Thresholds],
    now: float,
) -> FleetHealth:
    """The fleet's health from the answers to :func:`fleet_queries` and to ``look.queries``: the GPUs of the nodes
    looked at closely (and of expected nodes no answer shows, unknown) judged one by one, the others counted."""
    answers = {name: results.get(name) or [] for name in ("values", "fresh", "xid_recent", *WINDOW_KEYS)}
    judged = {n: count for n, count in expected.items() if n not in look.healthy}
    return FleetHealth(judge_all(readings_from_query_results(answers, judged, now), table), look.healthy)


# Every spelling of every known exporter version -> (value key, factor to the rules' units): a series is read
# under whichever name the running exporter serves, 4.9.0's bytes brought back to MiB.
_NAME_TO_KEY: dict[str, tuple[str, float]] = {
    **metric_contract.reading_roles(),
    **{alias: (key, 1.0) for alias, key in DCGM_ALIASES.items()},
}
_NVLINK_NAMES = frozenset(name for name, (role, _) in _NAME_TO_KEY.items() if role in metric_contract.NVLINK_ROLES)
# The labels a series' GPU is read by, each role's names in order of preference; matched case-insensitively
# (``Hostname`` and ``hostname`` both occur), ``exported_*`` after relabelling.
_LABEL_ROLES: dict[str, tuple[str, ...]] = {
    "node": ("hostname", "exported_hostname", "node", "exported_node", "kubernetes_node", "nodename"),
    "gpu": ("gpu",),
    "uuid": ("uuid", "gpu_uuid"),
    "model": ("modelname", "model_name"),
    "xid": ("xid", "err_code"),  # count_values' label; dcgm-exporter's on the last-XID gauge
}


class _Roles(NamedTuple):
    """For one set of label names: the names that fill each role of :data:`_LABEL_ROLES`, best first."""

    node: tuple[str, ...]
    gpu: tuple[str, ...]
    uuid: tuple[str, ...]
    model: tuple[str, ...]
    xid: tuple[str, ...]


@functools.lru_cache(maxsize=1024)
def _roles(names: tuple[str, ...]) -> _Roles:
    """The roles of a series' label names. The series of one answer share a handful of label-name sets, so
    this runs a few times a query, not once a series (case-folding every label of 8,192 series was a third of
    the fleet evaluation's Python time)."""
    by_folded: dict[str, list[str]] = {}
    for name in names:
        by_folded.setdefault(name.casefold(), []).append(name)
    return _Roles(
        *(tuple(name for wanted in folded for name in by_folded.get(wanted, ())) for folded in _LABEL_ROLES.values())
    )


def _pick(metric: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    """The first non-empty label among ``names``."""
    for name in names:
        value = metric[name]
        if value:
            return value
    return None


def node_of(metric: Mapping[str, str]) -> str | None:
    """The node a series belongs to: ``Hostname``/``hostname`` (any case) or their ``exported_`` forms;
    failing those, a ``node``-style label added by relabelling."""
    return _pick(metric, _roles(tuple(metric)).node)


def _sample_value(item: Mapping[str, Any]) -> float | None:
    value = item.get("value")
    if not value or len(value) < 2:
        return None
    try:
        f = float(value[1])
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


class _Gpu:
    __slots__ = ("node", "gpu", "uuid", "model", "values", "ts", "xids")

    def __init__(self, node: str, gpu: int) -> None:
        self.node, self.gpu = node, gpu
        self.uuid: str | None = None
        self.model: str | None = None
        self.values: dict[str, float | None] = {}
        self.ts: float | None = None
        self.xids: set[int] = set()


def readings_from_query_results(
    results: Mapping[str, list[dict]], expected: Mapping[str, int | None], now: float
) -> list[GpuReading]:
    """Turn the instant-vector answers of :data:`HEALTH_QUERIES` into one reading per GPU.

    ``results`` maps a query name to what ``PrometheusConnect.custom_query`` returned (a list of
    ``{"metric": {...}, "value": [ts, "str"]}``); missing names count as empty answers. ``expected`` maps
    node -> expected GPU count (None: unknown, at least one). Nodes are matched case-insensitively and
    reported with the spelling of ``expected``. For an expected node:

    * with no series at all: one reading per expected GPU (one if the count is unknown) with no values and
      ``node_silent``, which :func:`judge` calls unknown, naming the exporter;
    * with series: the GPUs seen, plus ``present=False`` readings for indices ``0..count-1`` not seen.

    Nodes not in ``expected`` are reported with the GPUs seen. Series without a node label are ignored;
    series with no ``gpu`` label are attached by UUID (``UUID`` or NVLink's ``gpu_uuid``) when possible.
    A windowed increase (:data:`WINDOW_KEYS`) only adds to a GPU another answer shows: a GPU that vanished
    keeps its increase series for the whole window, which must not make it look present (with stale
    metrics, "unknown") instead of missing ("unhealthy"). Its XIDs still count.
    """
    spelled = {n.casefold(): n for n in expected}
    gpus: dict[tuple[str, int], _Gpu] = {}
    by_uuid: dict[str, _Gpu] = {}
    folded: dict[str, str] = {}  # node name -> casefold(), once per node: every series of its GPUs names it
    pending: list[tuple[str, Mapping[str, str], _Roles, float | None]] = []

    def gpu_for(labels: Mapping[str, str], roles: _Roles, create: bool) -> _Gpu | None:
        node = _pick(labels, roles.node)
        if node is None:
            return None
        idx = _pick(labels, roles.gpu)
        if idx is None or not idx.isdigit():
            uuid = _pick(labels, roles.uuid)
            return by_uuid.get(uuid.casefold()) if uuid else None
        node_key = folded.get(node)
        if node_key is None:
            node_key = folded[node] = node.casefold()
        key = (node_key, int(idx))
        g = gpus.get(key)
        if g is None:
            if not create:
                return None
            g = gpus[key] = _Gpu(spelled.get(node_key, node), key[1])
        # The identity labels come with one or two answers only; most series carry none (roles.uuid is empty).
        if roles.uuid and not g.uuid and (uuid := _pick(labels, roles.uuid)):
            g.uuid = uuid
            by_uuid[uuid.casefold()] = g
        if roles.model and not g.model:
            g.model = _pick(labels, roles.model)
        return g

    # First pass: every series with a gpu label, windowed increases last; second: series known only by UUID.
    for query, items in sorted(results.items(), key=lambda kv: kv[0] in WINDOW_KEYS):
        create = query not in WINDOW_KEYS
        for item in items or ():
            labels = item.get("metric") or {}
            roles = _roles(tuple(labels))
            if not _pick(labels, roles.gpu):
                pending.append((query, labels, roles, _sample_value(item)))
                continue
            g = gpu_for(labels, roles, create)
            if g is not None:
                _apply(g, query, labels, roles, _sample_value(item))
    for query, labels, roles, value in pending:
        g = gpu_for(labels, roles, query not in WINDOW_KEYS)
        if g is not None:
            _apply(g, query, labels, roles, value)

    readings: list[GpuReading] = []
    seen_nodes = {node for node, _ in gpus}
    for node in expected:
        count = expected[node]
        key = node.casefold()
        if key not in seen_nodes:
            for i in range(count if count is not None else 1):
                readings.append(GpuReading(node=node, gpu=i, node_silent=True))
            continue
        for i in range(count or 0):
            if (key, i) not in gpus:
                readings.append(GpuReading(node=node, gpu=i, present=False))
    for g in gpus.values():
        readings.append(
            GpuReading(
                node=g.node,
                gpu=g.gpu,
                uuid=g.uuid,
                model=g.model,
                values=g.values,
                age_s=None if g.ts is None else max(0.0, now - g.ts),
                present=True,
                xids=sorted(g.xids),
            )
        )
    readings.sort(key=lambda r: (r.node.casefold(), r.gpu))
    return readings


def _apply(g: _Gpu, query: str, metric: Mapping[str, str], roles: _Roles, value: float | None) -> None:
    if query == "values":
        name = metric.get("__name__", "")
        if name in _NVLINK_NAMES:
            if value is not None:
                g.values["nvlink_errors"] = (g.values.get("nvlink_errors") or 0.0) + value
            return
        key, factor = _NAME_TO_KEY.get(name, ("", 1.0))
        if key in INSTANT_KEYS and key != "xid_last":
            g.values[key] = value if value is None else value * factor
    elif query == "fresh":
        if value is not None:
            g.ts = value if g.ts is None else max(g.ts, value)
    elif query in ("xid_recent", "xid_count"):
        xid = _pick(metric, roles.xid)
        if xid and xid.isdigit() and int(xid) > 0 and (value is None or value > 0):
            g.xids.add(int(xid))
    elif query == "nvlink_error_increase":
        if value is not None:
            g.values[query] = (g.values.get(query) or 0.0) + value
    elif query in WINDOW_KEYS:
        g.values[query] = value


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def summarize(verdicts: Iterable[GpuVerdict]) -> dict[Verdict, int]:
    """Count of GPUs per verdict; every verdict is a key."""
    counts = dict.fromkeys(Verdict, 0)
    for v in verdicts:
        counts[v.verdict] += 1
    return counts


@dataclass(frozen=True)
class FleetHealth:
    """The fleet's verdicts: the GPUs judged one by one, and the healthy GPUs of the nodes the fleet summary
    cleared, counted per node (65,536 rows of "healthy" help nobody, and building them was most of the run)."""

    verdicts: list[GpuVerdict]
    healthy: dict[str, HealthyGpus] = field(default_factory=dict)

    def counts(self) -> dict[Verdict, int]:
        """GPUs per verdict, the counted ones included; every verdict is a key."""
        counts = summarize(self.verdicts)
        counts[Verdict.HEALTHY] += sum(h.gpus for h in self.healthy.values())
        return counts

    @functools.cached_property
    def _by_node(self) -> dict[str, list[GpuVerdict]]:
        by_node: dict[str, list[GpuVerdict]] = {}
        for v in self.verdicts:
            by_node.setdefault(v.node, []).append(v)
        return by_node

    def node(self, name: str) -> tuple[Verdict, int]:
        """A node's worst verdict and its number of GPUs (unknown and 0 for a node in no answer)."""
        if name in self.healthy:
            return Verdict.HEALTHY, self.healthy[name].gpus
        mine = self._by_node.get(name, [])
        return worst(mine), len(mine)

    def table_rows(self) -> list[dict[str, str]]:
        """:func:`table_rows` of the GPUs judged one by one, then one row per node of counted healthy GPUs."""
        return table_rows(self.verdicts) + [
            {"node": node, "gpu": f"all {h.gpus}", "uuid": "-", "model": h.model or "-", "verdict": "healthy",
             "reasons": "-", "values": "-"}
            for node, h in sorted(self.healthy.items())
        ]  # fmt: skip


def worst(verdicts: Iterable[GpuVerdict]) -> Verdict:
    """The worst verdict (unhealthy > unknown > degraded > healthy); unknown for no verdicts at all."""
    items = list(verdicts)
    if not items:
        return Verdict.UNKNOWN
    return max((v.verdict for v in items), key=SEVERITY.__getitem__)


_TABLE_VALUE_KEYS = (
    "gpu_temp",
    "memory_temp",
    "power_usage",
    "power_limit",
    "gpu_util",
    "ecc_dbe_vol",
    "clock_event_reasons",
)
_SHORT = {
    "gpu_temp": "temp",
    "memory_temp": "memtemp",
    "power_usage": "power",
    "power_limit": "limit",
    "gpu_util": "util",
    "ecc_dbe_vol": "dbe",
    "clock_event_reasons": "clk",
}

TABLE_COLUMNS: tuple[str, ...] = ("node", "gpu", "uuid", "model", "verdict", "reasons", "values")


def table_rows(verdicts: Iterable[GpuVerdict]) -> list[dict[str, str]]:
    """One row of strings per GPU, columns :data:`TABLE_COLUMNS` (values: the main ones, short names)."""
    rows = []
    for v in verdicts:
        shown = []
        known = _known(v.values)
        for key in _TABLE_VALUE_KEYS:
            x = known.get(key)
            if x is not None:
                shown.append(f"{_SHORT[key]}={hex(int(x)) if key == 'clock_event_reasons' else _fmt(x)}")
        rows.append(
            {
                "node": v.node,
                "gpu": str(v.gpu),
                "uuid": v.uuid or "-",
                "model": v.model or "-",
                "verdict": v.verdict.value,
                "reasons": "; ".join(v.reasons) or "-",
                "values": " ".join(shown) or "-",
            }
        )
    return rows


def format_table(verdicts: Iterable[GpuVerdict]) -> str:
    """Plain-text table of :func:`table_rows` (no third-party dependency)."""
    rows = table_rows(verdicts)
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in TABLE_COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in TABLE_COLUMNS).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in TABLE_COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def verdicts_json(verdicts: Iterable[GpuVerdict]) -> str:
    """JSON array of verdicts (for ``--json``), with a summary-friendly shape."""
    return json.dumps([v.model_dump(mode="json") for v in verdicts], indent=2, sort_keys=True)
