"""One set of thresholds, one verdict: for the same readings, under the default thresholds and under a config that
overrides them, the node probe, the fleet evaluation and the rendered alert rules agree on every GPU.

The fleet queries and the alert rules are evaluated for real, by Prometheus's engine (`promtool test rules`), on
the series dcgm-exporter would show for those readings; the probe judges the same readings through NVML records."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from gpuforge import desired, health, render
from gpuforge.config import Config, parse_config
from gpuforge.health import Verdict
from gpuforge.plan import alert_rules
from gpuforge_probe.probe import Probe, RecordedReader
from tests.promtool import PROMTOOL, evaluate

pytestmark = pytest.mark.skipif(not PROMTOOL.is_file(), reason="needs promtool (Debian's prometheus package)")

CONFIGS: dict[str, dict] = {
    "default": {},
    "overridden": {
        "default": {"max_memory_temp_c": 90},
        "H100": {"max_gpu_temp_c": 80, "fatal_xids": [13, 79]},
        "A100": {"max_uncorrectable_remapped_rows": 10},
        "NVIDIA H200 NVL": {"max_gpu_temp_c": 70},  # an exact model name wins over its family
    },
}
MODELS = (
    "NVIDIA H100 80GB HBM3",
    "NVIDIA H200",
    "NVIDIA H200 NVL",
    "NVIDIA A100-SXM4-80GB",
    "NVIDIA GH200 480GB",  # no H200: the default family
    "Tesla T4",
)
HEALTHY = {"gpu_temp": 40, "memory_temp": 40, "ecc_dbe": 0, "remap_failure": 0, "remap_uncorrectable": 0}
EVAL = "10m"  # past the temperature alerts' 5 minutes
XID_AT = 5  # the XID is shown at the 5th and 6th sample (75 s, 90 s: visible 15-30 s), then cleared


def config_of(name: str) -> Config:
    sections = json.dumps(CONFIGS[name])
    return parse_config(
        f'k8s_cluster_nodes: [{{ip: "10.0.0.1", role: [control-plane, etcd]}}]\nhealth: {{thresholds: {sections}}}\n'
    )


def around(limits: set[float]) -> list[float]:
    return sorted({limit + d for limit in limits for d in (-1, 0, 1)})


def cases() -> list[dict]:
    """Readings around every limit either config sets, each a change to a healthy GPU."""
    tables = [health.resolve_thresholds(config_of(name).health.thresholds) for name in CONFIGS]
    ts = [t for table in tables for t in table.values()]
    out: list[dict] = [{}]
    out += [{"gpu_temp": x} for x in around({t.max_gpu_temp_c for t in ts})]
    out += [{"memory_temp": x} for x in around({t.max_memory_temp_c for t in ts})]
    out += [{"remap_uncorrectable": x} for x in around({t.max_uncorrectable_remapped_rows for t in ts})]
    out += [{"ecc_dbe": 1}, {"remap_failure": 1}]
    out += [{"xid": x} for x in (13, 31, 43, 48, 79, 94)]
    return out


def probe_verdict(config: Config, model: str, case: dict) -> Verdict:
    """The serving probe's verdict: NVML records, the XID as its event watcher records it."""
    v = {**HEALTHY, **case}
    record = {
        "index": 0,
        "uuid": "GPU-0",
        "name": model,
        "values": {
            "temperature_gpu": v["gpu_temp"],
            "memory_temp": v["memory_temp"],
            "power_usage_mw": 300_000,
            "enforced_power_limit_mw": 700_000,
            "ecc_volatile_uncorrected": v["ecc_dbe"],
            "remapped_rows_failure": v["remap_failure"],
            "remapped_rows_uncorrectable": v["remap_uncorrectable"],
            "clocks_event_reasons": 0,
        },
    }
    # The thresholds as `gpuforge probe --config` hands them over: the config's sections as written.
    probe = Probe(
        RecordedReader({"gpus": [record]}), node="n", table=health.resolve_thresholds(config.health.thresholds)
    )
    probe.open()
    if "xid" in case:
        probe.record_xid("GPU-0", case["xid"])
    probe.refresh()
    (verdict,) = probe.verdicts()
    return verdict.verdict


