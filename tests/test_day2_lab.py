"""Day-2 against the lab: gpu-health verdicts for injected DCGM faults, remediation on both sides (Kubernetes
cordon + Slurm drain) and back (--release), and drift for changes made behind gpuforge's back.

Uses the session lab of tests/conftest.py (installed here once; install is idempotent); with
GPUFORGE_DAY2_OWN_LAB=1 a lab of its own (other names and addresses), to run beside a session holding that one. Every fault is reset
after its test, and the next test starts only once every GPU is healthy again. The configs used here are the
lab config plus a 20 s XID window (tests/conftest.py: configs, cfg).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import day2_variant

pytestmark = pytest.mark.timeout(900)

if os.environ.get("GPUFORGE_DAY2_OWN_LAB"):
    # Beside another pytest session that holds the shared lab's names and addresses: a lab of its own.
    @pytest.fixture(scope="session")
    def lab_config(tmp_path_factory):
        from tests.conftest import make_lab_config

        folder = tmp_path_factory.mktemp("day2lab")
        os.environ["GPUFORGE_STATE"] = str(folder / "gpuforge-state")
        return make_lab_config(folder, prefix="x", ip_base=170, cluster="gpuforge-day2-test")


@pytest.fixture(scope="module")
def names(cfg):
    """The lab's GPU nodes: one in the Slurm NodeSet (8 GPUs), one for Kubernetes jobs only (4 GPUs)."""
    slurm_node = cfg.slurm_gpu_nodes[0].name
    k8s_only = next(n.name for n in cfg.gpu_nodes if not n.spec.slurm)
    return {"slurm": slurm_node, "k8s": k8s_only}


def verdicts_now(cfg):
    from gpuforge.desired import expected_gpu_counts, learned_gpu_counts
    from gpuforge.health import resolve_thresholds
    from tasks import kube, prometheus

    nodes = kube.list_nodes(cfg.kubeconfig_path())
    fleet, _ = prometheus.evaluate_fleet(
        prometheus.prometheus(cfg),
        expected_gpu_counts(cfg, learned_gpu_counts(cfg, nodes)),
        resolve_thresholds(cfg.health.thresholds),
    )
    return fleet.verdicts  # the GPUs judged one by one: every GPU not healthy is among them


def not_healthy(verdicts) -> dict[tuple[str, int], tuple[str, str]]:
    def get(v, key):
        return v[key] if isinstance(v, dict) else getattr(v, key)

    return {
        (get(v, "node"), get(v, "gpu")): (str(get(v, "verdict")), "; ".join(get(v, "reasons")))
        for v in verdicts
        if str(get(v, "verdict")) != "healthy"
    }


