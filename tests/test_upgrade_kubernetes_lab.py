"""`gpuforge upgrade apply`'s Kubernetes steps against the lab (real API server, Helm, Slurm, the real charts).

The lab's control plane is put back at Kubernetes 1.34.3 (the previous pin, Kubespray v2.30.0's default; its binaries
built by lab/build/build-binaries.sh with K8S_VERSION=1.34.3) with its etcd data, and every kwok node's kubelet at
1.34.3, while the config keeps kubespray.kube_version at the current pin. The lab's stand-in for Kubespray's
upgrade-cluster.yml (lab/kubespray/lab-upgrade-cluster.yml) runs the real Kubespray inventory validation and facts,
then restarts the lab control plane at the new version or sets a kwok node's kubelet version: Kubespray's own
upgrade-cluster.yml does not run here.

1. plan lists the Kubernetes step (exit 2); apply (a Slurm job running on the Slurm GPU node, which ends only once
   the flow has drained that node and is waiting for it) brings the control plane and every node to 1.35.4:
   control plane gated, node by node, the job's end before that node's upgrade; the plan then exits 0.
   A Deployment's pod on the CPU node (a PodDisruptionBudget allowing one eviction) is evicted at that node's
   step and runs on the control-plane node afterwards.
2. Back at 1.34.3, a PodDisruptionBudget that allows no eviction and a pod pinned to the CPU node: the pre-check
   refuses before anything moves (exit 2), naming both.
3. A job that outlasts --drain-timeout: the control plane moves, then the Slurm GPU node's step
   fails and leaves it cordoned and Slurm-drained with the reason naming the job; exit 1.
4. With the job gone and the node returned (`gpuforge health --release`), apply finishes the nodes left; the lab is
   at the current pins again for later modules.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from tests import test_upgrade_apply_lab as apply_lab
from tests.conftest import day2_variant
from tests.test_upgrade_apply_lab import apply, finish_apply, start_apply
from tests.test_upgrade_lab import run_plan

pytestmark = pytest.mark.timeout(2400)

PREVIOUS = "1.34.3"
TIMINGS: dict[str, float] = {}
cfg, prefect_home = apply_lab.cfg, apply_lab.prefect_home  # the same module fixtures


@pytest.fixture(scope="module")
def upgrade_config(lab_config):
    """The lab config with the day-2 XID window (20 s): an XID that an earlier module injected is still inside the
    default 2 h window and would keep a node out of service at its re-validation (seen in the full CI run)."""
    return day2_variant(lab_config, "upgrade-kubernetes")


@pytest.fixture(scope="module")
def names(cfg):
    control = next(n.name for n in cfg.nodes if n.spec.is_control_plane)
    slurm_gpu = cfg.slurm_gpu_nodes[0].name
    other_gpu = next(n.name for n in cfg.gpu_nodes if n.name != slurm_gpu)
    cpu = next(n.name for n in cfg.nodes if not n.spec.is_gpu and not n.spec.is_control_plane)
    return {"control": control, "slurm_gpu": slurm_gpu, "other_gpu": other_gpu, "cpu": cpu}


def wait(what: str, check, timeout: float, pause: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(pause)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def versions(cfg) -> tuple[str, dict[str, str]]:
    from tasks import kube

    kubeconfig = cfg.kubeconfig_path()
    return kube.server_version(kubeconfig), {n: s.kubelet_version for n, s in kube.list_nodes(kubeconfig).items()}


def put_kubernetes_at(lab, cfg, version: str) -> None:
    """The lab's control plane at `version` (etcd and its data kept), every kwok node's kubelet too."""
    from lab import nodes as lab_nodes
    from lab.controlplane import ControlPlane
    from lab.lab import BIN_DIR

    if versions(cfg) == (f"v{version}", {n.name: version for n in cfg.nodes}):
        return
    started = time.monotonic()
    ControlPlane(lab.cp.workdir, BIN_DIR, k8s_version=version).set_version()
    for name in (n.name for n in cfg.nodes):
        lab_nodes.set_kubelet_version(cfg.kubeconfig_path(), name, version)
    wait(
        f"server and kubelets at {version}",
        lambda: versions(cfg) == (f"v{version}", {n.name: version for n in cfg.nodes}),
        120,
    )
    TIMINGS[f"lab to {version}"] = round(time.monotonic() - started, 1)


def job_end(lab, job: str) -> dt.datetime:
    """The job's EndTime (slurmctld's local time, this machine's: UTC in the lab)."""
    info = lab.slurm.run("scontrol", "-o", "show", "job", job).stdout
    end = next(t.split("=", 1)[1] for t in info.split() if t.startswith("EndTime="))
    return dt.datetime.fromisoformat(end).astimezone(dt.UTC)


