"""gpuforge.remediation: actions from verdicts, node state and the config; sinfo parsing; release decisions."""

from __future__ import annotations

import datetime as dt

import pytest

from gpuforge import remediation
from gpuforge.config import parse_config
from gpuforge.health import GpuVerdict, Verdict
from gpuforge.remediation import (
    CORDON,
    CORDON_ANNOTATION,
    DRAIN_SLURM,
    RESUME_SLURM,
    UNCORDON,
    NodeInfo,
    SlurmNode,
    decide,
    parse_sinfo,
    release_decision,
)

NOW = dt.datetime(2026, 11, 3, 1, 0, 5, tzinfo=dt.UTC)


def make_config(mode: str = "cordon+drain-slurm", fraction: float = 0.5, tz: str = "Europe/Berlin"):
    nodes = "\n".join(
        f'  - {{ ip: "10.0.0.{10 + i}", name: gpu-{i}, role: [gpu-worker, schedulable], gpu_count: 8'
        + (", slurm: false" if i == 4 else "")
        + " }"
        for i in range(1, 5)
    )
    return parse_config(
        f"""
cluster_name: ml
timezone: {tz}
remediate: {mode}
remediation_max_fraction: {fraction}
k8s_cluster_nodes:
  - {{ ip: "10.0.0.1", name: cp-1, role: [control-plane, etcd] }}
{nodes}
deepops_services:
  slurm: {{ enabled: true }}
"""
    )


def v(node: str, gpu: int, verdict: Verdict, *reasons: str) -> GpuVerdict:
    return GpuVerdict(node=node, gpu=gpu, verdict=verdict, reasons=list(reasons))


def healthy_fleet() -> list[GpuVerdict]:
    return [v(f"gpu-{n}", g, Verdict.HEALTHY) for n in range(1, 5) for g in range(8)]


def with_(verdicts: list[GpuVerdict], *bad: GpuVerdict) -> list[GpuVerdict]:
    keyed = {(x.node, x.gpu): x for x in verdicts}
    for b in bad:
        keyed[(b.node, b.gpu)] = b
    return list(keyed.values())


def k8s(**cordoned: str | None) -> dict[str, NodeInfo]:
    """Nodes gpu-1..4; keyword gpu_N=<annotation or None> marks a node cordoned."""
    out = {}
    for i in range(1, 5):
        key = f"gpu_{i}"
        ann = {CORDON_ANNOTATION: cordoned[key]} if cordoned.get(key) else {}
        out[f"gpu-{i}"] = NodeInfo(f"gpu-{i}", key in cordoned, ann)
    return out


def slurm(**states: str) -> dict[str, SlurmNode]:
    return {f"gpu-{i}": SlurmNode(f"gpu-{i}", states.get(f"gpu_{i}", "idle"), ("gpu",), "gpu:8") for i in range(1, 4)}


NAMES = {f"gpu-{i}": f"gpu-{i}" for i in range(1, 4)}
XID79 = "XID 79 (GPU has fallen off the bus) within 2h"


def test_healthy_fleet_no_action():
    d = decide(make_config(), healthy_fleet(), k8s(), slurm(), NAMES, NOW)
    assert d.actions == [] and d.candidates == []


def test_unhealthy_gpu_cordons_and_drains_with_why_and_when():
    d = decide(
        make_config(), with_(healthy_fleet(), v("gpu-2", 3, Verdict.UNHEALTHY, XID79)), k8s(), slurm(), NAMES, NOW
    )
    assert [(a.node, a.kind, a.status) for a in d.actions] == [
        ("gpu-2", CORDON, "planned"),
        ("gpu-2", DRAIN_SLURM, "planned"),
    ]
    cordon, drain = d.actions
    # When in the cluster's time zone (Berlin: UTC+1 in November), why per GPU.
    assert cordon.annotation == f"cordoned by gpuforge gpu-health at 2026-11-03T02:00:05+01:00: GPU 3: {XID79}"
    assert drain.slurm_node == "gpu-2"
    assert drain.slurm_reason == f"gpuforge: GPU 3: {XID79} (2026-11-03T02:00:05+01:00)"


def test_degraded_and_unknown_are_not_acted_on():
    verdicts = with_(
        healthy_fleet(),
        v("gpu-1", 0, Verdict.DEGRADED, "GPU temp 95 °C > 87 °C"),
        v("gpu-3", 0, Verdict.UNKNOWN, "no GPU metrics"),
    )
    assert decide(make_config(), verdicts, k8s(), slurm(), NAMES, NOW).actions == []


def test_off_changes_nothing_but_says_what_it_would_do():
    d = decide(
        make_config("off"), with_(healthy_fleet(), v("gpu-2", 3, Verdict.UNHEALTHY, XID79)), k8s(), slurm(), NAMES, NOW
    )
    assert d.planned == []
    assert [(a.node, a.kind, a.status) for a in d.actions] == [("gpu-2", CORDON, "skipped")]
    assert d.actions[0].detail.startswith("remediate is off; would cordon: GPU 3: XID 79")


