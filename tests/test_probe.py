"""gpuforge_probe on CPU: recorded NVML readings (tests/fixtures/nvml), a fake pynvml for the reader's error
handling, the /metrics exposition over a real HTTP server, the Slurm health check. The ``real_nvml`` tests
run only where an NVIDIA driver answers (bench/device_check.sh runs them on the GPU machine)."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gpuforge.health import DCGM_METRICS, HEALTH_QUERIES, Verdict, judge_all, readings_from_query_results
from gpuforge_probe import probe as probe_mod
from gpuforge_probe.probe import (
    NvmlReader,
    Probe,
    ProbeError,
    RecordedReader,
    canonical_values,
    main,
    parse_addr,
    probe_table,
    query_results_from_exposition,
    readings_from_exposition,
    serve,
    slurm_healthcheck,
)

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"
SYNTH = FIXTURES / "h100x8_synthetic.json"
A100 = FIXTURES / "a100x2_disappearing_synthetic.json"
H200 = FIXTURES / "h200.json"
DCGM_LABELS = {"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION"}


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def series(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


# ---------------------------------------------------------------------------------------------- probe logic


def test_probe_table_on_synthetic_fixture_applies_every_rule() -> None:
    verdicts = probe_table(reader=RecordedReader(SYNTH), node="h100-node-7")
    got = {v.gpu: (v.verdict, v.reasons) for v in verdicts}
    assert got == {
        0: (Verdict.HEALTHY, []),  # its XID 79 arrives through the event stream only when serving
        1: (Verdict.UNHEALTHY, ["ECC DBE volatile 2 > 0"]),
        2: (Verdict.DEGRADED, ["row remap pending (GPU reset needed)"]),
        3: (Verdict.DEGRADED, ["GPU temp 93 °C > 87 °C", "memory temp 97 °C > 95 °C"]),
        4: (Verdict.DEGRADED, ["power 712 W > limit 700 W", "clock events 0x48: HW slowdown, HW thermal slowdown"]),
        5: (Verdict.DEGRADED, ["NVLink errors 3 > 0"]),
        6: (Verdict.UNHEALTHY, ["GPU lost (NVML: GPU is lost, fallen off the bus)"]),
        7: (Verdict.UNHEALTHY, ["row remap failure"]),
    }
    assert {v.node for v in verdicts} == {"h100-node-7"}


def test_canonical_values_convert_units() -> None:
    rec = json.loads(SYNTH.read_text())["gpus"][4]
    v = canonical_values(rec)
    assert v["power_usage"] == 712.0 and v["power_limit"] == 700.0  # mW -> W
    assert v["fb_used"] == 563.0 and v["fb_free"] == 80994.0  # bytes -> MiB
    assert v["clock_event_reasons"] == 0x48
    assert v["nvlink_errors"] == 0
    assert "temp_threshold_gpu_max" not in v  # recorded, not judged


def test_config_override_turns_gpu_degraded() -> None:
    cold = {"default": {"max_gpu_temp_c": 10}}
    verdicts = probe_table(cold, reader=RecordedReader(A100), node="n")
    assert [(v.verdict, v.reasons) for v in verdicts] == [(Verdict.DEGRADED, ["GPU temp 34 °C > 10 °C"])] * 2
    assert [v.verdict for v in probe_table(reader=RecordedReader(A100), node="n")] == [Verdict.HEALTHY] * 2


def test_unsupported_fields_are_omitted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    p = Probe(RecordedReader(A100), node="n", clock=Clock()).open()
    with caplog.at_level(logging.INFO, logger="gpuforge_probe.probe"):
        p.refresh()
        p.refresh()
    logged = [r.getMessage() for r in caplog.records if "not supported" in r.getMessage()]
    # 5 unsupported fields on each of 2 GPUs, each logged once although GPU 0 was read twice
    assert len(logged) == 10 and len(set(logged)) == 10
    assert sum("memory_temp" in m for m in logged) == 2
    names = {s.name for s in p.samples()}
    assert "DCGM_FI_DEV_MEMORY_TEMP" not in names
    assert not any("NVLINK" in n for n in names)
    assert "DCGM_FI_DEV_GPU_TEMP" in names
    (r0,) = [r for r in p.readings() if r.gpu == 0]
    assert "memory_temp" not in r0.values and "nvlink_errors" not in r0.values


def test_gpu_that_disappears_is_missing_and_its_series_dropped() -> None:
    p = Probe(RecordedReader(A100), node="n", clock=Clock()).open()
    p.refresh()
    assert {(s.labels["gpu"]) for s in p.samples() if s.name == "DCGM_FI_DEV_GPU_TEMP"} == {"0", "1"}
    p.refresh()  # second snapshot: GPU 1 gone
    assert {(s.labels["gpu"]) for s in p.samples() if s.name == "DCGM_FI_DEV_GPU_TEMP"} == {"0"}
    readings = {r.gpu: r for r in p.readings()}
    assert readings[1].present is False and readings[1].uuid.endswith("441")
    verdicts = {v.gpu: v for v in p.verdicts()}
    assert verdicts[1].verdict == Verdict.UNHEALTHY
    assert verdicts[1].reasons == ["GPU 1 missing (expected on n)"]
    assert verdicts[0].verdict == Verdict.HEALTHY


def test_expected_gpu_count_marks_unseen_indices_missing() -> None:
    verdicts = probe_table(reader=RecordedReader(A100), node="n", expected_gpus=4)
    assert [(v.gpu, v.verdict) for v in verdicts] == [
        (0, Verdict.HEALTHY),
        (1, Verdict.HEALTHY),
        (2, Verdict.UNHEALTHY),
        (3, Verdict.UNHEALTHY),
    ]


def _with_sbe(path: Path, *sbe: int) -> dict[str, Any]:
    data = json.loads(path.read_text())
    gpu = data["snapshots"][0][0]
    snaps = []
    for n in sbe:
        g = json.loads(json.dumps(gpu))
        g["values"]["ecc_volatile_corrected"] = n
        snaps.append([g])
    return {**data, "snapshots": snaps}


def test_serving_probe_judges_windowed_increases_from_its_history() -> None:
    clock = Clock()
    p = Probe(RecordedReader(_with_sbe(A100, 50_000, 50_100, 75_000)), node="n", clock=clock).open()
    p.refresh()
    # one snapshot: no window yet, the volatile total since driver load is compared (Azure NHC style)
    assert p.verdicts()[0].reasons == ["ECC SBE volatile 50000 > 10000"]
    clock.t += 60
    p.refresh()
    assert p.verdicts()[0].verdict == Verdict.HEALTHY  # +100 within the window
    clock.t += 60
    p.refresh()
    assert p.verdicts()[0].reasons == ["ECC SBE +25000 in 2h > 10000"]
    clock.t += 3 * 3600  # old samples leave the window
    p.refresh()
    assert p.readings()[0].values["ecc_sbe_increase"] == 0
    assert p.verdicts()[0].verdict == Verdict.HEALTHY


def test_xid_events_count_within_window_only() -> None:
    clock = Clock()
    p = Probe(RecordedReader(A100), node="n", clock=clock).open()
    p.refresh()
    uuid = p.readings()[0].uuid
    p.record_xid(uuid, 48)
    p.record_xid(uuid, 13)
    v = p.verdicts()[0]
    assert v.verdict == Verdict.UNHEALTHY and v.reasons == ["XID 48 (double-bit ECC error) within 2h"]
    assert p.readings()[0].values["xid_last"] == 13
    clock.t += 2 * 3600 + 1
    p.refresh()
    assert p.verdicts()[0].verdict == Verdict.HEALTHY
    assert p.readings()[0].values["xid_last"] == 13  # the last XID stays, like dcgm's gauge


# ---------------------------------------------------------------------------------------------- exposition


def test_serve_exposes_dcgm_names_and_labels_over_http_and_parses_back() -> None:
    server = serve("127.0.0.1", 0, reader=RecordedReader(SYNTH), node="h100-node-7", block=False, min_refresh_s=0)
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
        deadline = time.time() + 5
        text = scrape(server.port)
        while "DCGM_EXP_XID_ERRORS_COUNT{" not in text and time.time() < deadline:  # XID thread delivers
            time.sleep(0.05)
            text = scrape(server.port)
        found = series(text)
        for key in (
            "gpu_temp",
            "memory_temp",
            "power_usage",
            "gpu_util",
            "fb_used",
            "fb_free",
            "ecc_sbe_vol",
            "ecc_dbe_vol",
            "remap_correctable",
            "remap_uncorrectable",
            "remap_pending",
            "remap_failure",
            "clock_event_reasons",
            "pcie_link_gen",
            "pcie_link_width",
            "pcie_link_gen_max",
            "pcie_link_width_max",
            "xid_last",
        ):
            assert DCGM_METRICS[key] in found, key
        temp = {lab["gpu"]: (lab, v) for lab, v in found["DCGM_FI_DEV_GPU_TEMP"]}
        assert set(temp) == {"0", "1", "2", "3", "4", "5", "7"}  # the lost GPU 6 exports nothing
        labels, value = temp["3"]
        assert DCGM_LABELS <= set(labels)
        assert labels["device"] == "nvidia3" and labels["Hostname"] == "h100-node-7"
        assert labels["modelName"] == "NVIDIA H100 80GB HBM3" and labels["DCGM_FI_DRIVER_VERSION"] == "580.105.08"
        assert value == 93
        xid = {lab["gpu"]: (lab, v) for lab, v in found["DCGM_FI_DEV_XID_ERRORS"]}
        assert xid["0"][1] == 79 and xid["0"][0]["err_code"] == "79" and xid["1"][1] == 0
        assert [(lab["gpu"], lab["xid"], v) for lab, v in found["DCGM_EXP_XID_ERRORS_COUNT"]] == [("0", "79", 1)]
        assert found["gpuforge_probe_up"] == [({}, 1.0)]
        # the scraped text, through the fleet code path, gives the same verdicts
        verdicts = {v.gpu: v for v in judge_all(readings_from_exposition(text, {"h100-node-7": 8}))}
        assert verdicts[0].reasons == ["XID 79 (GPU has fallen off the bus) within 2h"]
        assert verdicts[1].reasons == ["ECC DBE volatile 2 > 0"]
        assert verdicts[3].reasons == ["GPU temp 93 °C > 87 °C", "memory temp 97 °C > 95 °C"]
        assert verdicts[4].verdict == Verdict.DEGRADED
        assert verdicts[6].reasons == ["GPU 6 missing (expected on h100-node-7)"]
        assert verdicts[7].reasons == ["row remap failure"]
        assert verdicts[2].verdict == verdicts[5].verdict == Verdict.DEGRADED
        state = {(lab["gpu"], lab["verdict"]): v for lab, v in found["gpuforge_gpu_verdict"]}
        assert state[("1", "unhealthy")] == 1 and state[("1", "healthy")] == 0
    finally:
        server.stop()


def test_served_values_equal_recorded_values() -> None:
    server = serve("127.0.0.1", 0, reader=RecordedReader(A100), node="n", block=False, watch_xids=False)
    try:
        readings = readings_from_exposition(scrape(server.port), {"n": None})
    finally:
        server.stop()
    recorded = json.loads(A100.read_text())["snapshots"][0]
    assert len(readings) == 2
    for r, rec in zip(readings, recorded, strict=True):
        want = canonical_values(rec)
        assert {k: v for k, v in r.values.items() if k in want} == want
        assert r.uuid == rec["uuid"] and r.model == rec["name"]


def test_disappearing_gpu_while_serving_drops_its_series() -> None:
    data = json.loads(A100.read_text())
    both, one = data["snapshots"]
    data["snapshots"] = [both, both, one]  # serve() takes the first, each scrape the next
    server = serve(
        "127.0.0.1", 0, reader=RecordedReader(data), node="n", block=False, min_refresh_s=0, watch_xids=False
    )
    try:
        first = scrape(server.port)
        second = scrape(server.port)
        assert server.probe.readings()[1].present is False
    finally:
        server.stop()
    assert {lab["gpu"] for lab, _ in series(first)["DCGM_FI_DEV_GPU_TEMP"]} == {"0", "1"}
    assert {lab["gpu"] for lab, _ in series(second)["DCGM_FI_DEV_GPU_TEMP"]} == {"0"}
    assert not any(lab["gpu"] == "1" for fam in series(second).values() for lab, _ in fam if "gpu" in lab)
    verdicts = judge_all(readings_from_exposition(second, {"n": 2}))
    assert [(v.gpu, v.verdict) for v in verdicts] == [(0, Verdict.HEALTHY), (1, Verdict.UNHEALTHY)]
    assert verdicts[1].reasons == ["GPU 1 missing (expected on n)"]


def test_exposition_shaped_like_query_answers() -> None:
    p = Probe(RecordedReader(A100), node="n", clock=Clock()).open()
    p.refresh()
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(probe_mod._Collector(p, min_refresh_s=3600))  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    results = query_results_from_exposition(text, now=123.0)
    assert set(results) <= set(HEALTH_QUERIES)
    assert len(results["fresh"]) == 2 and results["fresh"][0]["value"] == [123.0, "123.0"]
    readings = readings_from_query_results(results, {"n": 2}, 123.0)
    assert [r.age_s for r in readings] == [0.0, 0.0]


def test_serve_binds_only_given_address() -> None:
    server = serve("127.0.0.1", 0, reader=RecordedReader(A100), node="n", block=False, watch_xids=False)
    try:
        host, port = server.httpd.server_address[:2]
        assert host == "127.0.0.1" and port > 0
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:9400", ("127.0.0.1", 9400)),
        ("0.0.0.0:9400", ("0.0.0.0", 9400)),
        ("[::1]:9400", ("::1", 9400)),
        ("9400", ("127.0.0.1", 9400)),
        (":9400", ("127.0.0.1", 9400)),
    ],
)
def test_parse_addr(text: str, want: tuple[str, int]) -> None:
    assert parse_addr(text) == want


def test_parse_addr_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_addr("localhost")


# ---------------------------------------------------------------------------------------------- no driver, Slurm, CLI entry


def test_no_driver_raises_probe_error_with_one_line_message() -> None:
    reader = NvmlReader()
    try:
        reader.open()
    except ProbeError as e:
        msg = str(e)
        assert msg.startswith("no NVIDIA driver: NVML failed to initialise (")
        assert "\n" not in msg
    else:
        reader.close()
        pytest.skip("an NVIDIA driver is present here")


def test_no_driver_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ProbeError, match="no NVIDIA driver"):
        probe_table(reader=RecordedReader(A100, no_driver=True))
    code, reason = slurm_healthcheck(reader=RecordedReader(A100, no_driver=True))
    assert code == 2 and reason.startswith("gpuforge: no NVIDIA driver") and "\n" not in reason


def test_main_without_driver_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def no_driver(self: NvmlReader) -> None:
        raise ProbeError("no NVIDIA driver: NVML failed to initialise (NVML Shared Library Not Found)")

    monkeypatch.setattr(NvmlReader, "open", no_driver)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("gpuforge probe: no NVIDIA driver") and len(err.strip().splitlines()) == 1


def test_slurm_healthcheck_codes_and_reasons() -> None:
    code, reason = slurm_healthcheck(reader=RecordedReader(SYNTH), node="x")
    assert code == 1
    assert reason.startswith("gpuforge: GPU1 unhealthy: ECC DBE volatile 2 > 0; GPU6 unhealthy: GPU lost")
    assert "\n" not in reason and len(reason) <= 200
    assert slurm_healthcheck(reader=RecordedReader(A100), node="x") == (0, "gpuforge: 2 GPUs healthy")
    code, reason = slurm_healthcheck(reader=RecordedReader(A100), node="x", expected_gpus=3)
    assert (code, reason) == (1, "gpuforge: GPU2 unhealthy: GPU 2 missing (expected on x)")
    code, reason = slurm_healthcheck({"default": {"max_gpu_temp_c": 10}}, reader=RecordedReader(A100))
    assert code == 0 and reason.startswith("gpuforge: 2 GPUs ok, degraded GPU0: GPU temp 34 °C > 10 °C")
    code, _ = slurm_healthcheck(
        {"default": {"max_gpu_temp_c": 10}}, reader=RecordedReader(A100), fail_on=[Verdict.DEGRADED]
    )
    assert code == 1


def test_main_json_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cold.json"
    cfg.write_text(json.dumps({"thresholds": {"A100": {"max_gpu_temp_c": 10}}}))
    assert main(["--fixture", str(A100), "--json", "--config", str(cfg), "--node", "n"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(d["verdict"], d["reasons"]) for d in data] == [("degraded", ["GPU temp 34 °C > 10 °C"])] * 2
    assert main(["--fixture", str(SYNTH)]) == 1  # unhealthy GPUs
    assert "unhealthy" in capsys.readouterr().out
    pytest.importorskip("ruamel.yaml")  # a project dependency; absent on the bare GPU machine
    yaml_cfg = tmp_path / "cold.yaml"
    yaml_cfg.write_text("thresholds:\n  default:\n    max_gpu_temp_c: 10\n")
    assert main(["--fixture", str(A100), "--config", str(yaml_cfg)]) == 0
    assert "GPU temp 34 °C > 10 °C" in capsys.readouterr().out


def test_record_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rec.json"
    assert main(["--fixture", str(SYNTH), "--record", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["driver_version"] == "580.105.08" and len(data["gpus"]) == 8
    assert data["gpus"] == json.loads(SYNTH.read_text())["gpus"]


# ---------------------------------------------------------------------------------------------- NvmlReader with a fake pynvml


class FakeNvml:
    """Just enough of pynvml for NvmlReader: per-(gpu, function) failures are configurable."""

    NVML_SUCCESS = 0
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_UNKNOWN = 999
    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC = 0, 1, 0
    NVML_TEMPERATURE_THRESHOLD_SHUTDOWN, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 0, 1
    NVML_TEMPERATURE_THRESHOLD_MEM_MAX, NVML_TEMPERATURE_THRESHOLD_GPU_MAX = 2, 3
    NVML_FI_DEV_MEMORY_TEMP = 82
    NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL, NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL = 38, 45
    NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL, NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL = 52, 59
    NVML_FI_DEV_PCIE_REPLAY_COUNTER = 94
    NVML_VALUE_TYPE_DOUBLE, NVML_VALUE_TYPE_UNSIGNED_INT, NVML_VALUE_TYPE_UNSIGNED_LONG = 0, 1, 2
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, NVML_VALUE_TYPE_SIGNED_LONG_LONG = 3, 4
    nvmlEventTypeXidCriticalError = 8

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

        def __str__(self) -> str:
            return {3: "Not Supported", 15: "GPU is lost", 10: "Timeout"}.get(self.value, f"error {self.value}")

    def __init__(
        self,
        count: int = 2,
        fail: dict[tuple[int, str], int] | None = None,
        field_returns: dict[int, int] | None = None,
        events: list[tuple[int, int]] | None = None,
    ) -> None:
        self.count, self.fail = count, fail or {}
        self.field_returns = field_returns or {}
        self.events = list(events or [])

    def _call(self, h: int, name: str, value: Any) -> Any:
        if (h, name) in self.fail:
            raise self.NVMLError(self.fail[(h, name)])
        return value

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.0"

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return self._call(i, "handle", i)

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._call(h, "uuid", f"GPU-fake-{h}")

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H200"

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return SimpleNamespace(busId=f"00000000:{h:02X}:00.0".encode())

    def nvmlDeviceGetMinorNumber(self, h: int) -> int:
        return h

    def nvmlDeviceGetTemperature(self, h: int, s: int) -> int:
        return self._call(h, "temp", 40 + h)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._call(h, "power", 123456)

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return 700000

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=7)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=2 * 2**20, free=10 * 2**20)

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        return 0

    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple:
        return self._call(h, "remap", (1, 0, 0, 0))

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        return self._call(h, "events", 0x1)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: int) -> int:
        return 0x4

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: int) -> int:
        return 5

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: int) -> int:
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: int) -> int:
        return 16

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: int) -> int:
        return 16

    def nvmlDeviceGetTemperatureThreshold(self, h: int, kind: int) -> int:
        return [92, 90, 95, 87][kind]

    def nvmlDeviceGetFieldValues(self, h: int, ids: list[int]) -> list[Any]:
        self._call(h, "fields", None)
        out = []
        for fid in ids:
            ret = self.field_returns.get(fid, 0)
            out.append(
                SimpleNamespace(
                    nvmlReturn=ret, valueType=1 if fid == 82 else 3, value=SimpleNamespace(uiVal=38, ullVal=0)
                )
            )
        return out

    def nvmlEventSetCreate(self) -> str:
        return "set"

    def nvmlDeviceRegisterEvents(self, h: int, kinds: int, es: str) -> None:
        self._call(h, "events_reg", None)

    def nvmlEventSetWait_v2(self, es: str, ms: int) -> Any:
        if self.events:
            h, xid = self.events.pop(0)
            return SimpleNamespace(device=h, eventData=xid)
        time.sleep(0.01)
        raise self.NVMLError(self.NVML_ERROR_TIMEOUT)

    def nvmlEventSetFree(self, es: str) -> None: ...


def fake_reader(nv: FakeNvml) -> NvmlReader:
    reader = NvmlReader()
    reader._nv = nv
    return reader


def test_nvml_reader_reads_every_field() -> None:
    (rec, _) = fake_reader(FakeNvml()).snapshot()
    assert rec["uuid"] == "GPU-fake-0" and rec["name"] == "NVIDIA H200" and rec["pci_bus_id"] == "00000000:00:00.0"
    assert rec["values"]["temperature_gpu"] == 40 and rec["values"]["memory_temp"] == 38
    assert rec["values"]["remapped_rows_correctable"] == 1 and rec["values"]["remapped_rows_pending"] == 0
    assert rec["values"]["nvlink_replay_total"] == 0 and rec["values"]["temp_threshold_gpu_max"] == 87
    assert rec["unsupported"] == [] and rec["errors"] == {} and rec["lost"] is False
    v = canonical_values(rec)
    assert v["power_usage"] == 123.456 and v["fb_used"] == 2 and v["clock_event_reasons"] == 1


def test_nvml_reader_unsupported_fields_and_errors() -> None:
    nv = FakeNvml(
        fail={(0, "remap"): FakeNvml.NVML_ERROR_NOT_SUPPORTED, (0, "power"): FakeNvml.NVML_ERROR_UNKNOWN},
        field_returns={38: 3, 45: 3, 52: 3, 59: 3},
    )
    rec = fake_reader(nv).snapshot()[0]
    assert set(rec["unsupported"]) == {
        "remapped_rows",
        "nvlink_crc_flit_total",
        "nvlink_crc_data_total",
        "nvlink_replay_total",
        "nvlink_recovery_total",
    }
    assert rec["errors"] == {"power_usage_mw": "error 999"}
    assert "power_usage_mw" not in rec["values"] and "nvlink_replay_total" not in rec["values"]
    assert rec["values"]["temperature_gpu"] == 40  # the rest is still read
    p = Probe(fake_reader(nv), node="n", clock=Clock())
    p.refresh()
    names = {s.name for s in p.samples() if s.labels["gpu"] == "0"}
    assert "DCGM_FI_DEV_POWER_USAGE" not in names and "DCGM_FI_DEV_ROW_REMAP_PENDING" not in names
    assert "DCGM_FI_DEV_GPU_TEMP" in names
    assert not any("NVLINK" in n for n in names)
    names1 = {s.name for s in p.samples() if s.labels["gpu"] == "1"}
    assert {"DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_ROW_REMAP_PENDING"} <= names1


def test_nvml_reader_clock_events_fallback_for_old_drivers() -> None:
    nv = FakeNvml(fail={(0, "events"): FakeNvml.NVML_ERROR_FUNCTION_NOT_FOUND})
    rec = fake_reader(nv).snapshot()[0]
    assert rec["values"]["clocks_event_reasons"] == 0x4


def test_nvml_reader_lost_gpu_and_vanished_handle() -> None:
    nv = FakeNvml(count=3, fail={(1, "temp"): FakeNvml.NVML_ERROR_GPU_IS_LOST, (2, "handle"): 6})
    recs = fake_reader(nv).snapshot()
    assert [r["index"] for r in recs] == [0, 1]  # GPU 2's handle fails: absent
    assert recs[1]["lost"] is True
    p = Probe(fake_reader(nv), node="n", clock=Clock())
    p.refresh()
    verdicts = {v.gpu: v for v in p.verdicts()}
    assert verdicts[1].verdict == Verdict.UNHEALTHY and "GPU lost" in verdicts[1].reasons[0]
    assert {s.labels["gpu"] for s in p.samples()} == {"0"}


def test_nvml_reader_count_failure_is_probe_error() -> None:
    class Broken(FakeNvml):
        def nvmlDeviceGetCount(self) -> int:
            raise self.NVMLError(9)

    with pytest.raises(ProbeError, match="cannot count GPUs"):
        fake_reader(Broken()).snapshot()


def test_nvml_reader_xid_watch_delivers_events() -> None:
    nv = FakeNvml(events=[(1, 79), (0, 13)])
    got: list[tuple[str, int]] = []
    stop = threading.Event()
    t = threading.Thread(target=fake_reader(nv).watch_xids, args=(lambda u, x: got.append((u, x)), stop))
    t.start()
    deadline = time.time() + 5
    while len(got) < 2 and time.time() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(5)
    assert got == [("GPU-fake-1", 79), ("GPU-fake-0", 13)]
    assert not t.is_alive()


# ---------------------------------------------------------------------------------------------- recorded H200


def _smi(field: str, section: str | None = None) -> str:
    """First value of ``field`` (after the line ``section``, if given) in the nvidia-smi -q output
    recorded beside h200.json."""
    lines = (FIXTURES / "h200.nvidia-smi-q.txt").read_text().splitlines()
    if section is not None:
        lines = lines[[line.strip() for line in lines].index(section) :]
    for line in lines:
        name, sep, value = line.partition(":")
        if sep and name.strip() == field:
            return value.strip()
    raise KeyError(field)


def test_recorded_h200_is_healthy_and_matches_nvidia_smi() -> None:
    data = json.loads(H200.read_text())
    (gpu,) = data["gpus"]
    assert gpu["name"] == "NVIDIA H200" and data["driver_version"] == _smi("Driver Version")
    assert gpu["uuid"] == _smi("GPU UUID")
    raw = gpu["values"]
    # what NVML recorded agrees with nvidia-smi -q taken in the same second
    assert raw["temperature_gpu"] + int(_smi("GPU T.Limit Temp").split()[0]) == raw["temp_threshold_gpu_max"]
    assert raw["enforced_power_limit_mw"] / 1000 == float(_smi("Current Power Limit").split()[0])
    assert _smi("Pending", "Remapped Rows") == "No" and raw["remapped_rows_pending"] == 0
    assert _smi("Remapping Failure Occurred") == "No" and raw["remapped_rows_failure"] == 0
    assert int(_smi("DRAM Uncorrectable")) == raw["ecc_volatile_uncorrected"] == 0
    assert raw["pcie_link_width"] == int(_smi("Current", "Link Width").rstrip("x")) == 16
    assert raw["pcie_link_gen_max"] == int(_smi("Max", "PCIe Generation")) == 5
    assert raw["memory_temp"] == int(_smi("Memory Current Temp").split()[0])
    # the H200 defaults are the thresholds this GPU reports
    from gpuforge.health import DEFAULT_THRESHOLDS, thresholds_for

    t = thresholds_for(gpu["name"])
    assert t is DEFAULT_THRESHOLDS["H200"]
    assert (t.max_gpu_temp_c, t.max_memory_temp_c) == (raw["temp_threshold_gpu_max"], raw["temp_threshold_mem_max"])
    (v,) = probe_table(reader=RecordedReader(H200), node="vm")
    assert v.verdict == Verdict.HEALTHY and v.reasons == []
    assert 20 <= v.values["gpu_temp"] <= 90 and v.values["power_usage"] < v.values["power_limit"]
    assert v.values["ecc_dbe_vol"] == 0


def test_recorded_h200_nvlink_unsupported_is_omitted_when_served() -> None:
    assert set(json.loads(H200.read_text())["gpus"][0]["unsupported"]) == {
        "nvlink_crc_flit_total",
        "nvlink_crc_data_total",
        "nvlink_replay_total",
        "nvlink_recovery_total",
    }
    server = serve("127.0.0.1", 0, reader=RecordedReader(H200), node="vm", block=False, watch_xids=False)
    try:
        text = scrape(server.port)
    finally:
        server.stop()
    found = series(text)
    assert not any("NVLINK" in name for name in found)
    assert found["DCGM_FI_DEV_MEMORY_TEMP"][0][1] == 37
    assert found["DCGM_FI_DEV_POWER_USAGE"][0][1] == 79.3
    (r,) = readings_from_exposition(text, {"VM": 1})
    assert r.node == "VM" and r.model == "NVIDIA H200" and "nvlink_errors" not in r.values
    cold = {"H200": {"max_gpu_temp_c": 10}}
    (v,) = probe_table(cold, reader=RecordedReader(H200), node="vm")
    assert (v.verdict, v.reasons) == (Verdict.DEGRADED, ["GPU temp 36 °C > 10 °C"])


# ---------------------------------------------------------------------------------------------- real NVML


def _real_reader() -> NvmlReader:
    reader = NvmlReader()
    try:
        reader.open()
    except ProbeError as e:
        pytest.skip(f"real_nvml: {e}")
    reader.close()
    return NvmlReader()


def test_real_nvml_readings_are_sane() -> None:
    data = probe_mod.record_snapshot(_real_reader())
    assert data["gpus"], "NVML found no GPU"
    for g in data["gpus"]:
        v = canonical_values(g)
        assert not g["lost"]
        assert 20 <= v["gpu_temp"] <= 90
        assert 0 < v["power_usage"] < v["power_limit"]
        assert v["ecc_dbe_vol"] == 0
    verdicts = probe_table(reader=_real_reader())
    assert [v.verdict for v in verdicts] == [Verdict.HEALTHY] * len(data["gpus"]), verdicts


def test_real_nvml_served_over_http() -> None:
    server = serve("127.0.0.1", 0, reader=_real_reader(), node="device", block=False)
    try:
        text = scrape(server.port)
    finally:
        server.stop()
    readings = readings_from_exposition(text, {"device": None})
    assert readings and all(r.present and r.values.get("gpu_temp") for r in readings)
    assert {v.verdict for v in judge_all(readings)} == {Verdict.HEALTHY}
    labels = series(text)["DCGM_FI_DEV_GPU_TEMP"][0][0]
    assert DCGM_LABELS <= set(labels) and labels["DCGM_FI_DRIVER_VERSION"]


# ---------------------------------------------------------------------------------------------- deploy files

REPO = Path(__file__).resolve().parent.parent


def test_probe_daemonset_manifest() -> None:
    yaml = pytest.importorskip("ruamel.yaml")
    docs = list(yaml.YAML(typ="safe").load_all((REPO / "deploy" / "probe-daemonset.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Namespace", "DaemonSet", "Service", "ServiceMonitor"}
    ds, svc, sm = kinds["DaemonSet"], kinds["Service"], kinds["ServiceMonitor"]
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["gpuforge", "probe", "--serve", "0.0.0.0:9400"]
    assert "nvidia.com/gpu" not in str(container.get("resources", {}))  # takes no GPU from jobs
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    exprs = {e["key"]: (e["operator"], e["values"]) for e in terms[0]["matchExpressions"]}
    assert exprs == {
        "nvidia.com/gpu.present": ("In", ["true"]),
        "nvidia.com/gpu.deploy.dcgm-exporter": ("NotIn", ["true"]),
    }
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in container["env"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    port_name = container["ports"][0]["name"]
    assert container["ports"][0]["containerPort"] == 9400
    assert svc["spec"]["ports"][0]["name"] == sm["spec"]["endpoints"][0]["port"] == port_name
    assert {d["metadata"].get("namespace") for d in (ds, svc, sm)} == {kinds["Namespace"]["metadata"]["name"]}


@pytest.fixture
def slurm_env(tmp_path: Path) -> dict[str, Any]:
    """A fake `scontrol` on PATH that logs its arguments and shows a configurable node line."""
    import os
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir()
    log_file, node_file = tmp_path / "scontrol.log", tmp_path / "node.txt"
    node_file.write_text("NodeName=gn1 Arch=x86_64 Gres=gpu:a100:2(S:0) State=IDLE ThreadsPerCore=1 Reason=none\n")
    (bindir / "scontrol").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = show ]; then cat "{node_file}"; exit 0; fi\n'
        f'printf "%s|" "$@" >> "{log_file}"; echo >> "{log_file}"\n'
    )
    (bindir / "scontrol").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "SLURMD_NODENAME": "gn1",
        "PYTHONPATH": str(REPO),
        "GPUFORGE_CMD": f"{sys.executable} -m gpuforge_probe --fixture {A100}",
    }
    return {"env": env, "log": log_file, "node": node_file}


def run_hc(slurm_env: dict[str, Any], **env: str) -> tuple[int, list[str]]:
    import subprocess

    proc = subprocess.run(
        ["bash", str(REPO / "deploy" / "slurm-healthcheck.sh")],
        env={**slurm_env["env"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = slurm_env["log"].read_text().splitlines() if slurm_env["log"].exists() else []
    return proc.returncode, log


def test_slurm_script_drains_with_gpuforge_reason(slurm_env: dict[str, Any]) -> None:
    import sys

    rc, calls = run_hc(slurm_env, GPUFORGE_CMD=f"{sys.executable} -m gpuforge_probe --fixture {SYNTH}")
    assert rc == 1
    (call,) = calls
    assert call.startswith("update|NodeName=gn1|State=DRAIN|Reason=gpuforge: GPU1 unhealthy: ECC DBE volatile 2 > 0;")
    assert len(call.split("Reason=", 1)[1].rstrip("|")) <= 200


def test_slurm_script_healthy_leaves_node_alone(slurm_env: dict[str, Any]) -> None:
    assert run_hc(slurm_env) == (0, [])


def test_slurm_script_resumes_only_its_own_drain(slurm_env: dict[str, Any]) -> None:
    slurm_env["node"].write_text(
        "NodeName=gn1 State=IDLE+DRAIN Partitions=gpu Reason=gpuforge: GPU1 unhealthy: "
        "ECC DBE volatile 2 > 0 [root@2026-11-28T21:55:00]\n"
    )
    assert run_hc(slurm_env) == (0, ["update|NodeName=gn1|State=RESUME|"])
    slurm_env["log"].unlink()
    slurm_env["node"].write_text("NodeName=gn1 State=IDLE+DRAIN Reason=maintenance [admin@2026-11-28T21:55:00]\n")
    assert run_hc(slurm_env) == (0, [])


def test_slurm_script_expected_gpus_from_gres(slurm_env: dict[str, Any]) -> None:
    slurm_env["node"].write_text("NodeName=gn1 Gres=gpu:a100:4(S:0-1) State=IDLE Reason=none\n")
    rc, calls = run_hc(slurm_env, GPUFORGE_EXPECTED_GPUS="gres")
    assert rc == 1
    assert calls == [
        "update|NodeName=gn1|State=DRAIN|Reason=gpuforge: GPU2 unhealthy: GPU 2 missing (expected on "
        "gn1); GPU3 unhealthy: GPU 3 missing (expected on gn1)|"
    ]


def test_slurm_script_probe_failure_and_timeout(slurm_env: dict[str, Any]) -> None:
    boom = slurm_env["log"].parent / "boom.sh"
    boom.write_text("#!/bin/sh\necho starting\necho boom\nexit 3\n")
    boom.chmod(0o755)
    rc, calls = run_hc(slurm_env, GPUFORGE_CMD=str(boom))
    assert rc == 1 and calls == ["update|NodeName=gn1|State=DRAIN|Reason=gpuforge: probe failed (rc 3): boom|"]
    slurm_env["log"].unlink()
    hang = slurm_env["log"].parent / "hang.sh"
    hang.write_text("#!/bin/sh\nsleep 5\n")
    hang.chmod(0o755)
    rc, calls = run_hc(slurm_env, GPUFORGE_CMD=str(hang), GPUFORGE_TIMEOUT="1")
    assert rc == 1
    assert calls == ["update|NodeName=gn1|State=DRAIN|Reason=gpuforge: GPU health check timed out after 1 s|"]


# ---------------------------------------------------------------------------------------------- real Prometheus


def test_health_queries_on_a_real_prometheus_scraping_the_probe(tmp_path: Path) -> None:
    """The fleet path end to end: Prometheus scrapes the probe (serving a fixture), every HEALTH_QUERY runs
    through prometheus-api-client, and the verdicts match the fixture's faults. Skipped without a
    `prometheus` binary on PATH."""
    import shutil
    import socket
    import subprocess

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary on PATH")
    from prometheus_api_client import PrometheusConnect

    server = serve("127.0.0.1", 0, reader=RecordedReader(SYNTH), node="H100-Node-7", block=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        prom_port = s.getsockname()[1]
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\nscrape_configs:\n- job_name: gpuforge-probe\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        prom = PrometheusConnect(url=f"http://127.0.0.1:{prom_port}", disable_ssl=True)
        deadline = time.time() + 30
        results: dict[str, list[dict]] = {}
        while time.time() < deadline:
            try:
                results = {name: prom.custom_query(query) for name, query in HEALTH_QUERIES.items()}
            except Exception:  # Prometheus still starting
                results = {}
            if results and len(results["fresh"]) == 7 and results["ecc_sbe_increase"] and results["xid_recent"]:
                break
            time.sleep(0.5)
        assert results, "Prometheus never answered"
        verdicts = {v.gpu: v for v in judge_all(readings_from_query_results(results, {"h100-node-7": 8}, time.time()))}
    finally:
        proc.terminate()
        proc.wait(10)
        server.stop()
    assert {v.node for v in verdicts.values()} == {"h100-node-7"}
    assert verdicts[0].reasons == ["XID 79 (GPU has fallen off the bus) within 2h"]
    assert verdicts[1].reasons == ["ECC DBE volatile 2 > 0"]
    assert verdicts[2].reasons == ["row remap pending (GPU reset needed)"]
    assert verdicts[3].reasons == ["GPU temp 93 °C > 87 °C", "memory temp 97 °C > 95 °C"]
    assert verdicts[4].verdict == Verdict.DEGRADED and verdicts[5].reasons == ["NVLink errors 3 > 0"]
    assert verdicts[6].reasons == ["GPU 6 missing (expected on h100-node-7)"]  # lost: exports nothing
    assert verdicts[7].reasons == ["row remap failure"]
    assert verdicts[0].values["ecc_sbe_increase"] == 0


def test_cli_probe_expects_the_configured_gpu_count_of_its_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`gpuforge probe --config --node`: the node's gpu_count in the config is what it must have, as for the
    fleet check; --expected-gpus still wins. (The recorded A100 node has 2 GPUs.)"""
    from click.testing import CliRunner

    from gpuforge_cli.app import app
    from gpuforge_probe import probe as gpu_probe

    monkeypatch.setattr(gpu_probe, "NvmlReader", lambda: RecordedReader(A100))
    cfg = tmp_path / "config.yml"
    cfg.write_text(
        "k8s_cluster_nodes:\n"
        '  - { ip: "198.51.100.8", role: [control-plane, etcd] }\n'
        '  - { ip: "198.51.100.9", name: n, role: [gpu-worker, schedulable], gpu_count: 4 }\n'
    )
    run = CliRunner().invoke(app, ["probe", "--config", str(cfg), "--node", "n", "--json"])
    assert run.exit_code == 1, run.output
    assert [(d["gpu"], d["verdict"]) for d in json.loads(run.output)] == [
        (0, "healthy"),
        (1, "healthy"),
        (2, "unhealthy"),
        (3, "unhealthy"),
    ]
    run = CliRunner().invoke(app, ["probe", "--config", str(cfg), "--node", "n", "--expected-gpus", "2"])
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(app, ["probe", "--config", str(cfg), "--node", "other"])
    assert run.exit_code == 0, run.output