def slurm_node(lab, name: str) -> dict[str, str]:
    line = lab.slurm.run("sinfo", "-h", "-N", "-n", name, "-o", "%N|%t|%E").stdout.splitlines()[0]
    _, state, reason = line.split("|", 2)
    return {"state": state, "reason": reason}


def steps_of(report: dict) -> dict[str, dict]:
    return {r["step"]: r for r in report["steps"]}


PROBE = "drain-probe"


def deploy(cfg, name: str, affinity: dict, min_available: int | None = None, max_unavailable: int | None = None):
    """A one-replica Deployment in namespace drain-probe (its pod placed by `affinity`), with a PodDisruptionBudget
    when one of the bounds is given; returns once its pod runs on a node."""
    from tasks import kube

    kubeconfig = cfg.kubeconfig_path()
    kube.ensure_namespace(kubeconfig, PROBE)
    labels = {"app": name}
    kube.apply(kubeconfig, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": PROBE},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"affinity": affinity, "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10",
                                                           "resources": {"requests": {"cpu": "100m"}}}]}}},
    })  # fmt: skip
    if min_available is not None or max_unavailable is not None:
        bound = {"minAvailable": min_available} if min_available is not None else {"maxUnavailable": max_unavailable}
        kube.apply(kubeconfig, {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                                "metadata": {"name": name, "namespace": PROBE},
                                "spec": {"selector": {"matchLabels": labels}, **bound}})  # fmt: skip
    return wait(f"{name} running", lambda: running_pod(cfg, name), 60)


def running_pod(cfg, app: str):
    from tasks import kube

    pods = kube.list_pods(cfg.kubeconfig_path(), PROBE)
    return next((p for p in pods if (p.metadata.labels or {}).get("app") == app and p.status.phase == "Running"
                 and p.metadata.deletion_timestamp is None), None)  # fmt: skip