def series_of(host: str, model: str, case: dict) -> dict[str, str]:
    """What dcgm-exporter shows for the reading, sampled from 0 to past EVAL."""
    v = {**HEALTHY, **case}
    labels = f'hostname="{host}", gpu="0", UUID="GPU-{host}", modelName="{model}"'
    n = 50
    out = {
        f"DCGM_FI_DEV_{metric}{{{labels}}}": f"{value}x{n}"
        for metric, value in (
            ("GPU_TEMP", v["gpu_temp"]),
            ("MEMORY_TEMP", v["memory_temp"]),
            ("POWER_USAGE", 300),
            ("ENFORCED_POWER_LIMIT", 700),
            ("ECC_DBE_VOL_TOTAL", v["ecc_dbe"]),
            ("ROW_REMAP_FAILURE", v["remap_failure"]),
            ("UNCORRECTABLE_REMAPPED_ROWS", v["remap_uncorrectable"]),
            ("CLOCK_THROTTLE_REASONS", 0),
        )
    }
    none = f'DCGM_FI_DEV_XID_ERRORS{{{labels}, err_code="0", err_msg="No Error"}}'
    if "xid" not in case:
        out[none] = f"0x{n}"
    else:  # each XID value on its own series; the XID cleared after two scrapes, the gauge back to 0
        out[none] = f"0x{XID_AT - 1} stale stale 0x{n - XID_AT - 2}"
        xid = case["xid"]
        out[f'DCGM_FI_DEV_XID_ERRORS{{{labels}, err_code="{xid}", err_msg="x"}}'] = "_ " * XID_AT + f"{xid} {xid} stale"
    return out


@functools.cache
def fleet_and_alerts(config_name: str, tmp: Path) -> dict[tuple[str, int], tuple[Verdict, Verdict]]:
    """(model, case index) -> (the fleet evaluation's verdict, the alert rules' verdict), every GPU at once."""
    config = config_of(config_name)
    table = health.resolve_thresholds(config.health.thresholds)
    hosts: dict[str, tuple[str, int]] = {}
    series: dict[str, str] = {}
    for model in MODELS:
        for i, case in enumerate(cases()):
            host = f"n{len(hosts):03d}"
            hosts[host] = (model, i)
            series.update(series_of(host, model, case))
    rules = alert_rules(desired.build(config))["spec"]["groups"]
    queries = health.fleet_queries(table)
    answers, alerts = evaluate(tmp, series, list(queries.values()), EVAL, groups=rules)
    results = {name: answers[q] for name, q in queries.items()}
    # As tasks.prometheus.evaluate_fleet does: the per-GPU questions only about the nodes the summary cannot clear.
    look = health.closer_look(results, {}, table)
    closer = evaluate(tmp, series, list(look.queries.values()), EVAL)[0] if look.queries else {}
    results |= {name: closer[q] for name, q in look.queries.items()}
    judged = health.fleet_health(results, look, {}, table, now=600.0)  # EVAL
    assert judged.healthy and len(look.nodes) < len(hosts)  # the summary cleared some hosts, not every one
    fleet = {(v.node, v.gpu): v.verdict for v in judged.verdicts} | {(h, 0): Verdict.HEALTHY for h in judged.healthy}
    severity = {r["alert"]: r["labels"]["severity"] for g in rules for r in g["rules"]}
    fired: dict[str, set[str]] = {}
    for name, firing in alerts.items():
        for labels in firing:
            fired.setdefault(labels[render.DCGM_NODE_LABEL], set()).add(severity[name])
    out = {}
    for host, key in hosts.items():
        sev = fired.get(host, set())
        alert = Verdict.UNHEALTHY if "critical" in sev else Verdict.DEGRADED if "warning" in sev else Verdict.HEALTHY
        out[key] = (fleet.get((host, 0), Verdict.UNKNOWN), alert)
    return out


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_probe_fleet_and_alert_rules_give_one_verdict(config_name, model, tmp_path_factory) -> None:
    config = config_of(config_name)
    both = fleet_and_alerts(config_name, tmp_path_factory.getbasetemp())
    disagree = []
    verdicts = set()
    for i, case in enumerate(cases()):
        probe = probe_verdict(config, model, case)
        fleet, alert = both[(model, i)]
        verdicts.add(probe)
        if not probe == fleet == alert:
            disagree.append(f"{case or 'healthy'}: probe {probe}, fleet {fleet}, alerts {alert}")
    assert not disagree, f"{model} under the {config_name} thresholds:\n" + "\n".join(disagree)
    # The readings reach each side of every rule: all three verdicts occur for every model.
    assert verdicts == {Verdict.HEALTHY, Verdict.DEGRADED, Verdict.UNHEALTHY}
