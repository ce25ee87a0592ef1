"""The dcgm-exporter metric contract: tied to the real GPU Operator charts' exporter pins and to what gpuforge's
readers use today; the diff between versions and the missing-metric explanations."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from gpuforge import health, pins, render, validation
from gpuforge import metric_contract as mc

UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "upstream"
GPU_OPERATOR_CHARTS = {
    "v26.7.0": UPSTREAM / "charts" / "gpu-operator-v26.7.0.tgz",
    "v26.3.3": UPSTREAM / "previous" / "gpu-operator-v26.3.3.tgz",
}


def exporter_tag(archive: Path) -> str:
    with tarfile.open(archive) as tar:
        values = yaml.safe_load(tar.extractfile("gpu-operator/values.yaml").read())
    return values["dcgmExporter"]["version"]


@pytest.mark.parametrize("operator", sorted(GPU_OPERATOR_CHARTS))
def test_each_gpu_operator_chart_pins_an_exporter_with_a_contract(operator):
    contract = mc.contract_for(exporter_tag(GPU_OPERATOR_CHARTS[operator]))
    assert contract.verified and contract.gpu_operator == (operator,)
    assert exporter_tag(GPU_OPERATOR_CHARTS[operator]).startswith(contract.tag)
    assert mc.for_gpu_operator(operator) is contract


def test_the_pinned_gpu_operator_has_a_contract_and_an_unknown_one_is_refused():
    gpu_operator = next(chart[4] for chart in pins.CHARTS["gpu-operator"] if chart[0] == "gpu-operator")
    assert mc.for_gpu_operator(gpu_operator).exporter == "4.8.3"
    with pytest.raises(mc.UnknownExporter, match="GPU Operator v99.1.0: read its chart's dcgmExporter.version"):
        mc.for_gpu_operator("v99.1.0")


def test_the_contracts_cover_every_metric_and_label_gpuforge_reads_today():
    read = {
        *health.DCGM_METRICS.values(),
        *health.NVLINK_ERROR_METRICS,
        health.XID_COUNT_METRIC,
        *validation.REQUIRED_DCGM_METRICS,
    }
    for version in ("4.8.2", "4.8.3"):
        assert read <= {m.name for m in mc.CONTRACTS[version].metrics.values()}, version
    # the pinned GPU Operator's exporter spells the node label as the dashboard and alerts do
    pinned = mc.contract_for(exporter_tag(GPU_OPERATOR_CHARTS["v26.7.0"]))
    assert pinned.labels["node"] == render.DCGM_NODE_LABEL and pinned.labels["model"] == render.DCGM_MODEL_LABEL


def test_v26_3_3_to_v26_7_0_renames_only_the_node_label():
    d = mc.diff(mc.CONTRACTS["4.8.2"], mc.CONTRACTS["4.8.3"])
    assert (d.old, d.new) == ("4.8.2", "4.8.3")
    assert d.changes == (mc.Change("label renamed", "node", "Hostname", "hostname"),)
    assert mc.diff(mc.CONTRACTS["4.8.3"], mc.CONTRACTS["4.8.2"]).lines() == [
        "label renamed: node: hostname -> Hostname"
    ]
    assert mc.diff(mc.CONTRACTS["4.8.3"], mc.CONTRACTS["4.8.3"]).changes == ()


def test_4_9_0_renames_metrics_with_their_unit_changes_and_the_driver_label():
    d = mc.diff(mc.CONTRACTS["4.8.3"], mc.CONTRACTS["4.9.0"])
    renamed = {c.role: (c.old, c.new, c.detail) for c in d.of("metric renamed")}
    assert renamed["fb_used"] == ("DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_USED_BYTES", "unit MiB -> B")
    assert renamed["gpu_temp"] == ("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_GPU_TEMP_CELSIUS", "")
    assert renamed["xid_last"][1] == "DCGM_FI_DEV_XID_ERROR"
    assert d.of("label renamed") == [
        mc.Change("label renamed", "driver", "DCGM_FI_DRIVER_VERSION", "DCGM_FI_SYSTEM_DRIVER_VERSION")
    ]
    assert d.of("metric removed") == [] and d.of("unit changed") == []
    assert not mc.CONTRACTS["4.9.0"].verified  # derived from release notes until its CSV is read at the tag


def test_unit_change_under_one_name_and_removed_and_added_metrics():
    old = mc.CONTRACTS["4.8.3"]
    metrics = dict(old.metrics)
    metrics["gpu_util"] = mc.Metric("DCGM_FI_DEV_GPU_UTIL", "gauge", "ratio 0-1")
    del metrics["power_limit"]
    metrics["fb_total"] = mc.Metric("DCGM_FI_DEV_FB_TOTAL", "gauge", mc.MIB)
    new = mc.Contract("9.9.9", "9.9.9", (), old.labels, metrics)
    assert mc.diff(old, new).lines() == [
        "metric removed: power_limit: DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
        "unit changed: gpu_util: DCGM_FI_DEV_GPU_UTIL -> DCGM_FI_DEV_GPU_UTIL (unit % -> ratio 0-1)",
        "metric added: fb_total: DCGM_FI_DEV_FB_TOTAL",
    ]


def test_a_rule_written_against_an_old_name_is_told_the_rename():
    assert mc.explain_missing("DCGM_FI_DEV_FB_USED", mc.CONTRACTS["4.9.0"]) == (
        "DCGM_FI_DEV_FB_USED missing: renamed to DCGM_FI_DEV_FB_USED_BYTES in dcgm-exporter 4.9.0, unit MiB -> B"
    )


def test_an_exporter_that_is_not_the_pinned_one_is_named():
    text = mc.explain_missing("DCGM_FI_DEV_GPU_TEMP", mc.CONTRACTS["4.8.3"], {"DCGM_FI_DEV_GPU_TEMP_CELSIUS"})
    assert text.startswith("DCGM_FI_DEV_GPU_TEMP missing: the exporter serves DCGM_FI_DEV_GPU_TEMP_CELSIUS instead")
    assert "dcgm-exporter 4.9.0's name" in text and "not 4.8.3, the pinned one" in text


def test_a_missing_metric_a_later_exporter_renames_says_so():
    text = mc.explain_missing("DCGM_FI_DEV_XID_ERRORS", mc.CONTRACTS["4.8.3"], {"DCGM_FI_DEV_GPU_TEMP"})
    assert text.startswith("DCGM_FI_DEV_XID_ERRORS missing: renamed to DCGM_FI_DEV_XID_ERROR in dcgm-exporter 4.9.0")


def test_a_missing_metric_nobody_renamed_is_not_blamed_on_a_rename():
    text = mc.explain_missing("DCGM_FI_DEV_GPU_UTIL", mc.CONTRACTS["4.8.3"])
    assert "no dcgm-exporter version gpuforge knows renamed it" in text
    assert mc.explain_missing("DCGM_FI_DEV_NOT_A_FIELD", mc.CONTRACTS["4.8.3"]).endswith(
        "(not a metric of any dcgm-exporter contract gpuforge knows)"
    )


def test_the_node_label_spelling_of_another_version_is_named():
    assert mc.explain_missing_label("node", mc.CONTRACTS["4.8.3"], {"hostname", "gpu"}) is None
    assert mc.explain_missing_label("node", mc.CONTRACTS["4.8.3"], {"Hostname", "gpu"}) == (
        "label hostname missing: the series carry Hostname (dcgm-exporter 4.8.2's spelling), "
        "gpuforge is configured for 4.8.3"
    )
    assert mc.explain_missing_label("node", mc.CONTRACTS["4.8.2"], {"gpu"}) == (
        "label Hostname missing from the dcgm-exporter series"
    )


@pytest.mark.parametrize(
    ("tag", "version"),
    [
        ("4.6.0-4.8.3-distroless", "4.8.3"),
        ("4.5.3-4.8.2-ubuntu22.04", "4.8.2"),
        ("4.5.3-4.8.2", "4.8.2"),
        ("4.9.0", "4.9.0"),
    ],
)
def test_exporter_version_from_image_tags(tag, version):
    assert mc.exporter_version(tag) == version


def test_an_exporter_without_a_contract_is_refused_with_what_to_do():
    with pytest.raises(mc.UnknownExporter, match=r"no metric contract for dcgm-exporter 4\.7\.1 .*add its names"):
        mc.contract_for("4.4.2-4.7.1-ubuntu22.04")
    with pytest.raises(mc.UnknownExporter, match="is not <dcgm>-<exporter>"):
        mc.contract_for("latest")


def test_values_in_another_unit_are_brought_to_the_rules_units():
    assert mc.in_rule_units("fb_used", 80 * 2**30, mc.CONTRACTS["4.9.0"]) == 80 * 1024  # bytes -> MiB
    assert mc.in_rule_units("fb_used", 81920, mc.CONTRACTS["4.8.3"]) == 81920
    assert mc.in_rule_units("gpu_temp", 71, mc.CONTRACTS["4.9.0"]) == 71
    odd = mc.Contract("9.9.9", "9.9.9", (), {}, {"gpu_util": mc.Metric("DCGM_FI_DEV_GPU_UTIL", "gauge", "ratio 0-1")})
    with pytest.raises(mc.UnknownExporter, match="gpu_util: no conversion from ratio 0-1 to %"):
        mc.in_rule_units("gpu_util", 0.5, odd)


# ---------------------------------------------------------------- the readers follow the cluster's contract

CLUSTER = """
cluster_name: ml
k8s_cluster_nodes:
  - { ip: "198.51.100.1", role: [control-plane, etcd] }
  - { ip: "198.51.100.2", role: [gpu-worker, schedulable], gpu_count: 2 }