def on_nodes(names: list[str], preferred: str | None = None) -> dict:
    """Node affinity: required one of `names`, `preferred` first."""
    term = {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": names}]}
    affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
    if preferred:
        affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [{"weight": 100, "preference": {
            "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [preferred]}]}}]  # fmt: skip
    return {"nodeAffinity": affinity}


def remove_probe(cfg) -> None:
    from kubernetes import client

    from tasks import kube

    with kube.api_client(cfg.kubeconfig_path()) as api:
        try:
            client.CoreV1Api(api).delete_namespace(PROBE)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
    wait(f"namespace {PROBE} gone", lambda: PROBE not in {n.metadata.name for n in namespaces(cfg)}, 120, pause=1)


def namespaces(cfg):
    from kubernetes import client

    from tasks import kube

    with kube.api_client(cfg.kubeconfig_path()) as api:
        return client.CoreV1Api(api).list_namespace().items


def test_apply_upgrades_the_control_plane_then_node_by_node_after_the_slurm_job(
    installed, upgrade_config, cfg, names, tmp_path, prefect_home
):
    from tasks import kube

    put_kubernetes_at(installed, cfg, PREVIOUS)
    code, plan = run_plan(upgrade_config)
    assert code == 2 and plan["kubernetes_path"] == [{"from": PREVIOUS, "to": "1.35.4", "kubespray": "v2.31.0"}]
    gpu = names["slurm_gpu"]
    release = tmp_path / "release-the-job"
    job = installed.slurm.run(
        "sbatch", "--parsable", "-w", gpu, "--gres=gpu:1", "--output=/dev/null",
        "--wrap", f"while [ ! -e {release} ]; do sleep 0.5; done",
    ).stdout.strip()  # fmt: skip
    wait("the job running", lambda: installed.slurm.job_state(job) == "RUNNING", 30)

    cpu, control_node = names["cpu"], names["control"]
    web = deploy(cfg, "web", on_nodes([cpu, control_node], preferred=cpu), max_unavailable=1)
    assert web.spec.node_name == cpu, web.spec.node_name

    running = start_apply(upgrade_config, prefect_home)
    # The flow drains the node and waits: draining while the job runs, its kubelet not touched yet.
    wait(f"{gpu} draining", lambda: slurm_node(installed, gpu)["state"] == "drng", 600, pause=1)
    time.sleep(4)
    assert installed.slurm.job_state(job) == "RUNNING"
    assert versions(cfg)[1][gpu] == PREVIOUS
    release.touch()
    code, report, stderr = finish_apply(running, TIMINGS, "apply 1.34.3 -> 1.35.4")

    assert code == 0, (report["outcome"], stderr[-3000:])
    print("\n".join(f"{r['step']}: {r['result']} {r['seconds']} s, gate {r['gate']}" for r in report["steps"]))
    steps = steps_of(report)
    assert list(steps) == [
        "pre-check",
        "kubernetes-control-plane",
        f"kubernetes-node {gpu}",
        f"kubernetes-node {names['other_gpu']}",
        f"kubernetes-node {names['cpu']}",
    ]
    assert all(r["result"] == "done" for r in report["steps"]), report["steps"]
    gated = ["pre-check", "kubernetes-control-plane", f"kubernetes-node {names['cpu']}"]
    assert all(steps[s]["gate"].startswith("green") for s in gated), [steps[s]["gate"] for s in gated]
    control = steps["kubernetes-control-plane"]["detail"]
    assert (
        "Kubernetes upgraded by the lab stand-in (control plane restarted at v1.35.4, kubelet versions set on kwok "
        "nodes); Kubespray's upgrade-cluster.yml not run" in control
    ), control
    assert "validated and facts gathered by Kubespray v2.31.0" in control, control
    assert f"--limit {names['control']}" in control
    assert f"Slurm job on {gpu}" in steps[f"kubernetes-node {gpu}"]["detail"]
    assert "CUDA smoke pod" in steps[f"kubernetes-node {names['other_gpu']}"]["detail"]

    # The job ended before the node's upgrade began (and after the flow had taken the node out).
    timeline = {k: dt.datetime.fromisoformat(v) for k, v in steps[f"kubernetes-node {gpu}"]["timeline"].items()}
    ended = job_end(installed, job)
    print(f"job {job} ended {ended}; {gpu}: " + ", ".join(f"{k} {v.time()}" for k, v in timeline.items()))
    assert timeline[f"{gpu} out of service"] <= ended <= timeline["kubespray started"], (ended, timeline)
    assert installed.slurm.job_state(job) == "COMPLETED"

    # The CPU node's step evicted the Deployment's pod (its budget allowed one) before Kubespray; it runs elsewhere.
    cpu_timeline = steps[f"kubernetes-node {cpu}"]["timeline"]
    assert cpu_timeline[f"{cpu} out of service"] <= cpu_timeline[f"{cpu} drained"] <= cpu_timeline["kubespray started"]
    moved = wait("web running again", lambda: running_pod(cfg, "web"), 60)
    assert moved.metadata.uid != web.metadata.uid and moved.spec.node_name == control_node, moved.spec.node_name
    remove_probe(cfg)

    server, kubelets = versions(cfg)
    assert (server, kubelets) == ("v1.35.4", {n.name: "1.35.4" for n in cfg.nodes})
    assert not [n for n, s in kube.list_nodes(cfg.kubeconfig_path()).items() if s.unschedulable]
    assert slurm_node(installed, gpu)["state"] == "idle"
    code, plan = run_plan(upgrade_config)
    assert code == 0, plan


def test_no_room_to_drain_refuses_the_upgrade_before_anything_moves(
    installed, upgrade_config, cfg, names, prefect_home
):
    from tasks import kube

    put_kubernetes_at(installed, cfg, PREVIOUS)
    cpu, control = names["cpu"], names["control"]
    try:
        db = deploy(cfg, "db", on_nodes([cpu, control]), min_available=1)
        pinned = deploy(cfg, "pinned", on_nodes([cpu]))
        budget = wait("the budget's status", lambda: pdb_status(cfg, "db"), 60)
        assert budget.get("disruptionsAllowed", 0) == 0, budget

        code, report, stderr = apply(upgrade_config, prefect_home, timings=TIMINGS)

        assert code == 2, (report["outcome"], stderr[-3000:])
        (precheck,) = report["steps"]
        print(precheck["detail"])
        assert precheck["result"] == "refused"
        assert (
            f"draining {db.spec.node_name}: PodDisruptionBudget {PROBE}/db allows no disruption now and covers "
            f"{PROBE}/{db.metadata.name}" in precheck["detail"]
        )
        assert (
            f"draining {cpu}: pod {PROBE}/{pinned.metadata.name} (requests cpu 0.1, required node affinity) fits on "
            "no other Ready, schedulable node" in precheck["detail"]
        )
        assert report["outcome"].startswith("refused before any change")
        assert versions(cfg) == (f"v{PREVIOUS}", {n.name: PREVIOUS for n in cfg.nodes}), "nothing upgraded"
        assert not [n for n, s in kube.list_nodes(cfg.kubeconfig_path()).items() if s.unschedulable]
        assert running_pod(cfg, "db").metadata.uid == db.metadata.uid, "nothing evicted"
    finally:
        remove_probe(cfg)


def pdb_status(cfg, name: str) -> dict | None:
    """The budget's status once the disruption controller has computed it."""
    from kubernetes import client

    from tasks import kube

    with kube.api_client(cfg.kubeconfig_path()) as api:
        got = client.PolicyV1Api(api).read_namespaced_pod_disruption_budget(name, PROBE, _preload_content=False)
        status = json.loads(got.data).get("status") or {}
    return status if status.get("observedGeneration") else None


def test_a_node_whose_job_outlasts_the_drain_timeout_stays_cordoned_and_drained(
    installed, upgrade_config, cfg, names, prefect_home
):
    from gpuforge.remediation import CORDON_ANNOTATION
    from tasks import kube

    put_kubernetes_at(installed, cfg, PREVIOUS)
    gpu = names["slurm_gpu"]
    job = installed.slurm.run(
        "sbatch", "--parsable", "-w", gpu, "--gres=gpu:1", "--output=/dev/null", "--job-name=train",
        "--wrap", "sleep 1200",
    ).stdout.strip()  # fmt: skip
    wait("the job running", lambda: installed.slurm.job_state(job) == "RUNNING", 30)

    code, report, stderr = apply(upgrade_config, prefect_home, "--drain-timeout", "5", timings=TIMINGS)

    assert code == 1, (report["outcome"], stderr[-3000:])
    steps = steps_of(report)
    assert list(steps) == ["pre-check", "kubernetes-control-plane", f"kubernetes-node {gpu}"]
    assert steps["kubernetes-control-plane"]["result"] == "done"
    failed = steps[f"kubernetes-node {gpu}"]
    print(failed["detail"])
    assert failed["result"] == "failed" and f"jobs {job} train (root) still run after 5s" in failed["detail"]
    assert report["outcome"].startswith(f"step kubernetes-node {gpu} failed: {gpu}: jobs {job} train")
    reason = f"gpuforge: upgrade to Kubernetes 1.35.4 failed: jobs {job} train (root) still run after 5s"
    node = kube.list_nodes(cfg.kubeconfig_path())[gpu]
    assert node.unschedulable and node.annotations[CORDON_ANNOTATION] == reason
    assert slurm_node(installed, gpu) == {"state": "drng", "reason": reason}
    server, kubelets = versions(cfg)
    assert server == "v1.35.4" and kubelets[names["control"]] == "1.35.4"
    assert kubelets[gpu] == kubelets[names["other_gpu"]] == kubelets[names["cpu"]] == PREVIOUS  # not reached
    installed.slurm.run("scancel", job)
    installed.slurm.wait_job(job)


def test_once_the_node_is_returned_apply_finishes_the_nodes_left(installed, upgrade_config, cfg, names, prefect_home):
    from flows.gpu_health import HealthParams, gpu_health

    gpu = names["slurm_gpu"]
    state = gpu_health(HealthParams(config=str(upgrade_config), release=gpu), return_state=True)
    assert state.is_completed(), state.message

    code, report, stderr = apply(upgrade_config, prefect_home, timings=TIMINGS)

    assert code == 0, (report["outcome"], stderr[-3000:])
    assert [r["step"] for r in report["steps"]] == [
        "pre-check",
        f"kubernetes-node {gpu}",
        f"kubernetes-node {names['other_gpu']}",
        f"kubernetes-node {names['cpu']}",
    ]
    assert versions(cfg) == ("v1.35.4", {n.name: "1.35.4" for n in cfg.nodes})
    code, plan = run_plan(upgrade_config)
    assert code == 0, plan
    print("timings:", TIMINGS)
