"""gpuforge.health: thresholds, every judge() rule, the fleet queries and their parsing, summaries."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from pydantic import ValidationError

from gpuforge import health
from gpuforge.health import (
    DEFAULT_FATAL_XIDS,
    DEFAULT_THRESHOLDS,
    HEALTH_QUERIES,
    GpuReading,
    Thresholds,
    Verdict,
    format_table,
    health_queries,
    judge,
    judge_all,
    model_family,
    readings_from_query_results,
    resolve_thresholds,
    summarize,
    table_rows,
    thresholds_for,
    verdicts_json,
    worst,
)
from tests.promtool import PROMTOOL, evaluate

NOW = 1_800_000_000.0
H100 = "NVIDIA H100 80GB HBM3"
T = DEFAULT_THRESHOLDS["H100"]


def ok_values(**over: float | None) -> dict[str, float | None]:
    values: dict[str, float | None] = {
        "gpu_temp": 35.0,
        "memory_temp": 33.0,
        "power_usage": 120.0,
        "power_limit": 700.0,
        "gpu_util": 0.0,
        "ecc_sbe_vol": 0.0,
        "ecc_dbe_vol": 0.0,
        "remap_correctable": 0.0,
        "remap_uncorrectable": 0.0,
        "remap_pending": 0.0,
        "remap_failure": 0.0,
        "clock_event_reasons": 1.0,
        "pcie_link_gen": 5.0,
        "pcie_link_gen_max": 5.0,
        "pcie_link_width": 16.0,
        "pcie_link_width_max": 16.0,
    }
    values.update(over)
    return values


def reading(
    values: dict[str, float | None] | None = None,
    *,
    xids: list[int] | None = None,
    age_s: float | None = 5.0,
    present: bool = True,
    model: str = H100,
) -> GpuReading:
    return GpuReading(
        node="node-a",
        gpu=3,
        uuid="GPU-3",
        model=model,
        values=ok_values() if values is None else values,
        age_s=age_s,
        present=present,
        xids=xids or [],
    )


# ---------------------------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H100 NVL", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA GH200 480GB", "default"),  # not an H200
        ("NVIDIA H20", "default"),
        ("Tesla T4", "default"),
        ("", "default"),
        (None, "default"),
    ],
)
def test_model_family(name: str | None, family: str) -> None:
    assert model_family(name) == family


def test_default_thresholds_cover_families_and_fatal_xids() -> None:
    assert set(DEFAULT_THRESHOLDS) == {"default", "H100", "H200", "A100"}
    required = {48, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120}
    for t in DEFAULT_THRESHOLDS.values():
        assert required <= set(t.fatal_xids)
        assert t.throttle_mask == 0x8 | 0x20 | 0x40 | 0x80
        assert t.window_s == 7200
    assert DEFAULT_THRESHOLDS["H100"].max_gpu_temp_c == 87
    assert DEFAULT_THRESHOLDS["A100"].max_power_w == 400


def test_thresholds_forbid_unknown_fields_and_bad_windows() -> None:
    with pytest.raises(ValidationError):
        Thresholds(max_gpu_temp=80)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        Thresholds(xid_window="two hours")
    assert Thresholds(xid_window="30m").window_s == 1800
    assert Thresholds(xid_window="1d").window_s == 86400


def test_thresholds_for_lookup_order() -> None:
    assert thresholds_for(H100) is DEFAULT_THRESHOLDS["H100"]
    assert thresholds_for("Tesla T4") is DEFAULT_THRESHOLDS["default"]
    table = resolve_thresholds({"h100": {"max_gpu_temp_c": 75}, H100.lower(): {"max_gpu_temp_c": 70}})
    assert thresholds_for(H100, table).max_gpu_temp_c == 70  # exact model name (any case) beats family
    assert thresholds_for("NVIDIA H100 PCIe", table).max_gpu_temp_c == 75  # "h100" is the H100 family
    assert health.exact_model_keys(table) == [H100.lower()]


def test_resolve_thresholds_layers_default_then_family() -> None:
    table = resolve_thresholds(
        {"default": {"stale_after_s": 300, "max_gpu_temp_c": 80}, "H200": {"max_gpu_temp_c": 10}}
    )
    # The "default" section is laid over every family, then the family's own.
    assert thresholds_for("NVIDIA H200", table).max_gpu_temp_c == 10
    assert thresholds_for("NVIDIA H200", table).stale_after_s == 300
    assert thresholds_for(H100, table).max_gpu_temp_c == 80
    assert thresholds_for(H100, table).max_power_w == 700  # family value kept
    assert thresholds_for("NVIDIA A100-SXM4-80GB", table).max_power_w == 400
    assert thresholds_for("Tesla T4", table).max_gpu_temp_c == 80
    assert resolve_thresholds(None) == DEFAULT_THRESHOLDS
    with pytest.raises(ValidationError):
        resolve_thresholds({"H100": {"no_such_field": 1}})
    with pytest.raises(ValueError):
        resolve_thresholds({"H100": 90})  # type: ignore[dict-item]


def test_config_sections_count_only_the_fields_they_set() -> None:
    # The config validates each section as a whole Thresholds: its unset fields must not reset a family's limits
    # (an H100 judged at 85 °C with no power ceiling because "default" set only stale_after_s).
    table = resolve_thresholds({"default": Thresholds(stale_after_s=300), "A100": Thresholds(max_power_w=350)})
    assert thresholds_for(H100, table).max_gpu_temp_c == 87 and thresholds_for(H100, table).max_power_w == 700
    assert thresholds_for(H100, table).stale_after_s == 300
    assert thresholds_for("NVIDIA A100-SXM4-80GB", table).max_power_w == 350


def test_threshold_override_per_model_changes_verdict() -> None:
    table = resolve_thresholds({"H200": {"max_gpu_temp_c": 10}})
    h200 = reading(model="NVIDIA H200")
    h100 = reading(model=H100)
    v200 = judge(h200, thresholds_for(h200.model, table))
    v100 = judge(h100, thresholds_for(h100.model, table))
    assert v200.verdict == Verdict.DEGRADED
    assert v200.reasons == ["GPU temp 35 °C > 10 °C"]
    assert v100.verdict == Verdict.HEALTHY


# ---------------------------------------------------------------------------------------------- judge rules


def test_healthy_baseline() -> None:
    v = judge(reading(), T)
    assert v.verdict == Verdict.HEALTHY
    assert v.reasons == []
    assert (v.node, v.gpu, v.uuid, v.model) == ("node-a", 3, "GPU-3", H100)
    assert v.values["gpu_temp"] == 35


@pytest.mark.parametrize("xid", DEFAULT_FATAL_XIDS)
def test_each_fatal_xid_is_unhealthy(xid: int) -> None:
    v = judge(reading(xids=[xid]), T)
    assert v.verdict == Verdict.UNHEALTHY
    assert any(r.startswith(f"XID {xid}") and r.endswith("within 2h") for r in v.reasons)


def test_xid_79_is_named_fallen_off_the_bus() -> None:
    v = judge(reading(xids=[79]), T)
    assert v.reasons == ["XID 79 (GPU has fallen off the bus) within 2h"]


@pytest.mark.parametrize("xid", [13, 31, 43, 45])
def test_application_xids_are_not_fatal(xid: int) -> None:
    assert judge(reading(xids=[xid]), T).verdict == Verdict.HEALTHY


def test_fatal_xid_list_is_configurable() -> None:
    t = T.model_copy(update={"fatal_xids": [13]})
    assert judge(reading(xids=[13]), t).verdict == Verdict.UNHEALTHY
    assert judge(reading(xids=[79]), t).verdict == Verdict.HEALTHY


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"ecc_dbe_vol": 2.0}, "ECC DBE volatile 2 > 0"),
        ({"remap_failure": 1.0}, "row remap failure"),
        ({"remap_uncorrectable": 513.0}, "uncorrectable remapped rows 513 > 512"),
        ({"gpu_lost": 1.0}, "GPU lost (NVML: GPU is lost, fallen off the bus)"),
    ],
)
def test_unhealthy_rules(over: dict[str, float], reason: str) -> None:
    v = judge(reading(ok_values(**over)), T)
    assert v.verdict == Verdict.UNHEALTHY
    assert v.reasons == [reason]


def test_uncorrectable_remapped_rows_at_limit_is_not_unhealthy() -> None:
    assert judge(reading(ok_values(remap_uncorrectable=512.0)), T).verdict == Verdict.HEALTHY


def test_missing_gpu_is_unhealthy() -> None:
    v = judge(reading({}, present=False, age_s=None), T)
    assert v.verdict == Verdict.UNHEALTHY
    assert v.reasons == ["GPU 3 missing (expected on node-a)"]


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"remap_pending": 1.0}, "row remap pending (GPU reset needed)"),
        ({"remap_correctable_increase": 2.0}, "correctable remapped rows +2 in 2h > 1"),
        ({"ecc_sbe_increase": 10001.0}, "ECC SBE +10001 in 2h > 10000"),
        ({"ecc_sbe_vol": 10001.0}, "ECC SBE volatile 10001 > 10000"),
        ({"gpu_temp": 93.0}, "GPU temp 93 °C > 87 °C"),
        ({"gpu_temp": 87.5}, "GPU temp 87.5 °C > 87 °C"),
        ({"memory_temp": 96.0}, "memory temp 96 °C > 95 °C"),
        ({"power_usage": 712.0}, "power 712 W > limit 700 W"),
        ({"power_limit": None, "power_usage": 701.0}, "power 701 W > 700 W"),
        ({"clock_event_reasons": 0x8}, "clock events 0x8: HW slowdown"),
        ({"clock_event_reasons": 0x20}, "clock events 0x20: SW thermal slowdown"),
        ({"clock_event_reasons": 0x40}, "clock events 0x40: HW thermal slowdown"),
        ({"clock_event_reasons": 0x80}, "clock events 0x80: HW power brake slowdown"),
        ({"clock_event_reasons": 0x48}, "clock events 0x48: HW slowdown, HW thermal slowdown"),
        ({"nvlink_error_increase": 1.0}, "NVLink errors +1 in 2h > 0"),
        ({"nvlink_errors": 4.0}, "NVLink errors 4 > 0"),
    ],
)
def test_degraded_rules(over: dict[str, float | None], reason: str) -> None:
    v = judge(reading(ok_values(**over)), T)
    assert v.verdict == Verdict.DEGRADED
    assert v.reasons == [reason]


@pytest.mark.parametrize(
    "over",
    [
        {"gpu_temp": 87.0},  # at the threshold, not above
        {"memory_temp": 95.0},
        {"power_usage": 700.0},
        {"remap_correctable_increase": 1.0},
        {"remap_correctable": 40.0},  # lifetime total, not a burst
        {"ecc_sbe_increase": 10.0, "ecc_sbe_vol": 50000.0},  # the window wins over the total
        {"nvlink_error_increase": 0.0, "nvlink_errors": 12.0},
        {"clock_event_reasons": 0x1},  # idle
        {"clock_event_reasons": 0x4},  # SW power cap
        {"clock_event_reasons": 0x5},
        {"pcie_link_width": 8.0},  # PCIe width is opt-in
        {"pcie_link_gen": 1.0},  # idle GPUs lower the generation
    ],
)
def test_values_that_stay_healthy(over: dict[str, float]) -> None:
    v = judge(reading(ok_values(**over)), T)
    assert v.verdict == Verdict.HEALTHY, v.reasons


def test_power_fraction_and_absolute_ceiling() -> None:
    t = T.model_copy(update={"max_power_fraction": 0.9})
    assert judge(reading(ok_values(power_usage=640.0)), t).reasons == ["power 640 W > limit 630 W"]
    no_ceiling = DEFAULT_THRESHOLDS["default"]
    assert no_ceiling.max_power_w is None
    assert judge(reading(ok_values(power_usage=5000.0, power_limit=None)), no_ceiling).verdict == Verdict.HEALTHY


def test_pcie_width_rule_when_enabled() -> None:
    t = T.model_copy(update={"pcie_width_degraded": True})
    v = judge(reading(ok_values(pcie_link_width=8.0)), t)
    assert (v.verdict, v.reasons) == (Verdict.DEGRADED, ["PCIe link width x8 < x16"])


def test_throttle_mask_is_configurable() -> None:
    t = T.model_copy(update={"throttle_mask": 0x4})
    assert judge(reading(ok_values(clock_event_reasons=0x4)), t).verdict == Verdict.DEGRADED
    assert judge(reading(ok_values(clock_event_reasons=0x8)), t).verdict == Verdict.HEALTHY


def test_several_degradations_are_all_reported() -> None:
    v = judge(reading(ok_values(gpu_temp=90.0, remap_pending=1.0, clock_event_reasons=0x40)), T)
    assert v.verdict == Verdict.DEGRADED
    assert len(v.reasons) == 3


def test_unhealthy_beats_degraded() -> None:
    v = judge(reading(ok_values(gpu_temp=99.0, ecc_dbe_vol=1.0)), T)
    assert v.verdict == Verdict.UNHEALTHY
    assert v.reasons == ["ECC DBE volatile 1 > 0"]


@pytest.mark.parametrize(
    ("values", "age", "reason"),
    [
        ({}, 5.0, "no GPU metrics"),
        ({"gpu_temp": None, "power_usage": float("nan")}, 5.0, "no GPU metrics"),
        ({"xid_last": 13.0}, 5.0, "no GPU metrics"),
        (None, None, "no freshness timestamp for GPU metrics"),
        (None, 121.0, "metrics stale: age 121 s > 120 s"),
        (None, 3600.0, "metrics stale: age 3600 s > 120 s"),
    ],
)
def test_absent_or_stale_is_unknown_never_healthy(values: dict | None, age: float | None, reason: str) -> None:
    v = judge(reading(values, age_s=age), T)
    assert v.verdict == Verdict.UNKNOWN
    assert v.reasons == [reason]


def test_stale_bad_values_do_not_degrade_but_fatal_evidence_still_counts() -> None:
    stale_hot = judge(reading(ok_values(gpu_temp=99.0), age_s=600), T)
    assert stale_hot.verdict == Verdict.UNKNOWN
    stale_fatal = judge(reading(ok_values(), age_s=600, xids=[79]), T)
    assert stale_fatal.verdict == Verdict.UNHEALTHY
    no_metrics_fatal = judge(reading({}, age_s=None, xids=[48]), T)
    assert no_metrics_fatal.verdict == Verdict.UNHEALTHY


def test_judge_all_uses_each_models_thresholds() -> None:
    hot_for_a100 = ok_values(gpu_temp=86.0)
    a100 = reading(hot_for_a100, model="NVIDIA A100-SXM4-80GB")
    h100 = reading(hot_for_a100, model=H100)
    assert [v.verdict for v in judge_all([a100, h100])] == [Verdict.DEGRADED, Verdict.HEALTHY]


# ---------------------------------------------------------------------------------------------- queries


def test_queries_are_fixed_fleet_wide_and_windowed() -> None:
    assert len(HEALTH_QUERIES) <= 10
    assert set(HEALTH_QUERIES) == {
        "values",
        "fresh",
        "xid_recent",
        "xid_count",
        "ecc_sbe_increase",
        "remap_correctable_increase",
        "nvlink_error_increase",
    }
    xid = HEALTH_QUERIES["xid_recent"]
    assert 'max_over_time(DCGM_FI_DEV_XID_ERRORS{err_code!=""}[2h]) > 0' in xid  # per XID value: exact
    assert 'DCGM_FI_DEV_XID_ERRORS{err_code=""}' in xid and "[2h:1m]" in xid and "offset 2h" in xid  # fallback
    assert "max_over_time(DCGM_EXP_XID_ERRORS_COUNT[2h])" in HEALTH_QUERIES["xid_count"]
    assert HEALTH_QUERIES["fresh"].startswith("timestamp(")
    for name in (
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "DCGM_FI_DEV_ROW_REMAP_PENDING",
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
    ):
        assert name in HEALTH_QUERIES["values"]
    short = health_queries("30m")
    assert "[30m:1m]" in short["xid_recent"] and "offset 30m" in short["xid_recent"]
    with pytest.raises(ValueError):
        health_queries("2 hours")


def _series(name: str | None, labels: dict[str, str], value: float, ts: float = NOW) -> dict:
    metric = dict(labels)
    if name:
        metric["__name__"] = name
    return {"metric": metric, "value": [ts, repr(float(value))]}


def gpu_labels(node: str, gpu: int, host_label: str = "Hostname") -> dict[str, str]:
    return {
        "gpu": str(gpu),
        "UUID": f"GPU-{node}-{gpu}",
        "device": f"nvidia{gpu}",
        "modelName": H100,
        host_label: node,
        "pci_bus_id": f"00000000:{gpu:02x}:00.0",
        "DCGM_FI_DRIVER_VERSION": "580.105.08",
        "instance": "10.0.0.1:9400",
        "job": "nvidia-dcgm-exporter",
        "pod": "nvidia-dcgm-exporter-abcde",
    }


def synthetic_fleet(nodes: int, gpus_per_node: int, *, faults: dict | None = None) -> dict[str, list[dict]]:
    """Instant-query answers for a fleet, in prometheus-api-client's custom_query shape. ``faults`` maps
    (node, gpu) -> {"values": {metric: value}, "xid": n, "stale": True, "drop": True}."""
    faults = faults or {}
    metrics = {
        "DCGM_FI_DEV_GPU_TEMP": 35,
        "DCGM_FI_DEV_MEMORY_TEMP": 33,
        "DCGM_FI_DEV_POWER_USAGE": 120.5,
        "DCGM_FI_DEV_GPU_UTIL": 0,
        "DCGM_FI_DEV_FB_USED": 563,
        "DCGM_FI_DEV_FB_FREE": 80994,
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 0,
        "DCGM_FI_DEV_ROW_REMAP_FAILURE": 0,
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": 0,
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": 0,
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": 1,
    }
    results: dict[str, list[dict]] = {name: [] for name in HEALTH_QUERIES}
    for n in range(nodes):
        node = f"gpu-node-{n:04d}"
        for g in range(gpus_per_node):
            fault = faults.get((node, g), {})
            if fault.get("drop"):
                continue
            labels = gpu_labels(node, g)
            for name, value in {**metrics, **fault.get("values", {})}.items():
                results["values"].append(_series(name, labels, value))
            ts = NOW - (600 if fault.get("stale") else 7)
            results["fresh"].append(_series(None, labels, ts))
            results["ecc_sbe_increase"].append(_series(None, labels, fault.get("sbe", 0)))
            if "xid" in fault:
                results["xid_recent"].append(
                    _series(None, {**labels, "xid": str(fault["xid"]), "err_code": str(fault["xid"])}, 1)
                )
    return results


@pytest.mark.parametrize(("nodes", "per_node"), [(1, 2), (250, 8)])
def test_same_queries_serve_2_and_2000_gpus(nodes: int, per_node: int) -> None:
    last = f"gpu-node-{nodes - 1:04d}"
    faults = {
        ("gpu-node-0000", 1): {"xid": 79},
        (last, 0): {"values": {"DCGM_FI_DEV_GPU_TEMP": 95}},
    }
    if nodes > 1:
        faults[("gpu-node-0042", 5)] = {"drop": True}
        faults[("gpu-node-0099", 2)] = {"stale": True}
        faults[("gpu-node-0100", 7)] = {"values": {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 3}}
        faults[("gpu-node-0200", 0)] = {"sbe": 20000}
    results = synthetic_fleet(nodes, per_node, faults=faults)
    assert set(results) == set(HEALTH_QUERIES)  # one answer per query, whatever the fleet size
    expected = {f"gpu-node-{n:04d}": per_node for n in range(nodes)}
    readings = readings_from_query_results(results, expected, NOW)
    assert len(readings) == nodes * per_node
    verdicts = {(v.node, v.gpu): v for v in judge_all(readings)}
    assert verdicts[("gpu-node-0000", 1)].verdict == Verdict.UNHEALTHY
    assert "XID 79" in verdicts[("gpu-node-0000", 1)].reasons[0]
    assert verdicts[(last, 0)].verdict == Verdict.DEGRADED
    counts = summarize(verdicts.values())
    if nodes > 1:
        assert verdicts[("gpu-node-0042", 5)].reasons == ["GPU 5 missing (expected on gpu-node-0042)"]
        assert verdicts[("gpu-node-0099", 2)].verdict == Verdict.UNKNOWN
        assert verdicts[("gpu-node-0100", 7)].reasons == ["ECC DBE volatile 3 > 0"]
        assert verdicts[("gpu-node-0200", 0)].reasons == ["ECC SBE +20000 in 2h > 10000"]
        assert counts == {Verdict.HEALTHY: 1994, Verdict.DEGRADED: 2, Verdict.UNHEALTHY: 3, Verdict.UNKNOWN: 1}
    else:
        assert counts == {Verdict.HEALTHY: 0, Verdict.DEGRADED: 1, Verdict.UNHEALTHY: 1, Verdict.UNKNOWN: 0}
    r = next(r for r in readings if (r.node, r.gpu) == ("gpu-node-0000", 0))
    assert r.uuid == "GPU-gpu-node-0000-0" and r.model == H100 and r.age_s == pytest.approx(7)
    assert r.values["power_usage"] == 120.5 and r.values["clock_event_reasons"] == 1


@pytest.mark.parametrize(
    "host_label", ["Hostname", "hostname", "HOSTNAME", "exported_Hostname", "exported_hostname", "node"]
)
def test_node_label_variants_and_case(host_label: str) -> None:
    labels = gpu_labels("Node-A.Example", 0, host_label=host_label)
    results = {"values": [_series("DCGM_FI_DEV_GPU_TEMP", labels, 40)], "fresh": [_series(None, labels, NOW)]}
    readings = readings_from_query_results(results, {"node-a.example": 1}, NOW)
    assert [(r.node, r.gpu, r.present) for r in readings] == [("node-a.example", 0, True)]
    assert readings[0].values == {"gpu_temp": 40.0}
    assert judge(readings[0], T).verdict == Verdict.HEALTHY


def test_series_of_one_gpu_with_differently_cased_host_labels_merge() -> None:
    a = gpu_labels("NODE-A", 0, host_label="Hostname")
    b = gpu_labels("node-a", 0, host_label="hostname")
    results = {
        "values": [_series("DCGM_FI_DEV_GPU_TEMP", a, 40), _series("DCGM_FI_DEV_POWER_USAGE", b, 99)],
        "fresh": [_series(None, a, NOW - 30), _series(None, b, NOW - 3)],
    }
    readings = readings_from_query_results(results, {}, NOW)
    assert len(readings) == 1
    assert readings[0].values == {"gpu_temp": 40.0, "power_usage": 99.0}
    assert readings[0].age_s == pytest.approx(3)  # the freshest sample counts


def test_series_without_node_label_are_ignored() -> None:
    labels = gpu_labels("x", 0)
    del labels["Hostname"]
    results = {"values": [_series("DCGM_FI_DEV_GPU_TEMP", labels, 40)]}
    assert readings_from_query_results(results, {}, NOW) == []


def test_expected_nodes_without_series_are_unknown() -> None:
    readings = readings_from_query_results({}, {"silent-8": 8, "silent-unknown": None}, NOW)
    assert [(r.node, r.gpu) for r in readings] == [("silent-8", i) for i in range(8)] + [("silent-unknown", 0)]
    verdicts = judge_all(readings)
    assert {v.verdict for v in verdicts} == {Verdict.UNKNOWN}
    assert verdicts[0].reasons == ["no GPU metrics from the node at all (dcgm-exporter down or not scraped)"]


def test_all_stale_node_is_unknown_for_every_gpu() -> None:
    results = synthetic_fleet(1, 4, faults={("gpu-node-0000", g): {"stale": True} for g in range(4)})
    verdicts = judge_all(readings_from_query_results(results, {"gpu-node-0000": 4}, NOW))
    assert [v.verdict for v in verdicts] == [Verdict.UNKNOWN] * 4
    assert verdicts[0].reasons == ["metrics stale: age 600 s > 120 s"]


def test_missing_gpus_and_unexpected_extra_gpus() -> None:
    results = synthetic_fleet(1, 3)
    readings = readings_from_query_results(results, {"gpu-node-0000": 5}, NOW)
    assert [(r.gpu, r.present) for r in readings] == [(0, True), (1, True), (2, True), (3, False), (4, False)]
    # fewer expected than reported: extra GPUs still judged; unknown count: no missing GPUs invented
    assert len(readings_from_query_results(results, {"gpu-node-0000": 2}, NOW)) == 3
    assert all(r.present for r in readings_from_query_results(results, {"gpu-node-0000": None}, NOW))


def test_increase_of_a_vanished_gpu_does_not_make_it_present() -> None:
    """A GPU gone from the exporter keeps its windowed increases for the whole window: still missing."""
    results = synthetic_fleet(1, 2, faults={("gpu-node-0000", 1): {"drop": True}})
    gone = gpu_labels("gpu-node-0000", 1)
    results["ecc_sbe_increase"].append(_series(None, gone, 50000))
    results["nvlink_error_increase"] = [_series(None, {**gone, "gpu": ""}, 3)]  # known only by UUID
    results["xid_recent"] = [_series(None, {**gone, "xid": "79"}, 1)]
    kept, lost = readings_from_query_results(
        {k: v for k, v in results.items() if k != "xid_recent"}, {"gpu-node-0000": 2}, NOW
    )
    assert (kept.present, lost.present, lost.values) == (True, False, {})
    assert judge(lost, T).verdict == Verdict.UNHEALTHY
    # its XIDs still count: an XID series does make the GPU appear (with the fatal XID as the reason)
    _, lost = readings_from_query_results(results, {"gpu-node-0000": 2}, NOW)
    assert lost.xids == [79] and "XID 79" in judge(lost, T).reasons[0]


def test_xid_sources_and_zero_values() -> None:
    labels = gpu_labels("n", 0)
    results = {
        "values": [_series("DCGM_FI_DEV_GPU_TEMP", labels, 40)],
        "fresh": [_series(None, labels, NOW)],
        "xid_recent": [_series(None, {**labels, "xid": "0"}, 1), _series(None, {**labels, "xid": "13"}, 1)],
        "xid_count": [
            _series(None, {**labels, "xid": "48", "window_size_in_ms": "300000"}, 2),
            _series(None, {**labels, "xid": "95"}, 0),
        ],
    }
    (r,) = readings_from_query_results(results, {}, NOW)
    assert r.xids == [13, 48]
    assert judge(r, T).reasons == ["XID 48 (double-bit ECC error) within 2h"]


def test_nvlink_totals_summed_and_per_link_series_attached_by_uuid() -> None:
    labels = gpu_labels("n", 0)
    link = {"Hostname": "n", "gpu_uuid": labels["UUID"], "nvlink": "3", "model_name": H100}
    results = {
        "values": [
            _series("DCGM_FI_DEV_GPU_TEMP", labels, 40),
            _series("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", labels, 2),
            _series("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", labels, 1),
        ],
        "fresh": [_series(None, labels, NOW)],
        "nvlink_error_increase": [_series(None, link, 4), _series(None, {**link, "nvlink": "5"}, 1)],
    }
    (r,) = readings_from_query_results(results, {}, NOW)
    assert r.values["nvlink_errors"] == 3
    assert r.values["nvlink_error_increase"] == 5
    assert judge(r, T).reasons == ["NVLink errors +5 in 2h > 0"]


def test_clock_events_alias_and_nan_values() -> None:
    labels = gpu_labels("n", 0)
    results = {
        "values": [
            _series("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", labels, 0x40),
            {"metric": {"__name__": "DCGM_FI_DEV_POWER_USAGE", **labels}, "value": [NOW, "NaN"]},
            _series("DCGM_FI_DEV_GPU_TEMP", labels, 40),
        ],
        "fresh": [_series(None, labels, NOW)],
    }
    (r,) = readings_from_query_results(results, {}, NOW)
    assert r.values["clock_event_reasons"] == 0x40
    assert r.values["power_usage"] is None
    assert judge(r, T).reasons == ["clock events 0x40: HW thermal slowdown"]


# ---------------------------------------------------------------------------------------------- summaries


def test_summarize_worst_rows_table_json() -> None:
    verdicts = [
        judge(reading(), T),
        judge(reading(ok_values(gpu_temp=90.0)), T),
        judge(reading(xids=[79]), T),
        judge(reading({}), T),
    ]
    assert summarize(verdicts) == {Verdict.HEALTHY: 1, Verdict.DEGRADED: 1, Verdict.UNHEALTHY: 1, Verdict.UNKNOWN: 1}
    assert summarize([]) == dict.fromkeys(Verdict, 0)
    assert worst(verdicts) == Verdict.UNHEALTHY
    assert worst(verdicts[:2]) == Verdict.DEGRADED
    assert worst([verdicts[0], verdicts[3]]) == Verdict.UNKNOWN
    assert worst([]) == Verdict.UNKNOWN
    rows = table_rows(verdicts)
    assert list(rows[0]) == ["node", "gpu", "uuid", "model", "verdict", "reasons", "values"]
    assert rows[1]["reasons"] == "GPU temp 90 °C > 87 °C"
    assert "temp=90" in rows[1]["values"] and "clk=0x1" in rows[1]["values"]
    assert rows[3]["values"] == "-"
    text = format_table(verdicts)
    assert text.splitlines()[0].split()[:5] == ["NODE", "GPU", "UUID", "MODEL", "VERDICT"]
    assert "unhealthy" in text and "XID 79" in text
    data = json.loads(verdicts_json(verdicts))
    assert [d["verdict"] for d in data] == ["healthy", "degraded", "unhealthy", "unknown"]


def test_core_imports_no_client_library() -> None:
    code = (
        "import sys, gpuforge.health; bad = {'prefect', 'requests', 'kubernetes', 'pynvml', "
        "'prometheus_client', 'prometheus_api_client'} & set(sys.modules); print(sorted(bad)); "
        "sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_health_module_values_are_finite_defaults() -> None:
    for t in DEFAULT_THRESHOLDS.values():
        assert all(math.isfinite(x) for x in (t.max_gpu_temp_c, t.max_memory_temp_c, t.stale_after_s))
    assert health.VALUE_KEYS.count("gpu_temp") == 1


def test_fleet_queries_summarise_with_the_loosest_limit_of_any_model() -> None:
    table = health.resolve_thresholds({"H100": {"max_gpu_temp_c": 80}, "A100": {"throttle_mask": 0x2}})
    fleet = health.fleet_queries(table)
    assert set(fleet) == {"gpus", "suspects", health.XID_SEEN, *health.WINDOW_KEYS}
    assert fleet["gpus"].startswith("count by (") and "gpu," not in fleet["gpus"]  # one series per node and model
    suspects = fleet["suspects"]
    assert "(DCGM_FI_DEV_GPU_TEMP > 80)" in suspects and "> 85" not in suspects  # H100's, the lowest of any model
    assert "(timestamp(DCGM_FI_DEV_GPU_TEMP) < time() - 120)" in suspects
    assert "(DCGM_FI_DEV_POWER_USAGE > 400 unless DCGM_FI_DEV_ENFORCED_POWER_LIMIT > 0)" in suspects  # A100's 400 W
    # The default mask 0xE8 and A100's 0x2, as runs of bits: 0x2, 0x8, 0x20-0x80.
    runs = [part.split("} % ")[1].rstrip(")") for part in suspects.split(" or ") if "} % " in part]
    assert runs == ["4 >= 2", "16 >= 8", "256 >= 32"]
    assert "PCIE" not in suspects and "SBE" not in suspects  # SBE: judged by its increase only
    assert all(fleet[k].endswith("> 0") for k in ("ecc_sbe_increase", "remap_correctable_increase"))
    with_pcie = health.fleet_queries(health.resolve_thresholds({"H100": {"pcie_width_degraded": True}}))
    assert "(DCGM_FI_DEV_PCIE_LINK_WIDTH < DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH)" in with_pcie["suspects"]


def _gpus(node: str, count: int, model: str = H100, label: str = "Hostname") -> dict:
    return _series(None, {label: node, "modelName": model}, count)


def test_closer_look_asks_per_gpu_only_about_nodes_the_summary_cannot_call_healthy() -> None:
    table = health.resolve_thresholds(None)
    answers = {
        "gpus": [_gpus("node-a", 8), _gpus("node-b", 8), _gpus("node-c", 7), _gpus("node-d", 8), _gpus("x.1", 2)],
        "suspects": [_series(None, {"Hostname": "node-b"}, 1)],
        "ecc_sbe_increase": [_series(None, {**gpu_labels("node-d", 2), "hostname": ""}, 3)],
    }
    expected = {"node-a": 8, "Node-B": 8, "node-c": 8, "node-d": 8, "node-e": 8, "x.1": None}
    look = health.closer_look(answers, expected, table)
    assert look.nodes == {"node-b", "node-c", "node-d"}  # suspect, one GPU short, an SBE increase
    assert look.healthy == {"node-a": health.HealthyGpus(8, H100), "x.1": health.HealthyGpus(2, H100)}
    assert set(look.queries) == {"values", "fresh"}  # no XID seen: no exact XID question
    assert 'Hostname=~"node\\\\-b|node\\\\-c|node\\\\-d"}' in look.queries["values"]
    assert "ECC_DBE_VOL_TOTAL" in look.queries["values"] and "CLOCK" in look.queries["values"]
    assert "FB_USED" not in look.queries["values"] and "ECC_SBE_VOL_TOTAL" not in look.queries["values"]
    assert "UUID" not in look.queries["values"] and "UUID" in look.queries["fresh"]  # identity comes with `fresh`
    # A node released by hand is looked at closely, healthy or not; a healthy fleet needs no second question.
    assert "node-a" in health.closer_look(answers, expected, table, closely=["NODE-A"]).nodes
    calm = health.closer_look({"gpus": [_gpus("node-a", 8)]}, {"node-a": 8}, table)
    assert calm.queries == {} and calm.nodes == frozenset()

    # The answers about the nodes looked at: their GPUs judged one by one, node-e (in no answer) unknown.
    answers["values"] = [_series(name, gpu_labels(node, g), 40) for node in ("node-b", "node-c") for g in range(8)
                         for name in ("DCGM_FI_DEV_GPU_TEMP",) if (node, g) != ("node-c", 7)]  # fmt: skip
    answers["fresh"] = [_series(None, gpu_labels(node, g), NOW - 5) for node in ("node-b", "node-c") for g in range(8)
                        if (node, g) != ("node-c", 7)]  # fmt: skip
    fleet = health.fleet_health(answers, look, expected, table, NOW)
    assert fleet.counts() == {Verdict.HEALTHY: 8 + 2 + 8 + 7, Verdict.DEGRADED: 0, Verdict.UNHEALTHY: 1,
                              Verdict.UNKNOWN: 8 + 8}  # fmt: skip
    assert fleet.node("node-a") == (Verdict.HEALTHY, 8)
    assert fleet.node("node-c") == (Verdict.UNHEALTHY, 8)  # GPU 7 missing
    assert fleet.node("node-d") == (Verdict.UNKNOWN, 8)  # its values were not in this made-up answer
    assert fleet.node("node-e") == (Verdict.UNKNOWN, 8)
    rows = fleet.table_rows()
    assert len(rows) == len(fleet.verdicts) + 2 and rows[-2]["gpu"] == "all 8" and rows[-2]["node"] == "node-a"


def test_bit_runs() -> None:
    assert health._bit_runs(0xE8) == [(3, 3), (5, 7)]
    assert health._bit_runs(0) == [] and health._bit_runs(0x1FF) == [(0, 8)]


def test_fleet_reads_the_xid_gauge_once_and_asks_the_exact_question_only_about_nodes_that_showed_one() -> None:
    table = health.resolve_thresholds(None)
    fleet = health.fleet_queries(table)
    assert "xid_recent" not in fleet and "count_values" not in fleet[health.XID_SEEN]
    assert "max_over_time(DCGM_FI_DEV_XID_ERRORS[7500s]) > 0" in fleet[health.XID_SEEN]  # 2 h + one lookback
    assert health.xid_recent_query(table, []) is None  # nothing seen: no second query
    seen = [
        _series(None, {"Hostname": "node-0007"}, 79),
        _series(None, {"Hostname": "node-0100"}, 13),
        _series(None, {"exported_hostname": "gpu.rack1"}, 31),
    ]
    exact = health.xid_recent_query(table, seen)
    assert exact is not None
    assert 'DCGM_FI_DEV_XID_ERRORS{Hostname=~"node\\\\-0007|node\\\\-0100", err_code!=""}[2h]' in exact
    assert 'DCGM_FI_DEV_XID_ERRORS{exported_hostname=~"gpu\\\\.rack1", err_code!=""}' in exact  # "." is a dot
    # The same expression as the unnarrowed one (window, step, offset), once per node label.
    assert exact.count("[2h:1m]") == 2 and exact.count("offset 2h") == 4
    narrowed = HEALTH_QUERIES["xid_recent"].replace("DCGM_FI_DEV_XID_ERRORS{", 'DCGM_FI_DEV_XID_ERRORS{Hostname=~"x", ')
    assert health.xid_recent_query(table, [_series(None, {"Hostname": "x"}, 1)]) == f"({narrowed})"


@pytest.mark.skipif(not PROMTOOL.is_file(), reason="needs promtool (Debian's prometheus package)")
@pytest.mark.parametrize(("at", "reported"), [("2m", True), ("1h", True), ("2h1m", True), ("2h2m", False)])
def test_an_xid_visible_for_20_s_is_reported_for_the_whole_window(at: str, reported: bool, tmp_path) -> None:
    # dcgm-exporter's series: XID 79 on its own err_code series at 80 s and 90 s (visible 20 s at a 10 s scrape,
    # between two of the old subquery's minute steps), then the gauge back to 0. Prometheus's engine evaluates.
    labels = 'hostname="node-a", gpu="0", UUID="GPU-a", modelName="NVIDIA H100 80GB HBM3"'
    series = {
        f'DCGM_FI_DEV_XID_ERRORS{{{labels}, err_code="0"}}': "0x7 stale stale 0x800",
        f'DCGM_FI_DEV_XID_ERRORS{{{labels}, err_code="79"}}': "_x8 79 79 stale",
        f"DCGM_FI_DEV_GPU_TEMP{{{labels}}}": "40x810",
    }
    table = health.resolve_thresholds(None)
    fleet = health.fleet_queries(table)
    seen = evaluate(tmp_path, series, [fleet[health.XID_SEEN]], at, interval="10s")[0][fleet[health.XID_SEEN]]
    exact = health.xid_recent_query(table, seen)
    if not reported:
        assert exact is None or not evaluate(tmp_path, series, [exact], at, interval="10s")[0][exact]
        return
    assert exact is not None
    # The subquery over the same series, as every exporter's XIDs were read before: it never saw the XID.
    subquery = 'max_over_time((count_values without() ("xid", DCGM_FI_DEV_XID_ERRORS > 0))[2h:1m])'
    answers = evaluate(tmp_path, series, [exact, subquery], at, interval="10s")[0]
    assert answers[subquery] == []
    readings = health.readings_from_query_results({"xid_recent": answers[exact]}, {}, now=0)
    assert [(r.node, r.gpu, r.xids) for r in readings] == [("node-a", 0, [79])]
    assert judge(readings[0], T).reasons == ["XID 79 (GPU has fallen off the bus) within 2h"]


def test_prometheus_unreachable_says_why_in_a_few_words():
    """The user reads this once per unknown GPU: the OS error, not urllib3's retry text with the whole query."""
    import requests

    from tasks.prometheus import why

    refused = requests.ConnectionError(
        "HTTPConnectionPool(host='127.0.0.1', port=38193): Max retries exceeded with url: /api/v1/query?query=max"
        "+by+%28__name__%29 (Caused by NewConnectionError(\"HTTPConnection(host='127.0.0.1', port=38193): Failed to"
        ' establish a new connection: [Errno 111] Connection refused"))'
    )
    assert why(refused) == "[Errno 111] Connection refused"
    assert why(requests.ReadTimeout("HTTPConnectionPool(...): Read timed out. (read timeout=10)")).startswith(
        "timed out"
    )
    assert why(ValueError("no JSON")) == "no JSON"