deepops_services:
  gpu-operator: { enabled: true%s }
  monitoring_stack: { enabled: true }
"""
EXPORTER_4_9_0 = ", releases: { gpu-operator: { values: { dcgmExporter: { version: '4.9.0' } } } }"


def cluster(operator: str = ""):
    from gpuforge import desired
    from gpuforge.config import parse_config

    return desired.build(parse_config(CLUSTER % operator))


def test_the_desired_state_takes_the_contract_of_the_exporter_its_gpu_operator_runs():
    assert cluster().metrics is mc.PINNED and mc.PINNED.exporter == "4.8.3"
    previous = ", releases: { gpu-operator: { version: v26.3.3 } }"
    assert cluster(previous).metrics.exporter == "4.8.2"
    assert cluster(EXPORTER_4_9_0).metrics.exporter == "4.9.0"  # the config overrides the exporter image


def test_alerts_dashboard_collector_and_fleet_queries_use_the_contracts_names_label_and_units():
    from gpuforge.plan import alert_rules, plan_files

    for operator, temp, node in (
        ("", "DCGM_FI_DEV_GPU_TEMP", "hostname"),
        (", releases: { gpu-operator: { version: v26.3.3 } }", "DCGM_FI_DEV_GPU_TEMP", "Hostname"),
        (EXPORTER_4_9_0, "DCGM_FI_DEV_GPU_TEMP_CELSIUS", "hostname"),
    ):
        state = cluster(operator)
        rules = {r["alert"]: r["expr"] for r in alert_rules(state)["spec"]["groups"][0]["rules"]}
        assert rules["GPUMissing"].startswith(f"count by ({node}) ({temp}{{{node}=~"), operator
        assert rules["GPUTemperatureHigh"].startswith(f"({temp}{{"), operator
        dashboard = render.render_dashboard(state.metrics)
        assert dashboard["templating"]["list"][1]["query"] == f"label_values({temp}, {node})"
        assert f'{temp}{{{node}=~"$node"}}' == dashboard["panels"][0]["targets"][0]["expr"]
        queries = health.fleet_queries(state.thresholds, state.metrics)
        assert queries["gpus"].endswith(f") ({temp})") and f"(timestamp({temp}) < " in queries["suspects"]
        csv = plan_files(state)["dcgm-metrics.csv"]
        assert f"\n{temp}, gauge," in csv
    renamed = cluster(EXPORTER_4_9_0)
    assert "DCGM_FI_DEV_FB_USED_BYTES, gauge" in render.render_dcgm_counters(renamed.metrics)
    fb = next(p for p in render.render_dashboard(renamed.metrics)["panels"] if "FB_USED" in p["targets"][0]["expr"])
    assert fb["fieldConfig"]["defaults"]["unit"] == "bytes"
    assert "DCGM_FI_DEV_GPU_TEMP{" not in " ".join(health.fleet_queries(renamed.thresholds, renamed.metrics).values())


def test_readings_under_a_newer_exporters_names_are_judged_in_the_rules_units():
    series = [
        {"metric": {"__name__": "DCGM_FI_DEV_FB_USED_BYTES", "hostname": "gpu-1", "gpu": "0"}, "value": [0, "2147483648"]},
        {"metric": {"__name__": "DCGM_FI_DEV_GPU_TEMP_CELSIUS", "hostname": "gpu-1", "gpu": "0"}, "value": [0, "95"]},
    ]  # fmt: skip
    fresh = [{"metric": {"hostname": "gpu-1", "gpu": "0"}, "value": [0, "100"]}]
    (reading,) = health.readings_from_query_results({"values": series, "fresh": fresh}, {"gpu-1": 1}, 100)
    assert reading.values["fb_used"] == 2048  # MiB, as the rules are written
    assert reading.values["gpu_temp"] == 95
    assert health.judge(reading, health.resolve_thresholds(None)["default"]).verdict != health.Verdict.HEALTHY


def coverage_series(names: dict[str, str], node_label: str, gpus: int = 2, ts: float = 100.0) -> list[dict]:
    return [
        {"metric": {"metric": name, node_label: "gpu-1", "gpu": str(g)}, "value": [ts, str(ts)]}
        for g in range(gpus)
        for name in names.values()
    ]


def test_validation_names_the_rename_instead_of_reporting_no_data():
    names_4_8 = {r: mc.CONTRACTS["4.8.3"].metric(r) for r in validation.REQUIRED_DCGM_ROLES}
    names_4_9 = {r: mc.CONTRACTS["4.9.0"].metric(r) for r in validation.REQUIRED_DCGM_ROLES}
    query = validation.dcgm_coverage_query()
    assert all(f"timestamp({n})" in query for n in [*names_4_8.values(), *names_4_9.values()])

    (ok,) = validation.dcgm_coverage(coverage_series(names_4_8, "hostname"), {"gpu-1": 2}, 101, 30, mc.PINNED)
    assert ok.result == validation.PASS, ok

    # the exporter runs 4.9.0 while gpuforge is pinned to 4.8.3: the rows name the rename, metric by metric
    (row,) = validation.dcgm_coverage(coverage_series(names_4_9, "hostname"), {"gpu-1": 2}, 101, 30, mc.PINNED)
    assert row.result == validation.FAIL
    assert "DCGM_FI_DEV_GPU_TEMP missing: the exporter serves DCGM_FI_DEV_GPU_TEMP_CELSIUS instead" in row.detail
    assert "DCGM_FI_DEV_FB_USED missing: the exporter serves DCGM_FI_DEV_FB_USED_BYTES instead" in row.detail
    assert "unit MiB -> B" in row.detail

    # v26.3.3's exporter spells the node label `Hostname`; the alerts and dashboard for v26.7.0 read `hostname`
    (label,) = validation.dcgm_coverage(coverage_series(names_4_8, "Hostname"), {"gpu-1": 2}, 101, 30, mc.PINNED)
    assert label.result == validation.FAIL
    assert label.detail.startswith("label hostname missing: the series carry Hostname (dcgm-exporter 4.8.2's")

    # a metric simply absent is reported as missing, not blamed on a rename
    partial = {r: n for r, n in names_4_8.items() if r != "remap_failure"}
    (absent,) = validation.dcgm_coverage(coverage_series(partial, "hostname"), {"gpu-1": 2}, 101, 30, mc.PINNED)
    assert absent.detail == "missing: gpu 0 DCGM_FI_DEV_ROW_REMAP_FAILURE, gpu 1 DCGM_FI_DEV_ROW_REMAP_FAILURE"


def test_checks_mid_upgrade_read_the_contract_of_the_exporter_running_now():
    previous = mc.of_live_release("v26.3.3", {}, mc.PINNED)
    assert previous.exporter == "4.8.2" and previous.labels["node"] == "Hostname"
    assert mc.of_live_release("v26.7.0", {}, mc.PINNED) is mc.PINNED
    assert (
        mc.of_live_release("v26.3.3", {"dcgmExporter": {"version": "4.5.3-4.8.3-distroless"}}, mc.PINNED).exporter
        == "4.8.3"
    )
    assert mc.of_live_release(None, {}, mc.PINNED) is mc.PINNED, "no GPU Operator installed yet"
    assert mc.of_live_release("v1.0.0", {}, mc.PINNED) is mc.PINNED, "an exporter no table describes"
