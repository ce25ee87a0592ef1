"""tasks.kube.cluster_checks over the desired state: nodes Ready, the one ClusterPolicy rule, allocatable GPUs
against the expected counts (configured, else recorded at install), the GPU Operator's pods in its namespace.
The API reads are replaced by answers; everything judged is the real code."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpuforge import desired
from gpuforge.config import parse_config
from gpuforge.validation import FAIL, PASS
from tasks import kube

CONFIG = """
k8s_cluster_nodes:
  - { ip: "198.51.100.1", role: [control-plane, etcd] }
  - { ip: "198.51.100.2", role: [gpu-worker, schedulable], gpu_count: 8 }
  - { ip: "198.51.100.3", role: [gpu-worker, schedulable] }
deepops_services:
  gpu-operator: { enabled: true }
"""


def node(name: str, gpus: int = 0, ready: bool = True, recorded: int | None = None) -> kube.NodeState:
    labels = {"nvidia.com/gpu.present": "true"} if gpus else {}
    notes = {desired.INSTALLED_GPU_COUNT: str(recorded)} if recorded is not None else {}
    return kube.NodeState(name, ready, "1.35.4", gpus, False, labels, notes, [])


@pytest.fixture
def api(monkeypatch):
    answers = {"policy": {"status": {"state": "ready"}}, "pods": [], "asked": []}

    def get_custom(kubeconfig, group, version, plural, name):
        answers["asked"].append((group, version, plural, name))
        return answers["policy"]

    def list_pods(kubeconfig, namespace):
        answers["asked"].append(namespace)
        return answers["pods"]

    monkeypatch.setattr(kube, "get_custom", get_custom)
    monkeypatch.setattr(kube, "list_pods", list_pods)
    return answers


def by_check(results) -> dict[tuple[str, str], tuple[str, str]]:
    return {(r.check, r.target): (r.result, r.detail) for r in results}


def test_a_converged_cluster_passes_every_check(api):
    config = parse_config(CONFIG)
    nodes = {"cp-1": node("cp-1"), "gpu-1": node("gpu-1", 8), "gpu-2": node("gpu-2", 4, recorded=4)}
    state = desired.build(config, desired.learned_gpu_counts(config, nodes))
    results = by_check(kube.cluster_checks(state, "kubeconfig", nodes))
    assert {k: v[0] for k, v in results.items()} == {
        ("node-ready", "cp-1"): PASS,
        ("node-ready", "gpu-1"): PASS,
        ("node-ready", "gpu-2"): PASS,
        ("cluster-policy", "cluster-policy"): PASS,
        ("gpu-allocatable", "gpu-1"): PASS,
        ("gpu-allocatable", "gpu-2"): PASS,
        ("gpu-operator-pods", "gpu-operator"): PASS,
    }
    assert results[("gpu-allocatable", "gpu-2")][1] == "4 allocatable, expected 4"
    assert api["asked"] == [("nvidia.com", "v1", "clusterpolicies", "cluster-policy"), "gpu-operator"]


def test_a_lost_gpu_a_missing_node_a_policy_not_ready_and_a_failed_pod_fail(api):
    config = parse_config(CONFIG)
    # gpu-2 recorded 4 GPUs at install and offers 3 now: the recorded count is what it must have.
    nodes = {"cp-1": node("cp-1", ready=False), "gpu-2": node("gpu-2", 3, recorded=4)}
    api["policy"] = {"status": {"state": "notReady"}}
    api["pods"] = [
        SimpleNamespace(metadata=SimpleNamespace(name="nvidia-driver"), status=SimpleNamespace(phase="Failed"))
    ]
    state = desired.build(config, desired.learned_gpu_counts(config, nodes))
    results = by_check(kube.cluster_checks(state, "kubeconfig", nodes))
    assert results[("node-ready", "cp-1")] == (FAIL, "not Ready")
    assert results[("node-ready", "gpu-1")] == (FAIL, "not registered")
    assert results[("cluster-policy", "cluster-policy")] == (FAIL, "state notReady")
    assert results[("gpu-allocatable", "gpu-1")] == (FAIL, "node not registered")
    assert results[("gpu-allocatable", "gpu-2")] == (FAIL, "allocatable nvidia.com/gpu is 3, expected 4")
    assert results[("gpu-operator-pods", "gpu-operator")] == (FAIL, "nvidia-driver Failed")