def test_cordon_mode_leaves_slurm_nodes_alone_to_keep_both_sides_consistent():
    bad = with_(
        healthy_fleet(),
        v("gpu-2", 3, Verdict.UNHEALTHY, XID79),
        v("gpu-4", 1, Verdict.UNHEALTHY, "ECC DBE volatile 2 > 0"),
    )
    d = decide(make_config("cordon"), bad, k8s(), slurm(), NAMES, NOW)
    assert [(a.node, a.kind, a.status) for a in d.actions] == [
        ("gpu-2", CORDON, "skipped"),
        ("gpu-4", CORDON, "planned"),
    ]
    assert "cordon+drain-slurm" in d.actions[0].detail
    assert d.actions[1].slurm_reason is None  # gpu-4 is not in Slurm


def test_max_fraction_counts_nodes_already_out():
    bad = with_(healthy_fleet(), v("gpu-1", 0, Verdict.UNHEALTHY, XID79), v("gpu-2", 0, Verdict.UNHEALTHY, XID79))
    # 4 GPU nodes x 0.5 = 2 may be out; gpu-3 is drained in Slurm by someone else, so only one more.
    d = decide(make_config(), bad, k8s(), slurm(gpu_3="drained"), NAMES, NOW)
    assert d.out_before == ["gpu-3"] and d.budget == 2
    assert [(a.node, a.kind, a.status) for a in d.actions] == [
        ("gpu-1", CORDON, "planned"),
        ("gpu-1", DRAIN_SLURM, "planned"),
        ("gpu-2", CORDON, "skipped"),
    ]
    assert d.actions[2].detail == "limit reached: 2 of 4 GPU nodes out, at most 2 (remediation_max_fraction 0.5)"
    # A cordon by anyone counts as well.
    d = decide(make_config(), bad, k8s(gpu_3=None, gpu_4=None), slurm(), NAMES, NOW)
    assert d.planned == [] and all(a.status == "skipped" for a in d.actions)


def test_worst_node_first_and_fraction_rounds_down():
    bad = with_(
        healthy_fleet(),
        v("gpu-1", 0, Verdict.UNHEALTHY, XID79),
        v("gpu-3", 0, Verdict.UNHEALTHY, XID79),
        v("gpu-3", 1, Verdict.UNHEALTHY, XID79),
    )
    d = decide(make_config(fraction=0.3), bad, k8s(), slurm(), NAMES, NOW)  # 4 x 0.3 = 1.2 -> 1
    assert d.candidates == ["gpu-3", "gpu-1"]
    assert [(a.node, a.status) for a in d.planned] == [("gpu-3", "planned"), ("gpu-3", "planned")]
    d = decide(make_config(fraction=0.2), bad, k8s(), slurm(), NAMES, NOW)  # 0.8 -> 0: nothing may go out
    assert d.planned == []


def test_already_cordoned_by_gpuforge_but_slurm_resumed_is_drained_again():
    bad = with_(healthy_fleet(), v("gpu-2", 3, Verdict.UNHEALTHY, XID79))
    d = decide(make_config(), bad, k8s(gpu_2="cordoned by gpuforge ..."), slurm(), NAMES, NOW)
    assert [(a.node, a.kind, a.status) for a in d.actions] == [("gpu-2", DRAIN_SLURM, "planned")]
    # Cordoned by someone else (no annotation): gpuforge does not touch it.
    d = decide(make_config(), bad, k8s(gpu_2=None), slurm(), NAMES, NOW)
    assert d.actions == []
    # Both sides out already: nothing to do.
    d = decide(make_config(), bad, k8s(gpu_2="cordoned by gpuforge ..."), slurm(gpu_2="drained"), NAMES, NOW)
    assert d.actions == []


def test_slurm_unreadable_means_no_cordon_of_slurm_nodes():
    bad = with_(healthy_fleet(), v("gpu-2", 3, Verdict.UNHEALTHY, XID79), v("gpu-4", 0, Verdict.UNHEALTHY, XID79))
    d = decide(make_config(fraction=1.0), bad, k8s(), None, {}, NOW)
    assert [(a.node, a.kind, a.status) for a in d.actions] == [
        ("gpu-2", CORDON, "skipped"),
        ("gpu-4", CORDON, "planned"),
    ]
    assert d.actions[0].detail.startswith("Slurm could not be read")


def test_already_drained_slurm_node_is_only_cordoned():
    bad = with_(healthy_fleet(), v("gpu-2", 3, Verdict.UNHEALTHY, XID79))
    d = decide(make_config(fraction=1.0), bad, k8s(), slurm(gpu_2="drained"), NAMES, NOW)
    assert [(a.node, a.kind) for a in d.planned] == [("gpu-2", CORDON)]


