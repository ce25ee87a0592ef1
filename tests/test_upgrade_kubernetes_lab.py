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
2. Back at 1.34.3, a job that outlasts --drain-timeout: the control plane moves, then the Slurm GPU node's step
   fails and leaves it cordoned and Slurm-drained with the reason naming the job; exit 1.
3. With the job gone and the node returned (`gpuforge health --release`), apply finishes the nodes left; the lab is
   at the current pins again for later modules.
"""

from __future__ import annotations

import datetime as dt
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

    server, kubelets = versions(cfg)
    assert (server, kubelets) == ("v1.35.4", {n.name: "1.35.4" for n in cfg.nodes})
    assert not [n for n, s in kube.list_nodes(cfg.kubeconfig_path()).items() if s.unschedulable]
    assert slurm_node(installed, gpu)["state"] == "idle"
    code, plan = run_plan(upgrade_config)
    assert code == 0, plan


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
