"""Node lifecycle against the lab: add a GPU node (Ready, GPUs allocatable, in the Slurm NodeSet, validated before
it takes work), keep out a node whose smoke fails, remove a node that runs a Slurm job (waited for, reported,
then --force), refuse removing the last control-plane node, replace a machine under the same name and labels,
`install` adding a worker the config gained, a removal a PodDisruptionBudget holds (reported, the pod named).

Uses the session lab of tests/conftest.py (installed once). The machines it adds are taken out again at the end,
so the lab is as it found it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import config_variant

pytestmark = pytest.mark.timeout(1200)

SLURM_NODE = "tgpu-3"  # joins the Slurm NodeSet gpu-2 (2 GPUs)
K8S_NODE = "tgpu-4"  # Kubernetes jobs only: validated by a CUDA smoke pod
CPU_NODE = "tcpu-9"  # added by install


@pytest.fixture(scope="module")
def installed(lab, first_install):
    assert first_install.is_completed(), first_install.message
    return lab


@pytest.fixture(scope="module")
def addresses():
    from lab.sshhosts import free_lab_ips

    return free_lab_ips(4, first=110)


def _with_nodes(base: Path, folder: Path, nodes: list[dict], **keys) -> Path:
    def change(data):
        for node in nodes:
            data["k8s_cluster_nodes"].append(node)
        data.update(keys)

    folder.mkdir(parents=True, exist_ok=True)
    return config_variant(base, folder, change)


def _slurm_node(name: str, ip: str) -> dict:
    return {"ip": ip, "name": name, "role": ["gpu-worker", "schedulable"], "gpu_count": 2}


def _k8s_node(name: str, ip: str) -> dict:
    return {"ip": ip, "name": name, "role": ["gpu-worker", "schedulable"], "gpu_count": 1, "slurm": False,
            "labels": {"example.com/rack": "r9"}}  # fmt: skip


def _lab_for(config: Path):
    from gpuforge.config import load_config
    from lab.lab import Lab

    return Lab(load_config(config))


def _wait(what: str, probe, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_add_a_slurm_gpu_node_validated_before_it_takes_work(installed, lab_config, addresses, tmp_path_factory):
    from flows.node import NodeAddParams, node_add
    from gpuforge.config import load_config
    from gpuforge.node_lifecycle import fact_cache_dir
    from tasks import kube

    grown = _with_nodes(lab_config, tmp_path_factory.mktemp("grown"), [_slurm_node(SLURM_NODE, addresses[0])])
    _lab_for(grown).add_host(SLURM_NODE)
    cfg = load_config(grown)
    state = node_add(NodeAddParams(config=str(grown)), return_state=True)
    assert state.is_completed(), state.message
    (row,) = state.result()
    assert row["node"] == SLURM_NODE and row["result"] == "in service"
    assert row["validation"] == f"Slurm job on {SLURM_NODE}" and "COMPLETED, exit 0:0" in row["detail"]

    node = kube.list_nodes(cfg.kubeconfig_path())[SLURM_NODE]
    assert node.ready and node.kubelet_version == cfg.kubespray.kube_version
    assert node.allocatable_gpus == 2 and not node.unschedulable
    assert installed.slurm.status()["nodes"][SLURM_NODE] == "idle"
    # Facts of every host are cached with the cluster's state: the next add gathers only its own.
    assert {n.name for n in cfg.nodes} <= {p.name for p in fact_cache_dir(cfg.cluster_name).iterdir()}

    def nodeset_ready():
        sets = kube.list_custom(cfg.kubeconfig_path(), "slinky.slurm.net", "v1beta1", "nodesets", "slurm")
        mine = [s for s in sets if s["metadata"]["name"].endswith("gpu-2")]
        return mine and mine[0]["spec"]["replicas"] == 1 and (mine[0].get("status") or {}).get("readyReplicas") == 1

    _wait("the NodeSet gpu-2 with the new node", nodeset_ready)


def test_a_node_whose_smoke_fails_stays_cordoned_with_the_reason(installed, lab_config, addresses, tmp_path_factory):
    from flows.node import NodeAddParams, node_add
    from gpuforge.config import load_config
    from gpuforge.remediation import CORDON_ANNOTATION
    from tasks import kube

    nodes = [_slurm_node(SLURM_NODE, addresses[0]), _k8s_node(K8S_NODE, addresses[1])]
    # An image that is not CUDA's vectorAdd prints no "Test PASSED": the smoke fails on this node.
    broken = _with_nodes(
        lab_config, tmp_path_factory.mktemp("broken"), nodes, validation={"cuda_image": "busybox:1.36"}
    )
    _lab_for(broken).add_host(K8S_NODE)
    state = node_add(NodeAddParams(config=str(broken), nodes=[K8S_NODE]), return_state=True)
    assert state.is_failed()
    assert f"{K8S_NODE}: " in state.message and "kept out of service" in state.message
    node = kube.list_nodes(load_config(broken).kubeconfig_path())[K8S_NODE]
    assert node.ready and node.unschedulable
    assert node.annotations[CORDON_ANNOTATION].startswith("gpuforge: node add: validation failed")


def test_remove_waits_for_the_slurm_job_then_force_takes_the_node_out(
    installed, lab_config, addresses, tmp_path_factory
):
    from flows.drift import evaluate
    from flows.node import NodeRemoveParams, node_remove
    from gpuforge.config import load_config
    from tasks import kube

    # The config without SLURM_NODE (K8S_NODE stays: replaced below).
    shrunk = _with_nodes(lab_config, tmp_path_factory.mktemp("shrunk"), [_k8s_node(K8S_NODE, addresses[1])])
    cfg = load_config(shrunk)
    job = installed.slurm.run(
        "sbatch", "--parsable", "-w", SLURM_NODE, "--output=/dev/null", "--wrap", "sleep 600"
    ).stdout.strip()
    _wait("the job running", lambda: installed.slurm.job_state(job) == "RUNNING", 30)

    params = NodeRemoveParams(config=str(shrunk), node=SLURM_NODE, drain_timeout_s=3)
    held = node_remove(params, return_state=True)
    assert held.is_failed() and f"jobs {job} " in held.message and "--force" in held.message
    node = kube.list_nodes(cfg.kubeconfig_path())[SLURM_NODE]
    assert node.unschedulable  # still there, out of service on both sides
    assert installed.slurm.status()["nodes"][SLURM_NODE] == "drng"  # draining: drained, its job still runs

    forced = node_remove(params.model_copy(update={"force": True}), return_state=True)
    assert forced.is_completed(), forced.message
    steps = {s["step"]: s["detail"] for s in forced.result()["steps"]}
    assert f"going on after 3s with running jobs {job}" in steps["slurm drain"]
    assert SLURM_NODE not in kube.list_nodes(cfg.kubeconfig_path())
    assert SLURM_NODE not in installed.slurm.status()["nodes"]
    _lab_for(shrunk).remove_host(SLURM_NODE)
    drift = evaluate(cfg)
    assert not [i for i in drift["items"] if SLURM_NODE in str(i)], drift["items"]


def test_the_last_control_plane_node_is_never_removed(installed, lab_config):
    from flows.node import NodeRemoveParams, node_remove
    from gpuforge.config import load_config
    from tasks import kube

    cp = next(n.name for n in load_config(lab_config).nodes if n.spec.is_control_plane)
    state = node_remove(NodeRemoveParams(config=str(lab_config), node=cp), return_state=True)
    assert state.is_failed() and "last control-plane node" in state.message
    assert not kube.list_nodes(load_config(lab_config).kubeconfig_path())[cp].unschedulable


def test_replace_keeps_the_name_and_labels_and_validates_the_new_machine(
    installed, lab_config, addresses, tmp_path_factory
):
    from flows.node import NodeRemoveParams, NodeReplaceParams, node_remove, node_replace
    from gpuforge.config import load_config
    from tasks import kube

    # The broken machine is pulled; its replacement comes in at another address, under the same name.
    old = _with_nodes(lab_config, tmp_path_factory.mktemp("old"), [_k8s_node(K8S_NODE, addresses[1])])
    _lab_for(old).remove_host(K8S_NODE)
    new = _with_nodes(lab_config, tmp_path_factory.mktemp("new"), [_k8s_node(K8S_NODE, addresses[2])])
    _lab_for(new).add_host(K8S_NODE)
    state = node_replace(NodeReplaceParams(config=str(new), node=K8S_NODE), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert (result["old_address"], result["new_address"]) == (addresses[1], addresses[2])
    assert "reset_nodes=False" in {s["step"]: s["detail"] for s in result["removed"]["steps"]}["kubespray"]
    assert result["added"][0]["result"] == "in service" and result["added"][0]["validation"] == "CUDA smoke pod"
    node = kube.list_nodes(load_config(new).kubeconfig_path())[K8S_NODE]
    assert node.ready and not node.unschedulable and node.allocatable_gpus == 1
    assert node.labels["example.com/rack"] == "r9"

    # Leave the lab as the session had it.
    gone = node_remove(NodeRemoveParams(config=str(lab_config), node=K8S_NODE), return_state=True)
    assert gone.is_completed(), gone.message
    _lab_for(new).remove_host(K8S_NODE)


def test_install_adds_a_worker_the_config_gained(installed, lab_config, addresses, tmp_path_factory):
    from flows.install import InstallParams, install
    from gpuforge.config import load_config
    from tasks import kube

    cpu = {"ip": addresses[3], "name": CPU_NODE, "role": ["cpu-worker", "schedulable"]}
    grown = _with_nodes(lab_config, tmp_path_factory.mktemp("install-grown"), [cpu])
    _lab_for(grown).add_host(CPU_NODE)
    state = install(InstallParams(config=str(grown)), return_state=True)
    assert state.is_completed(), state.message
    rows = {r["phase"]: r for r in state.result()}
    assert list(rows)[0] == "node-add" and rows["node-add"]["result"] == "ran", rows["node-add"]
    assert rows["node-add"]["detail"].startswith(f"{CPU_NODE} in service: ")
    # The new node joined through scale.yml on it alone; the phases after it found every node converged.
    assert rows["preflight"]["result"] == "skipped" and rows["kubespray"]["result"] == "skipped"
    assert rows["validate"]["result"] == "ran"
    cfg = load_config(grown)
    node = kube.list_nodes(cfg.kubeconfig_path())[CPU_NODE]
    assert node.ready and not node.unschedulable and node.kubelet_version == cfg.kubespray.kube_version


def test_a_pod_disruption_budget_holds_a_removal_and_names_the_pod(installed, lab_config):
    from kubernetes import client

    from flows.node import NodeRemoveParams, node_remove
    from gpuforge.config import load_config
    from gpuforge.remediation import CORDON_ANNOTATION
    from tasks import kube

    kubeconfig = load_config(lab_config).kubeconfig_path()
    meta = client.V1ObjectMeta(name="db-0", namespace="pdb-test", labels={"app": "db"})
    with kube.api_client(kubeconfig) as api:
        core, policy = client.CoreV1Api(api), client.PolicyV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="pdb-test")))
        try:
            container = client.V1Container(name="db", image="busybox:1.36", command=["sleep", "3600"])
            core.create_namespaced_pod("pdb-test", client.V1Pod(
                metadata=meta, spec=client.V1PodSpec(node_name=CPU_NODE, containers=[container])))  # fmt: skip
            policy.create_namespaced_pod_disruption_budget("pdb-test", client.V1PodDisruptionBudget(
                metadata=client.V1ObjectMeta(name="db"),
                spec=client.V1PodDisruptionBudgetSpec(min_available=1, selector=client.V1LabelSelector(
                    match_labels={"app": "db"}))))  # fmt: skip
            params = NodeRemoveParams(config=str(lab_config), node=CPU_NODE, drain_timeout_s=5)
            held = node_remove(params, return_state=True)
            assert held.is_failed() and "PodDisruptionBudgets keep pdb-test/db-0 (" in held.message, held.message
            node = kube.list_nodes(kubeconfig)[CPU_NODE]
            assert node.unschedulable and node.annotations[CORDON_ANNOTATION].startswith("gpuforge: node remove")

            # The budget goes: the pod is evicted and the node leaves. Leave the lab as the session had it.
            policy.delete_namespaced_pod_disruption_budget("db", "pdb-test")
            gone = node_remove(params, return_state=True)
            assert gone.is_completed(), gone.message
            assert {s["step"]: s["detail"] for s in gone.result()["steps"]}["evict"] == "no pods left"
            assert CPU_NODE not in kube.list_nodes(kubeconfig)
        finally:
            core.delete_namespace("pdb-test")
    _lab_for(lab_config).remove_host(CPU_NODE)