def test_long_reasons_are_clipped():
    reasons = [f"GPU {i}: " + "x" * 100 for i in range(8)]
    assert len(remediation.slurm_reason(reasons, "t")) == remediation.SLURM_REASON_MAX
    assert remediation.slurm_reason(reasons, "t").startswith("gpuforge: GPU 0: ")


# ------------------------------------------------------------------------------------------------- sinfo


SINFO = """\
gpu-1|gpu*|idle|gpu:8|Unknown|none
gpu-2|gpu*|drained|gpu:8|root|gpuforge: GPU 3: XID 79 (2026-11-03T02:00:05+01:00)
gpu-3|gpu*|down*|gpu:h100:8(S:0-1)|slurm|Not responding
gpu-3|debug|down*|gpu:h100:8(S:0-1)|slurm|Not responding
cpu-1|cpu|mixed|(null)|Unknown|none
"""


def test_parse_sinfo():
    nodes = parse_sinfo(SINFO)
    assert set(nodes) == {"gpu-1", "gpu-2", "gpu-3", "cpu-1"}
    assert nodes["gpu-1"] == SlurmNode("gpu-1", "idle", ("gpu",), "gpu:8", "", "")
    assert nodes["gpu-2"].drained and nodes["gpu-2"].by_gpuforge and nodes["gpu-2"].user == "root"
    assert nodes["gpu-3"].partitions == ("debug", "gpu") and nodes["gpu-3"].gpus == 8
    assert nodes["gpu-3"].out_of_service and not nodes["gpu-3"].drained
    assert nodes["cpu-1"].gres == "" and nodes["cpu-1"].gpus == 0 and not nodes["cpu-1"].out_of_service


@pytest.mark.parametrize(
    ("state", "cls"),
    [
        ("idle", "up"),
        ("mixed", "up"),
        ("allocated", "up"),
        ("reserved", "up"),
        ("drained", "drain"),
        ("draining", "drain"),
        ("idle+drain", "drain"),
        ("drained*", "drain"),
        ("down", "down"),
        ("down*", "down"),
        ("idle*", "down"),
        ("inval", "down"),
    ],
)
def test_slurm_state_class(state, cls):
    assert remediation.slurm_state_class(state) == cls


def test_slurm_name_map_prefers_same_name_then_pod():
    slurm_nodes = {"gpu-1": 1, "gpu-8-1": 1}
    pods = [{"name": "slurm-worker-gpu-8-1", "hostname": "gpu-8-1", "node": "gpu-2"}]
    assert remediation.slurm_name_map(["gpu-1", "gpu-2", "gpu-3"], slurm_nodes, pods) == {
        "gpu-1": "gpu-1",
        "gpu-2": "gpu-8-1",
    }


# ----------------------------------------------------------------------------------------------- release


def test_release_needs_validation_and_healthy_fresh_metrics():
    info = NodeInfo("gpu-2", True, {CORDON_ANNOTATION: "cordoned by gpuforge ..."})
    drained = SlurmNode("gpu-2", "drained", ("gpu",), "gpu:8", "root", "gpuforge: ...")
    ok = [v("gpu-2", i, Verdict.HEALTHY) for i in range(8)]
    d = release_decision("gpu-2", True, "job COMPLETED", ok, info, drained, "gpu-2", True)
    assert d.ok and [(a.kind, a.node) for a in d.actions] == [(UNCORDON, "gpu-2"), (RESUME_SLURM, "gpu-2")]

    d = release_decision("gpu-2", False, "job FAILED, exit 1:0", ok, info, drained, "gpu-2", True)
    assert not d.ok and d.actions == [] and d.reasons == ["re-validation failed: job FAILED, exit 1:0"]

    degraded = [*ok[:7], v("gpu-2", 7, Verdict.DEGRADED, "GPU temp 95 °C > 87 °C")]
    d = release_decision("gpu-2", True, "ok", degraded, info, drained, "gpu-2", True)
    assert not d.ok and d.reasons == ["GPU 7 degraded: GPU temp 95 °C > 87 °C"]

    d = release_decision("gpu-2", True, "ok", [], info, drained, "gpu-2", True)
    assert not d.ok and d.reasons == ["no GPU metrics for the node"]

    d = release_decision("gpu-2", True, "ok", ok, info, None, None, True)
    assert not d.ok and "no Slurm node found" in d.reasons[0]


def test_release_of_a_node_only_slurm_had_out_resumes_only_slurm():
    ok = [v("gpu-2", i, Verdict.HEALTHY) for i in range(8)]
    drained = SlurmNode("gpu-2", "drained", ("gpu",), "gpu:8", "alice", "bad cable")
    d = release_decision("gpu-2", True, "ok", ok, NodeInfo("gpu-2"), drained, "gpu-2", True)
    assert d.ok and [a.kind for a in d.actions] == [RESUME_SLURM]