def wait_for_verdicts(cfg, expected: dict[tuple[str, int], str], timeout: float = 40) -> None:
    """Poll (no Prefect) until exactly `expected` {(node, gpu): verdict} are not healthy."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = not_healthy(verdicts_now(cfg))
        if {k: v for k, (v, _) in seen.items()} == expected:
            return
        time.sleep(1)
    raise AssertionError(f"after {timeout}s: {seen}, want {expected}")


def sinfo(lab) -> dict:
    from gpuforge.remediation import SINFO_ARGV, parse_sinfo

    return parse_sinfo(lab.slurm.run(*SINFO_ARGV).stdout)


def node_state(cfg, name):
    from tasks import kube

    return kube.list_nodes(cfg.kubeconfig_path())[name]


def run_health(config_path: Path, release: str | None = None) -> tuple[dict, object]:
    from flows.gpu_health import HealthCheckFailed, HealthParams, gpu_health

    state = gpu_health(HealthParams(config=str(config_path), release=release), return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, HealthCheckFailed):
        assert state.is_failed()
        return result.report, state
    assert not isinstance(result, BaseException), result
    assert state.is_completed()
    return result, state


@pytest.fixture(autouse=True)
def clean_faults(installed, cfg, names):
    """Every test starts healthy and leaves no fault, cordon or Slurm drain behind."""
    yield
    from tasks.kube import set_cordon

    installed.dcgm.reset()
    for node in names.values():
        if node_state(cfg, node).unschedulable:
            set_cordon(cfg.kubeconfig_path(), node, False, None)
    for name, sn in sinfo(installed).items():
        if sn.out_of_service:
            installed.slurm.run("scontrol", "update", f"nodename={name}", "state=resume")
    wait_for_verdicts(cfg, {}, timeout=60)


# ------------------------------------------------------------------------------------------------ health


def test_healthy_lab_every_gpu_healthy_exit_0(configs, cfg):
    wait_for_verdicts(cfg, {})
    report, _ = run_health(configs["off"])
    assert report["exit_code"] == 0
    total = sum(n.spec.gpu_count for n in cfg.gpu_nodes)
    assert report["counts"] == {"healthy": total, "degraded": 0, "unhealthy": 0, "unknown": 0}
    assert report["queries"] <= 10 and report["errors"] == []
    # Nothing to look at closely: every GPU counted healthy per node from the fleet summary, none listed.
    assert report["gpus"] == [] and report["healthy_gpus_by_node"] == {n.name: n.spec.gpu_count for n in cfg.gpu_nodes}
    assert all(r["consistent"] and r["kubernetes"] == "schedulable" for r in report["nodes"])


FAULTS = [
    # id, node key, GPU, fault, expected {gpu: (verdict, reason fragment)} on that node
    ("ecc-dbe", "k8s", 1, ("set_value", "ECC_DBE_VOL_TOTAL", 2), {1: ("unhealthy", "ECC DBE volatile 2 > 0")}),
    ("pending-remap", "slurm", 5, ("set_value", "ROW_REMAP_PENDING", 1), {5: ("degraded", "row remap pending")}),
    ("overheating", "k8s", 0, ("set_value", "GPU_TEMP", 96), {0: ("degraded", "GPU temp 96 °C > 85 °C")}),
    ("missing-gpu", "slurm", 7, ("remove_gpu",), {7: ("unhealthy", "GPU 7 missing")}),
    ("stopped-node", "k8s", None, ("stop_node",), {i: ("unknown", "dcgm-exporter down") for i in range(4)}),
    # Last: its XID stays in the window for XID_WINDOW after the reset.
    ("fatal-xid-79", "slurm", 3, ("set_value", "XID_ERRORS", 79), {3: ("unhealthy", "XID 79 (GPU has fallen off")}),
]


@pytest.mark.parametrize(("key", "gpu", "fault", "want"), [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_fault_gives_exactly_that_verdict_for_exactly_that_gpu(installed, configs, cfg, names, key, gpu, fault, want):
    node = names[key]
    action, *args = fault
    if action == "set_value":
        installed.dcgm.set_value(node, gpu, args[0], args[1])
    elif action == "remove_gpu":
        installed.dcgm.remove_gpu(node, gpu)
    else:
        installed.dcgm.stop_node(node)
    expected = {(node, g): verdict for g, (verdict, _) in want.items()}
    wait_for_verdicts(cfg, expected)

    before = {n: node_state(cfg, n).unschedulable for n in names.values()}
    report, state = run_health(configs["off"])
    got = not_healthy(report["gpus"])
    assert set(got) == set(expected)
    assert node not in report["healthy_gpus_by_node"] and len(report["healthy_gpus_by_node"]) == len(cfg.gpu_nodes) - 1
    for g, (verdict, fragment) in want.items():
        assert got[(node, g)][0] == verdict
        assert fragment in got[(node, g)][1], got[(node, g)]
    assert report["exit_code"] == (2 if action == "stop_node" else 1)
    assert state.is_failed() and node in state.message  # the failure (and its notification) names it
    row = next(r for r in report["nodes"] if r["node"] == node)
    assert row["verdict"] == next(iter(want.values()))[0]
    # remediate: off -> nothing changes.
    assert {n: node_state(cfg, n).unschedulable for n in names.values()} == before
    assert all(a["status"] == "skipped" for a in report["actions"])


def test_missing_gpu_is_unhealthy_with_the_default_2h_window(installed, lab_config, names):
    """A GPU that stops exporting keeps windowed-increase series for the whole window: it must still read as
    missing (unhealthy), not as present with stale metrics (unknown) for two hours."""
    from gpuforge.config import load_config

    default = load_config(lab_config)  # xid_window 2h
    node = names["k8s"]
    installed.dcgm.remove_gpu(node, 2)
    deadline = time.monotonic() + 40
    got = None
    while time.monotonic() < deadline:
        got = not_healthy(verdicts_now(default)).get((node, 2))
        if got and got[0] == "unhealthy":
            break
        time.sleep(1)
    assert got == ("unhealthy", f"GPU 2 missing (expected on {node})")


def test_prometheus_down_every_gpu_unknown_and_the_run_fails(installed, lab_config, cfg, tmp_path):
    from tests.conftest import free_port

    down = day2_variant(lab_config, "day2-promdown", prometheus_url=f"http://127.0.0.1:{free_port()}")
    report, state = run_health(down)
    assert state.is_failed() and report["exit_code"] == 2
    total = sum(n.spec.gpu_count for n in cfg.gpu_nodes)
    assert report["counts"] == {"healthy": 0, "degraded": 0, "unhealthy": 0, "unknown": total}
    assert report["queries"] == 0 and "did not answer" in report["errors"][0]


# ------------------------------------------------------------------------------------------- remediation


def health_with_dbe_on_gpu_2(installed, cfg, config, node):
    """An ECC DBE on GPU 2 of `node`, seen by Prometheus, then one gpu-health run (exit 1) with `config`."""
    installed.dcgm.set_value(node, 2, "ECC_DBE_VOL_TOTAL", 1)
    wait_for_verdicts(cfg, {(node, 2): "unhealthy"})
    report, _ = run_health(config)
    assert report["exit_code"] == 1
    return report


def test_remediation_off_changes_nothing(installed, configs, cfg, names):
    node = names["slurm"]
    report = health_with_dbe_on_gpu_2(installed, cfg, configs["off"], node)
    state = node_state(cfg, node)
    assert not state.unschedulable and "gpuforge.io/cordoned-reason" not in state.annotations
    assert sinfo(installed)[node].state == "idle"
    assert [(a["node"], a["kind"], a["status"]) for a in report["actions"]] == [(node, "cordon", "skipped")]
    assert report["actions"][0]["detail"].startswith("remediate is off; would cordon: GPU 2: ECC DBE")


def test_remediation_cordons_and_drains_then_release_closes_the_loop(installed, configs, cfg, names):
    node = names["slurm"]
    report = health_with_dbe_on_gpu_2(installed, cfg, configs["on"], node)
    assert [(a["kind"], a["status"]) for a in report["actions"]] == [("cordon", "done"), ("drain-slurm", "done")]
    state = node_state(cfg, node)
    note = state.annotations["gpuforge.io/cordoned-reason"]
    assert state.unschedulable and "GPU 2: ECC DBE volatile 1 > 0" in note and "gpu-health at 20" in note
    slurm = sinfo(installed)[node]
    assert slurm.drained and slurm.reason.startswith("gpuforge: GPU 2: ECC DBE volatile 1 > 0")
    row = next(r for r in report["nodes"] if r["node"] == node)
    assert row["kubernetes"] == "cordoned" and row["slurm_state"] == "drained" and row["consistent"]
    assert any(r["slurm_node"] == node and r["reason"].startswith("gpuforge:") for r in report["slurm_out_of_service"])

    # A second run changes nothing: the node is already out on both sides.
    report, _ = run_health(configs["on"])
    assert report["actions"] == []

    # Release while the GPU is still bad: kept out on both sides, with the reason.
    report, state = run_health(configs["on"], release=node)
    assert state.is_failed() and not report["released"] and report["exit_code"] == 1
    assert any("GPU 2 unhealthy: ECC DBE volatile 1 > 0" in r for r in report["reasons"])
    assert node_state(cfg, node).unschedulable and sinfo(installed)[node].drained

    # Fixed: the release re-validates with a Slurm job on that node (its GPUs are the slurmd pod's), then
    # resumes the Slurm node and uncordons.
    installed.dcgm.reset()
    wait_for_verdicts(cfg, {})
    report, _ = run_health(configs["on"], release=node)
    assert report["released"] and report["exit_code"] == 0
    assert report["validation"]["ok"] and "sbatch -w" in report["validation"]["how"]
    assert "COMPLETED, exit 0:0" in report["validation"]["detail"]
    state = node_state(cfg, node)
    assert not state.unschedulable and "gpuforge.io/cordoned-reason" not in state.annotations
    assert sinfo(installed)[node].state == "idle"
    reservations = installed.slurm.run("scontrol", "show", "reservation").stdout
    assert "gpuforge-release" not in reservations


def test_slurm_node_drained_by_someone_else_is_in_the_report(installed, configs, cfg, names):
    node = names["slurm"]
    installed.slurm.run("scontrol", "update", f"nodename={node}", "state=drain", "reason=bad cable (alice)")
    report, _ = run_health(configs["on"])
    assert report["exit_code"] == 0  # its GPUs are healthy
    row = next(r for r in report["nodes"] if r["node"] == node)
    assert row["slurm_state"].startswith("drain") and row["slurm_reason"] == "bad cable (alice)" and row["consistent"]
    (out,) = report["slurm_out_of_service"]
    assert (out["slurm_node"], out["node"], out["reason"]) == (node, node, "bad cable (alice)")
    assert report["actions"] == [] and not node_state(cfg, node).unschedulable  # not gpuforge's to change


def test_release_of_kubernetes_only_node_runs_a_cuda_smoke_pod_through_the_cordon(installed, configs, cfg, names):
    node = names["k8s"]
    installed.dcgm.set_value(node, 0, "ROW_REMAP_FAILURE", 1)
    wait_for_verdicts(cfg, {(node, 0): "unhealthy"})
    report, _ = run_health(configs["on"])
    assert [(a["node"], a["kind"], a["status"]) for a in report["actions"]] == [(node, "cordon", "done")]
    assert node_state(cfg, node).unschedulable
    installed.dcgm.reset()
    wait_for_verdicts(cfg, {})
    report, _ = run_health(configs["on"], release=node)
    assert report["released"], report
    assert (
        report["validation"]["detail"] == "vectorAdd: Test PASSED" and "CUDA smoke pod" in report["validation"]["how"]
    )
    assert not node_state(cfg, node).unschedulable


def test_max_fraction_keeps_the_second_node_in(installed, configs, cfg, names):
    installed.dcgm.set_value(names["slurm"], 1, "ECC_DBE_VOL_TOTAL", 1)
    installed.dcgm.set_value(names["slurm"], 2, "ECC_DBE_VOL_TOTAL", 1)
    installed.dcgm.set_value(names["k8s"], 1, "ECC_DBE_VOL_TOTAL", 1)
    wait_for_verdicts(
        cfg, {(names["slurm"], 1): "unhealthy", (names["slurm"], 2): "unhealthy", (names["k8s"], 1): "unhealthy"}
    )
    report, _ = run_health(configs["on"])  # 2 GPU nodes x 0.5: one may be out
    assert [(a["node"], a["kind"], a["status"]) for a in report["actions"]] == [
        (names["slurm"], "cordon", "done"),
        (names["slurm"], "drain-slurm", "done"),
        (names["k8s"], "cordon", "skipped"),
    ]
    assert report["actions"][2]["detail"].startswith("limit reached: 1 of 2 GPU nodes out, at most 1")
    assert not node_state(cfg, names["k8s"]).unschedulable


# ------------------------------------------------------------------------------------------------- drift


def run_drift(config_path: Path) -> dict:
    from flows.common import ClusterParams
    from flows.drift import DriftFound, drift

    state = drift(ClusterParams(config=str(config_path)), return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, DriftFound):
        return result.report
    assert state.is_completed(), result
    return result


def one_item(report: dict) -> dict:
    assert report["exit_code"] == 2 and len(report["items"]) == 1, report["items"]
    return report["items"][0]


def test_fresh_install_has_no_drift(configs):
    report = run_drift(configs["off"])
    assert report["exit_code"] == 0 and report["items"] == [] and report["errors"] == []
    assert report["summary"] == "no drift"
    assert report["api_calls"]["kubernetes"] == 4 and report["api_calls"]["slurm"] == 1


def test_helm_value_changed_with_helm_is_one_item(installed, configs, cfg):
    from gpuforge.render import chart_archive, chart_mirror, render_releases
    from tasks.helm import helm_executable

    release = next(r for r in render_releases(cfg) if r.name == "gpu-operator")
    archive = str(chart_archive(release, chart_mirror(cfg, os.environ)))  # the real chart, from the lab's mirror
    env = {"KUBECONFIG": str(cfg.kubeconfig_path()), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}

    def helm(*args):
        subprocess.run([helm_executable(), *args], check=True, capture_output=True, env=env, timeout=120)

    helm("upgrade", "gpu-operator", archive, "-n", "gpu-operator", "--version", release.version,
         "--reuse-values", "--set", "dcgmExporter.serviceMonitor.honorLabels=false")  # fmt: skip
    try:
        item = one_item(run_drift(configs["off"]))
        assert item["path"] == "/helm/gpu-operator/values/dcgmExporter/serviceMonitor/honorLabels"
        assert (item["desired"], item["live"], item["severity"]) == (True, False, "warning")
    finally:
        helm("rollback", "gpu-operator", "-n", "gpu-operator", "--wait")
    assert run_drift(configs["off"])["items"] == []


def test_relabelled_node_is_one_item(installed, configs, cfg, names):
    from kubernetes import client

    from tasks.kube import api_client

    node = names["slurm"]
    with api_client(cfg.kubeconfig_path()) as api:
        core = client.CoreV1Api(api)
        old = core.read_node(node).metadata.labels["gpuforge.io/nodeset"]
        core.patch_node(node, {"metadata": {"labels": {"gpuforge.io/nodeset": "elsewhere"}}})
        try:
            item = one_item(run_drift(configs["off"]))
            assert item["path"] == f"/nodes/{node}/labels/gpuforge.io~1nodeset"
            assert (item["desired"], item["live"]) == (old, "elsewhere")
        finally:
            core.patch_node(node, {"metadata": {"labels": {"gpuforge.io/nodeset": old}}})


def test_lowered_allocatable_gpus_is_one_item(installed, configs, cfg, names):
    """The lab's reconciler plays the device plugin: it reports the GPUs of its inventory, so a GPU lost to the
    device plugin is an inventory change (a direct status patch would be undone within a second)."""
    node = names["slurm"]
    inventory = installed.workdir / "gpu-inventory.json"
    original = inventory.read_text()
    data = json.loads(original)
    data[node]["gpus"] -= 2
    inventory.write_text(json.dumps(data))
    try:
        deadline = time.monotonic() + 30
        while node_state(cfg, node).allocatable_gpus != data[node]["gpus"] and time.monotonic() < deadline:
            time.sleep(0.5)
        item = one_item(run_drift(configs["off"]))
        assert item["path"] == f"/nodes/{node}/allocatableGpus"
        assert (item["desired"], item["live"], item["severity"]) == (
            data[node]["gpus"] + 2,
            data[node]["gpus"],
            "critical",
        )
    finally:
        inventory.write_text(original)
        deadline = time.monotonic() + 30
        while node_state(cfg, node).allocatable_gpus != data[node]["gpus"] + 2 and time.monotonic() < deadline:
            time.sleep(0.5)


def test_scaled_nodeset_is_one_item(installed, configs, cfg):
    from tasks.kube import list_custom

    sets = list_custom(cfg.kubeconfig_path(), "slinky.slurm.net", "v1beta1", "nodesets", "slurm")
    assert len(sets) == 1
    name, replicas = sets[0]["metadata"]["name"], sets[0]["spec"]["replicas"]
    key = name.split("-worker-", 1)[1]

    def scale(n: int) -> None:
        from kubernetes import client

        from tasks.kube import api_client

        with api_client(cfg.kubeconfig_path()) as api:
            client.CustomObjectsApi(api).patch_namespaced_custom_object(
                "slinky.slurm.net", "v1beta1", "slurm", "nodesets", name, {"spec": {"replicas": n}}
            )

    scale(replicas + 1)
    try:
        item = one_item(run_drift(configs["off"]))
        assert item["path"] == f"/slurm/nodesets/{key}/replicas"
        assert (item["desired"], item["live"]) == (replicas, replicas + 1)
    finally:
        scale(replicas)
    assert run_drift(configs["off"])["exit_code"] == 0


def test_drift_is_read_only(installed, configs, cfg):
    """A drift run leaves every node and release exactly as it found them."""
    from tasks import kube
    from tasks.helm import read_releases

    def snapshot():
        nodes = {
            n: (s.labels, s.annotations, s.taints, s.unschedulable)
            for n, s in kube.list_nodes(cfg.kubeconfig_path()).items()
        }
        releases = {n: r["revision"] for n, r in read_releases(cfg.kubeconfig_path()).items()}
        return nodes, releases

    before = snapshot()
    run_drift(configs["off"])
    assert snapshot() == before
