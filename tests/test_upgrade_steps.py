"""The upgrade's order, gates and way back (gpuforge.upgrade_steps) as plain functions, on plans made from the real
chart archives (current pins in ../shared/upstream/charts, previous pins in ../shared/upstream/previous)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from gpuforge import pins
from gpuforge import upgrade as up
from gpuforge import upgrade_steps as steps
from gpuforge.config import load_config
from gpuforge.render import render_releases
from tests.conftest import config_variant
from tests.test_upgrade import CHARTS, LAB_CONFIG, REPO, live_from, previous_chart_facts

GPU_OPERATOR_CRDS_FOLDER_CHANGES = {
    ("gpu-operator", "gpuclusters.nvidia.com"),
    ("gpu-operator", "computedomains.resource.nvidia.com"),
    ("gpu-operator", "computedomaincliques.resource.nvidia.com"),
    ("gpu-operator", "clusterpolicies.nvidia.com"),
    ("gpu-operator", "nvidiadrivers.nvidia.com"),
}
SLURM_RELEASES = ("cert-manager", "slurm-operator-crds", "slurm-operator", "slurm")


@pytest.fixture(scope="module")
def releases():
    return render_releases(load_config(LAB_CONFIG))


@pytest.fixture(scope="module")
def targets(releases):
    return up.targets(releases, CHARTS)


@pytest.fixture(scope="module")
def services(releases):
    out: dict[str, list[str]] = {}
    for r in releases:
        out.setdefault(r.service, []).append(r.name)
    return out


@pytest.fixture(scope="module")
def previous_live(targets):
    """The lab installed at the previous pins (GPU Operator v26.3.3, Slinky 1.2.0), Kubernetes at the pin."""
    previous = previous_chart_facts()
    return live_from(targets, previous, server=f"v{pins.KUBE_VERSION}")


def moving(live: up.LiveState, targets) -> set[str]:
    return {t.release.name for t in targets if live.releases[t.release.name].version != t.release.version}


def test_previous_pins_give_crds_first_then_the_phases_in_install_order(previous_live, targets, services):
    plan = up.plan(previous_live, targets, pins.KUBE_VERSION)
    assert steps.blockers(plan, previous_live, targets) == []
    got = steps.upgrade_steps(plan, services, moving(previous_live, targets))
    assert [s.name for s in got] == ["crds", "gpu-operator", "slurm"]
    crds, gpu, slurm = got
    assert set(crds.crds) == GPU_OPERATOR_CRDS_FOLDER_CHANGES and crds.releases == ()
    assert (gpu.releases, gpu.moving) == (("gpu-operator",), ("gpu-operator",))
    # The step's scope is the whole phase (its rollback scope); cert-manager stays at its pin and is not moved.
    assert slurm.releases == SLURM_RELEASES and slurm.moving == ("slurm-operator-crds", "slurm-operator", "slurm")
    assert slurm.detail == "helm upgrade with gpuforge's rendered values: slurm-operator-crds, slurm-operator, slurm"
    manifests = steps.crd_manifests(crds, targets)
    assert {m["metadata"]["name"] for m in manifests} == {name for _, name in GPU_OPERATOR_CRDS_FOLDER_CHANGES}
    assert {m["kind"] for m in manifests} == {"CustomResourceDefinition"}


def test_a_values_change_alone_moves_only_its_phase_and_a_converged_cluster_has_no_step(targets, services):
    live = live_from(targets)
    plan = up.plan(live, targets, pins.KUBE_VERSION)
    assert steps.upgrade_steps(plan, services, set()) == []
    only = steps.upgrade_steps(plan, services, {"kube-prometheus-stack"})
    assert [(s.name, s.moving) for s in only] == [("monitoring", ("kube-prometheus-stack",))]


def test_a_new_release_gets_its_crds_from_helm_not_from_a_crds_step(targets, services):
    live = live_from(targets)
    del live.releases["gpu-operator"]
    for name in next(t for t in targets if t.release.name == "gpu-operator").facts.crds:
        live.crds.pop(name, None)
    plan = up.plan(live, targets, pins.KUBE_VERSION)
    assert [s.name for s in steps.upgrade_steps(plan, services, {"gpu-operator"})] == ["gpu-operator"]


def test_a_crd_missing_from_the_target_chart_is_an_error(targets):
    with pytest.raises(KeyError, match="not in the crds/ folder of gpu-operator"):
        steps.crd_manifests(steps.Step("crds", crds=(("gpu-operator", "nodesets.slinky.slurm.net"),)), targets)


def test_what_the_flow_cannot_carry_out_stops_it_before_any_change(previous_live, targets):
    old_kube = dataclasses.replace(previous_live, server_version="v1.34.3", kubelets={"cp-1": "v1.34.3"})
    plan = up.plan(old_kube, targets, pins.KUBE_VERSION)
    assert steps.blockers(plan, old_kube, targets, {"cp-1"}) == []  # Kubernetes steps are carried out now
    stray = dataclasses.replace(old_kube, kubelets={"cp-1": "v1.34.3", "old-9": "v1.34.3", "new-1": "v1.35.4"})
    assert steps.blockers(up.plan(stray, targets, pins.KUBE_VERSION), stray, targets, {"cp-1"}) == [
        "node old-9 (kubelet v1.34.3) is not in the config: Kubespray's upgrade-cluster.yml would not reach it; "
        "add it to k8s_cluster_nodes or remove it from the cluster first"
    ]

    stranded = live_from(targets)
    policy = stranded.crds["clusterpolicies.nvidia.com"]
    stranded.crds[policy.name] = dataclasses.replace(policy, stored_versions=("v1alpha1", "v1"))
    plan = up.plan(stranded, targets, pins.KUBE_VERSION)
    assert steps.blockers(plan, stranded, targets) == [
        "stranded CRD version: clusterpolicies.nvidia.com: objects may be stored at v1alpha1, which the target no "
        "longer serves: migrate them to v1 before the upgrade"
    ]
    plan.errors.append("no metric contract for dcgm-exporter 4.7.1")
    plan.removed_apis.append("mon/x: FlowSchema fs uses flowcontrol.apiserver.k8s.io/v1beta3, removed in 1.32")
    found = steps.blockers(plan, stranded, targets)
    assert found[0] == "plan error: no metric contract for dcgm-exporter 4.7.1"
    assert found[1].startswith("removed API in use: mon/x: FlowSchema fs")


READYZ = "[+]ping ok\n[+]log ok\n[+]etcd ok\n[+]poststarthook/start-apiextensions-controllers ok\nreadyz check passed\n"


def test_precheck_reads_readyz_and_every_node():
    assert steps.precheck_problems(True, READYZ, {"cp-1": True, "gpu-1": True}) == []
    no_etcd = READYZ.replace("[+]etcd ok", "[-]etcd failed: reason withheld")
    assert steps.precheck_problems(False, no_etcd, {"gpu-1": False, "cp-1": True}) == [
        "API server not ready: [-]etcd failed: reason withheld",
        "etcd: the API server does not report `[+]etcd ok` in /readyz?verbose",
        "node gpu-1 is NotReady",
    ]
    assert steps.precheck_problems(False, "", {})[0] == "API server not ready: no answer"


@dataclasses.dataclass
class Rev:
    revision: int
    status: str
    chart_version: str
    values: dict


def test_rollbacks_put_each_release_of_the_step_back_last_first():
    before = {
        "slurm-operator-crds": Rev(2, "deployed", "1.2.0", {}),
        "slurm-operator": Rev(3, "deployed", "1.2.0", {"webhook": {"enabled": False}}),
        "slurm": Rev(4, "deployed", "1.2.0", {"a": 1}),
        "cert-manager": Rev(1, "deployed", "v1.19.1", {}),
    }
    now = {
        "slurm-operator-crds": Rev(3, "deployed", "1.2.1", {}),
        "slurm-operator": Rev(4, "deployed", "1.2.1", {"webhook": {"enabled": False}}),
        "slurm": Rev(6, "deployed", "1.2.0", {"a": 1}),  # 5 failed, 6 is Helm's --atomic "Rollback to 4"
        "cert-manager": Rev(1, "deployed", "v1.19.1", {}),
        "new": Rev(1, "failed", "0.1.0", {}),
    }
    got = steps.rollbacks((*SLURM_RELEASES, "new"), before, now)
    assert [(b.release, b.to_revision) for b in got] == [
        ("new", None),
        ("slurm", None),
        ("slurm-operator", 3),
        ("slurm-operator-crds", 2),
        ("cert-manager", None),
    ]
    assert got[0].detail.startswith("installed by this step")
    assert (
        got[1].detail == "already back: revision 6 holds revision 4's chart 1.2.0 and values (Helm's --atomic rollback)"
    )
    assert got[2].detail == "revision 4 (deployed, chart 1.2.1) -> rollback to revision 3 (chart 1.2.0)"
    assert got[4].detail == "untouched: still revision 1"
    # A rollback Helm made to a revision with other values (a failed one, say) is no way back: gpuforge rolls back.
    failed_back = {"slurm": Rev(6, "deployed", "1.2.0", {"a": 2})}
    assert steps.rollbacks(("slurm",), before, failed_back)[0].to_revision == 4


def test_recap_names_the_outcome_each_step_and_the_plan():
    rows = [
        {"step": "pre-check", "result": "done", "seconds": 3.1, "detail": "API server and etcd ready", "gate": "green"},
        {"step": "slurm", "result": "rolled back", "seconds": 40.0, "detail": "helm said no", "gate": ""},
    ]
    text = steps.recap_markdown("lab", ["component live target"], rows, "step slurm failed")
    assert text.splitlines()[:3] == ["# Upgrade of `lab`", "", "**step slurm failed**"]
    assert "- **pre-check** done in 3.1 s: API server and etcd ready (gate: green)" in text
    assert "- **slurm** rolled back in 40.0 s: helm said no" in text
    assert text.endswith("```\ncomponent live target\n```")


def test_cli_apply_refuses_a_bad_config_in_one_line_exit_2(tmp_path):
    bad = config_variant(LAB_CONFIG, tmp_path, lambda d: d["deepops_services"]["gpu-operator"].update(enabled="yes"))
    proc = subprocess.run(
        [sys.executable, "-m", "gpuforge_cli", "upgrade", "apply", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "deepops_services.gpu-operator.enabled: must be true or false, not 'yes'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def hosts():
    from gpuforge import desired

    return desired.build(load_config(LAB_CONFIG), {}).nodes  # cp-1 (control plane, etcd), gpu-1, gpu-2, cpu-1


def kube_live(server: str, **kubelets: str) -> up.LiveState:
    return up.LiveState(server, kubelets, {}, {})


def test_kubernetes_goes_control_plane_first_then_node_by_node_gated_after_the_control_plane_and_at_the_end(hosts):
    live = kube_live("v1.34.3", **{n.name: "v1.34.3" for n in hosts})
    plan = up.plan(live, [], pins.KUBE_VERSION)
    got = steps.kubernetes_steps(plan, live, hosts, pins.KUBE_VERSION, pins.KUBESPRAY_VERSION)
    assert [(s.title, s.hosts, s.gated) for s in got] == [
        ("kubernetes-control-plane", ("cp-1",), True),
        ("kubernetes-node gpu-1", ("gpu-1",), False),
        ("kubernetes-node gpu-2", ("gpu-2",), False),
        ("kubernetes-node cpu-1", ("cpu-1",), True),
    ]
    assert {s.kube for s in got} == {up.KubeStep("1.34.3", "1.35.4", "v2.31.0")}
    assert got[1].detail == "Kubernetes 1.34.3 -> 1.35.4: Kubespray v2.31.0 upgrade-cluster.yml --limit gpu-1"
    assert steps.out_of_service_reason(got[1]) == "gpuforge: upgrade: Kubernetes 1.35.4 (Kubespray v2.31.0)"
    why = steps.kept_out_reason(got[1], "jobs 12 train (alice) still run after 600s; " + "x" * 300)
    assert why.startswith("gpuforge: upgrade to Kubernetes 1.35.4 failed: jobs 12 train (alice)")
    assert len(why) == 200 and why.endswith("...")


def test_two_minors_repeat_the_round_and_a_half_done_upgrade_gets_the_nodes_left_only(hosts):
    live = kube_live("v1.33.7", **{n.name: "v1.33.7" for n in hosts})
    plan = up.plan(live, [], pins.KUBE_VERSION)
    got = steps.kubernetes_steps(plan, live, hosts, pins.KUBE_VERSION, pins.KUBESPRAY_VERSION)
    assert [(s.title, s.kube.to) for s in got] == [
        (name, to)
        for to in ("1.34.7", "1.35.4")
        for name in ("kubernetes-control-plane", *(f"kubernetes-node {n}" for n in ("gpu-1", "gpu-2", "cpu-1")))
    ]
    assert [s.gated for s in got] == [True, False, False, False, True, False, False, True]

    # The server and two nodes are at the pin: the two others only, through the pinned Kubespray, last one gated.
    half = kube_live("v1.35.4", **{"cp-1": "v1.35.4", "gpu-1": "v1.35.4", "gpu-2": "v1.34.3", "cpu-1": "v1.34.3"})
    plan = up.plan(half, [], pins.KUBE_VERSION)
    got = steps.kubernetes_steps(plan, half, hosts, pins.KUBE_VERSION, pins.KUBESPRAY_VERSION)
    assert [(s.title, s.gated) for s in got] == [("kubernetes-node gpu-2", False), ("kubernetes-node cpu-1", True)]
    assert got[0].kube == up.KubeStep("1.34.3", "1.35.4", "v2.31.0")
    at_pin = kube_live("v1.35.4", **{n.name: "v1.35.4" for n in hosts})
    assert steps.kubernetes_steps(up.plan(at_pin, [], pins.KUBE_VERSION), at_pin, hosts, "1.35.4", "v2.31.0") == []
