"""The upgrade planner as plain functions, with live states made from the real chart archives (current pins in
../shared/upstream/charts, previous pins in ../shared/upstream/previous) and the real Kubespray tarballs."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from gpuforge import pins
from gpuforge import upgrade as up
from gpuforge.config import load_config
from gpuforge.render import render_releases
from tests.conftest import config_variant

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO.parent / "shared" / "upstream"
CHARTS, PREVIOUS = UPSTREAM / "charts", UPSTREAM / "previous"
LAB_CONFIG = REPO / "deployments" / "lab" / "config.yml"
KUBESPRAY_TARBALLS = {
    "v2.30.0": PREVIOUS / "kubespray-v2.30.0.tar.gz",
    pins.KUBESPRAY_VERSION: UPSTREAM / f"kubespray-{pins.KUBESPRAY_VERSION}.tar.gz",
}


@pytest.fixture(scope="module")
def cfg():
    return load_config(LAB_CONFIG)


@pytest.fixture(scope="module")
def targets(cfg):
    return up.targets(render_releases(cfg), CHARTS)


PREVIOUS_ARCHIVES = {
    "gpu-operator": "gpu-operator-v26.3.3.tgz",
    "slurm-operator-crds": "slurm-operator-crds-1.2.0.tgz",
    "slurm-operator": "slurm-operator-1.2.0.tgz",
    "slurm": "slurm-1.2.0.tgz",
}


def previous_chart_facts() -> dict[str, up.ChartFacts]:
    """The facts of the charts the previous pins install (GPU Operator v26.3.3, Slinky 1.2.0), by release."""
    return {name: up.chart_facts(PREVIOUS / archive) for name, archive in PREVIOUS_ARCHIVES.items()}


@pytest.fixture(scope="module")
def previous_facts():
    return previous_chart_facts()


def live_from(targets, previous=None, server="v1.35.4") -> up.LiveState:
    """A cluster installed by gpuforge with these charts: each release deployed with its chart's values and the
    rendered user values, and the CRDs each install applied (`previous` replaces the current chart of a release)."""
    previous = previous or {}
    releases, crds = {}, {}
    for t in targets:
        facts = previous.get(t.release.name, t.facts)
        releases[t.release.name] = up.LiveRelease(
            t.release.name, t.release.namespace, facts.name, facts.version, "deployed", facts.values, t.release.values
        )
        crds.update(facts.crds_for(t.release.values))
    return up.LiveState(server, {"cp-1": server, "gpu-1": server}, releases, crds)


def test_kubespray_releases_are_the_checksum_keys_of_their_tarballs():
    for version, tarball in KUBESPRAY_TARBALLS.items():
        with tarfile.open(tarball) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("kubespray_defaults/vars/main/checksums.yml"))
            checksums = yaml.safe_load(tar.extractfile(member).read())
        assert up.KUBESPRAY_RELEASES[version] == tuple(checksums["kubelet_checksums"]["amd64"]), version


def test_kubernetes_path_is_one_minor_at_a_time_through_a_kubespray_that_takes_each_step():
    assert up.kube_path("1.35.4", "1.35.4") == []
    assert up.kube_path("v1.35.1", "1.35.4") == [up.KubeStep("1.35.1", "1.35.4", "v2.31.0")]
    assert up.kube_path("v1.34.3", "1.35.4") == [up.KubeStep("1.34.3", "1.35.4", "v2.31.0")]
    # v2.31.0 upgrades nothing older than 1.33.0 (its oldest checksum): the first step needs v2.30.0
    assert up.kube_path("1.32.5", "1.35.4") == [
        up.KubeStep("1.32.5", "1.33.7", "v2.30.0"),
        up.KubeStep("1.33.7", "1.34.7", "v2.31.0"),
        up.KubeStep("1.34.7", "1.35.4", "v2.31.0"),
    ]


@pytest.mark.parametrize(
    ("live", "target", "message"),
    [
        ("1.35.4", "1.34.7", "newer than the pin 1.34.7: gpuforge does not downgrade"),
        ("1.31.9", "1.35.4", "no Kubespray release gpuforge knows takes Kubernetes 1.31.9 to 1.32"),
        ("1.34.3", "1.35.9", "no Kubespray release gpuforge knows takes Kubernetes 1.34.3 to 1.35"),
        ("banana", "1.35.4", "'banana' is not a Kubernetes version"),
    ],
)
def test_impossible_kubernetes_paths_say_why(live, target, message):
    with pytest.raises(up.PlanError, match=message.replace(".", r"\.").replace("(", r"\(")):
        up.kube_path(live, target)


def test_chart_facts_read_crds_folders_subchart_conditions_and_plain_template_crds(targets):
    by_name = {t.release.name: t.facts for t in targets}
    gpu = by_name["gpu-operator"]
    assert (gpu.name, gpu.version) == ("gpu-operator", "v26.7.0")
    assert gpu.values["dcgmExporter"]["version"] == "4.6.0-4.8.3-distroless"
    condition, policy = gpu.crds["clusterpolicies.nvidia.com"]
    assert condition is None and policy.served == ("v1",) and policy.storage == "v1" and not policy.helm_upgrades_it
    assert gpu.crds["nodefeatures.nfd.k8s-sigs.io"][0] == "nfd.enabled"  # the NFD subchart's crds/
    assert "nodefeatures.nfd.k8s-sigs.io" not in gpu.crds_for({"nfd": {"enabled": False}})
    # Slinky ships its CRDs as templates (Helm upgrades those); slurm-operator's copy only with crds.enabled
    crds = by_name["slurm-operator-crds"].crds_for({})
    assert len(crds) == 6 and all(c.helm_upgrades_it and c.group == up.SLINKY_GROUP for c in crds.values())
    assert by_name["slurm-operator"].crds_for({}) == {}
    assert len(by_name["slurm-operator"].crds_for({"crds": {"enabled": True}})) == 6
    # kube-prometheus-stack's CRDs hold YAML's `=`; its templated upgrade-Job CRDs are not read
    assert len(by_name["kube-prometheus-stack"].crds) == 10


def test_a_cluster_at_the_pins_has_nothing_to_do(targets):
    p = up.plan(live_from(targets), targets, pins.KUBE_VERSION)
    assert p.errors == [] and p.exit_code == 0 and not p.has_changes
    assert p.crd_changes == [] and p.kube_path == [] and p.contract is None and p.risks == []
    assert up.plan_lines(p)[-1] == "nothing to do: the cluster is at the pins"


def test_a_cluster_at_the_previous_pins_lists_every_change(targets, previous_facts):
    live = live_from(targets, previous_facts, server="v1.34.3")
    p = up.plan(live, targets, pins.KUBE_VERSION)
    assert p.errors == [] and p.exit_code == 2
    changed = {c.component: (c.live, c.target) for c in p.components if c.changes}
    assert changed == {
        "kubernetes": ("1.34.3", "1.35.4"),
        "helm/gpu-operator": ("v26.3.3", "v26.7.0"),
        "helm/slurm-operator-crds": ("1.2.0", "1.2.1"),
        "helm/slurm-operator": ("1.2.0", "1.2.1"),
        "helm/slurm": ("1.2.0", "1.2.1"),
        "dcgm-exporter": ("4.5.3-4.8.2-distroless", "4.6.0-4.8.3-distroless"),
    }
    assert p.kube_path == [up.KubeStep("1.34.3", "1.35.4", "v2.31.0")]
    assert {(c.crd, c.change) for c in p.crd_changes} == {
        ("gpuclusters.nvidia.com", "new"),
        ("computedomains.resource.nvidia.com", "new"),
        ("computedomaincliques.resource.nvidia.com", "new"),
        ("clusterpolicies.nvidia.com", "schema"),
        ("nvidiadrivers.nvidia.com", "schema"),
    }
    assert p.contract.lines() == ["label renamed: node: Hostname -> hostname"]
    risks = "\n".join(p.risks)
    for expected in (
        "driver 580.126.20 -> 595.91.07: the driver DaemonSet unloads and reloads the kernel modules",
        "toolkit v1.19.1 -> v1.20.0",
        "devicePlugin v0.19.3 -> v0.20.0",
        "autoUpgrade=true, maxParallelUpgrades=1, drain.enable=False",
        "dcgm-exporter 4.8.2 -> 4.8.3 changes the metric contract",
        "CRD gpuclusters.nvidia.com (gpu-operator, new: served v1alpha1) sits in the chart's crds/",
        "Slinky charts move but their CRDs do not change",
        "Kubernetes 1.34.3 -> 1.35.4 in 1 step(s)",
    ):
        assert expected in risks
    lines = up.plan_lines(p)
    assert "crd new      gpuclusters.nvidia.com (gpu-operator): served v1alpha1 [crds/: apply explicitly]" in lines
    assert lines[-1].startswith("6 component(s) to change, 1 Kubernetes step(s), 5 CRD change(s)")


def test_a_fresh_install_of_a_chart_needs_no_explicit_crd_apply(targets):
    live = live_from(targets)
    del live.releases["gpu-operator"]
    for name in next(t for t in targets if t.release.name == "gpu-operator").facts.crds:
        live.crds.pop(name, None)
    p = up.plan(live, targets, pins.KUBE_VERSION)
    assert {c.component: c.live for c in p.components}["helm/gpu-operator"] == "absent"
    assert p.crd_changes and not any("crds/" in r for r in p.risks)  # helm install applies crds/ itself


def test_crd_versions_and_stranded_stored_versions(targets):
    live = live_from(targets)
    policy = live.crds["clusterpolicies.nvidia.com"]
    live.crds[policy.name] = dataclasses.replace(
        policy,
        versions={**policy.versions, "v1alpha1": up.CrdVersion(True, False, "")},
        stored_versions=("v1alpha1", "v1"),
    )
    p = up.plan(live, targets, pins.KUBE_VERSION)
    assert [(c.crd, c.change, c.detail) for c in p.crd_changes] == [
        ("clusterpolicies.nvidia.com", "versions", "served v1, v1alpha1 -> v1")
    ]
    assert (
        "clusterpolicies.nvidia.com: objects may be stored at v1alpha1, which the target no longer serves: "
        "migrate them to v1 before the upgrade"
    ) in p.risks
    assert p.exit_code == 2


def test_live_objects_on_apis_a_kubernetes_step_removes_are_listed(targets):
    live = live_from(targets, server="v1.31.4")
    live.releases["monitoring"] = up.LiveRelease(
        "monitoring", "mon", "old", "1", "deployed", {}, {},
        objects=(("flowcontrol.apiserver.k8s.io/v1beta3", "FlowSchema", "fs"), ("v1", "Service", "svc")),
    )  # fmt: skip
    steps = [up.KubeStep("1.31.4", "1.32.11", "v2.30.0")]
    assert up.removed_api_uses(live.releases.values(), steps) == [
        "mon/monitoring: FlowSchema fs uses flowcontrol.apiserver.k8s.io/v1beta3, removed in Kubernetes 1.32"
    ]
    assert up.removed_api_uses(live.releases.values(), [up.KubeStep("1.34.3", "1.35.4", "v2.31.0")]) == []


def test_what_cannot_be_planned_is_an_error_exit_1(targets):
    gpu = next(t for t in targets if t.release.name == "gpu-operator")
    odd = dataclasses.replace(
        gpu, release=dataclasses.replace(gpu.release, values={"dcgmExporter": {"version": "4.4.2-4.7.1-ubuntu22.04"}})
    )
    p = up.plan(live_from(targets), [odd], pins.KUBE_VERSION)
    assert p.exit_code == 1 and "no metric contract for dcgm-exporter 4.7.1" in p.errors[0]
    blind = dataclasses.replace(gpu, release=dataclasses.replace(gpu.release, version="v26.9.0"), facts=None)
    p = up.plan(live_from(targets), [blind], pins.KUBE_VERSION)
    assert p.exit_code == 1 and "chart gpu-operator v26.9.0 is not at hand" in p.errors[0]
    p = up.plan(live_from(targets, server="v1.36.0"), targets, pins.KUBE_VERSION)
    assert p.exit_code == 1 and "gpuforge does not downgrade" in p.errors[0]


def test_live_state_from_what_the_read_verbs_return():
    crd = {
        "metadata": {"name": "nodesets.slinky.slurm.net"},
        "spec": {"group": "slinky.slurm.net", "names": {"kind": "NodeSet"}, "versions": [
            {"name": "v1beta1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {"type": "object"}}}
        ]},
        "status": {"storedVersions": ["v1beta1"]},
    }  # fmt: skip
    release = {
        "namespace": "slinky", "chart": "slurm-operator", "version": "1.2.0", "status": "deployed",
        "chart_values": {"crds": {"enabled": False}}, "values": {"webhook": {"enabled": False}},
        "objects": [["apps/v1", "Deployment", "slurm-operator"]],
    }  # fmt: skip
    live = up.live_state("v1.35.4", {"cp-1": "1.35.4"}, {"slurm-operator": release}, [crd])
    r = live.releases["slurm-operator"]
    assert r.objects == (("apps/v1", "Deployment", "slurm-operator"),) and r.value("webhook.enabled") is False
    nodesets = live.crds["nodesets.slinky.slurm.net"]
    assert (nodesets.kind, nodesets.served, nodesets.storage, nodesets.stored_versions) == (
        "NodeSet", ("v1beta1",), "v1beta1", ("v1beta1",),
    )  # fmt: skip


def test_an_unreadable_chart_archive_is_a_plan_error(tmp_path):
    broken = tmp_path / "gpu-operator-v26.7.0.tgz"
    broken.write_bytes(b"not a tarball")
    with pytest.raises(up.PlanError, match="not a readable chart archive"):
        up.chart_facts(broken)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpuforge_cli", "upgrade", "plan", *args], capture_output=True, text=True, cwd=REPO
    )


def test_cli_refuses_a_bad_config_in_one_line_exit_1(tmp_path):
    bad = config_variant(LAB_CONFIG, tmp_path, lambda d: d["deepops_services"]["gpu-operator"].update(enabled="yes"))
    proc = run_cli("--config", str(bad))
    assert proc.returncode == 1 and proc.stdout == ""
    assert re.fullmatch(r".*config\.yml:\d+:\d+: deepops_services\.gpu-operator\.enabled: .*\n", proc.stderr)


def test_cli_without_a_reachable_cluster_says_so_exit_1(tmp_path):
    gone = tmp_path / "missing-kubeconfig"
    cfg = config_variant(LAB_CONFIG, tmp_path, lambda d: d.update(kubeconfig=str(gone)))
    proc = run_cli("--config", str(cfg))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"upgrade plan: cannot read the cluster ({gone}): kubeconfig {gone} does not exist; " \
        "run the kubespray phase or set kubeconfig\n"  # fmt: skip


def test_kubelets_behind_a_server_at_the_pin_are_a_change(targets):
    live = live_from(targets)
    live.kubelets["gpu-1"] = "v1.34.7"
    p = up.plan(live, targets, pins.KUBE_VERSION)
    assert [(c.component, c.live, c.target) for c in p.components if c.changes] == [
        ("kubelets", "gpu-1 1.34.7", pins.KUBE_VERSION)
    ]
    assert p.exit_code == 2
