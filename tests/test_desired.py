"""gpuforge.desired: the desired cluster as plain functions of the config, and the one state built from them."""

from __future__ import annotations

from gpuforge import desired, health
from gpuforge.config import parse_config

CONFIG = """
cluster_name: ml
k8s_cluster_nodes:
  - { ip: "198.51.100.1", role: [control-plane, etcd] }
  - { ip: "198.51.100.2", role: [gpu-worker, schedulable], gpu_count: 8, gpu_model: H100,
      labels: { team: vision }, taints: [{ key: dedicated, value: gpu, effect: NoSchedule }] }
  - { ip: "198.51.100.3", role: [gpu-worker, schedulable] }
  - { ip: "198.51.100.4", role: [gpu-worker, schedulable], gpu_count: 4, slurm: false }
  - { ip: "198.51.100.5", role: [cpu-worker, schedulable] }
deepops_services:
  gpu-operator: { enabled: true }
  monitoring_stack: { enabled: true }
  slurm: { enabled: true }
health:
  thresholds:
    H100: { max_gpu_temp_c: 80 }
"""


def test_nodes_carry_names_roles_ips_and_expected_gpus_from_the_config():
    config = parse_config(CONFIG)
    nodes = {n.name: n for n in desired.desired_nodes(config)}
    assert list(nodes) == ["cp-1", "gpu-1", "gpu-2", "gpu-3", "cpu-1"]
    assert nodes["cp-1"].is_control_plane and nodes["cp-1"].is_etcd and not nodes["cp-1"].is_worker
    assert nodes["gpu-1"].ip == "198.51.100.2" and nodes["gpu-1"].roles == ("gpu-worker", "schedulable")
    assert (nodes["gpu-1"].expected_gpus, nodes["gpu-1"].gpu_model) == (8, "H100")
    # A GPU node without gpu_count expects "at least one" until install records its count.
    assert nodes["gpu-2"].is_gpu and nodes["gpu-2"].expected_gpus is None
    assert not nodes["cpu-1"].is_gpu and nodes["cpu-1"].expected_gpus is None


def test_slurm_membership_and_nodesets_follow_the_gpu_count_and_the_slurm_flag():
    state = desired.build(parse_config(CONFIG))
    assert [n.name for n in state.slurm_nodes] == ["gpu-1", "gpu-2"]  # gpu-3 says slurm: false
    assert state.node("gpu-1").nodeset == "gpu-8" and state.node("gpu-2").nodeset == "gpu"
    assert state.node("gpu-3").nodeset is None and not state.node("gpu-3").in_slurm
    assert state.nodesets == {
        "gpu-8": desired.NodeSet("gpu-8", ("gpu-1",), 8),
        "gpu": desired.NodeSet("gpu", ("gpu-2",), None),
    }


def test_a_disabled_slurm_service_puts_no_node_in_slurm():
    config = parse_config(CONFIG.replace("slurm: { enabled: true }", "slurm: { enabled: false }"))
    state = desired.build(config)
    assert state.slurm_nodes == () and state.nodesets == {}
    assert all(n.nodeset is None for n in state.nodes)


def test_learned_counts_come_from_the_install_annotation_only_for_nodes_the_config_leaves_open():
    config = parse_config(CONFIG)
    live = {
        "gpu-1": {"annotations": {desired.INSTALLED_GPU_COUNT: "2"}, "allocatable_gpus": 8},  # configured: 8 wins
        "gpu-2": {"annotations": {desired.INSTALLED_GPU_COUNT: "4"}, "allocatable_gpus": 3},  # lost one since
        "gpu-3": {"annotations": {}},
    }
    learned = desired.learned_gpu_counts(config, live)
    assert learned == {"gpu-2": 4}  # the recorded count, not today's allocatable 3
    assert desired.expected_gpu_counts(config, learned) == {"gpu-1": 8, "gpu-2": 4, "gpu-3": 4}
    state = desired.build(config, learned)
    assert state.expected_gpus() == {"gpu-1": 8, "gpu-2": 4, "gpu-3": 4}
    assert state.nodesets["gpu"].gpus == 4
    slurm_values = state.release(desired.SLURM_RELEASE).values
    assert slurm_values["nodesets"]["gpu"]["extraConfMap"]["Gres"] == ["gpu:4"]


def test_a_recorded_count_that_is_not_a_number_is_not_learned():
    config = parse_config(CONFIG)
    assert desired.learned_gpu_counts(config, {"gpu-2": {"annotations": {desired.INSTALLED_GPU_COUNT: "x"}}}) == {}


def test_labels_and_taints_gpuforge_owns():
    state = desired.build(parse_config(CONFIG))
    gpu1 = state.node("gpu-1")
    assert gpu1.labels == {
        "gpuforge.io/cluster": "ml",
        "gpuforge.io/gpu-worker": "true",
        "gpuforge.io/nodeset": "gpu-8",
        "gpuforge.io/gpu-count": "8",
        "team": "vision",
    }
    assert gpu1.taints == ("dedicated=gpu:NoSchedule",)
    # A control plane that is no worker is tainted explicitly (Kubespray would do it anyway).
    assert state.node("cp-1").taints == ("node-role.kubernetes.io/control-plane:NoSchedule",)


def test_releases_in_install_order_with_their_namespaces():
    state = desired.build(parse_config(CONFIG))
    assert [(r.service, r.name, r.namespace) for r in state.releases] == [
        ("monitoring_stack", "kube-prometheus-stack", "monitoring"),
        ("gpu-operator", "gpu-operator", "gpu-operator"),
        ("slurm", "cert-manager", "cert-manager"),
        ("slurm", "slurm-operator-crds", "slinky"),
        ("slurm", "slurm-operator", "slinky"),
        ("slurm", "slurm", "slurm"),
    ]
    assert [r.name for r in state.service_releases("slurm")] == [
        "cert-manager",
        "slurm-operator-crds",
        "slurm-operator",
        "slurm",
    ]
    # A disabled service has no release, yet its namespace is known (the pin's).
    assert state.release("kubernetes-dashboard") is None
    assert state.namespace("kubernetes-dashboard") == "kubernetes-dashboard"
    assert state.namespace(desired.MONITORING_RELEASE) == "monitoring"


def test_thresholds_are_the_resolved_table_with_the_configs_overrides():
    state = desired.build(parse_config(CONFIG))
    assert state.thresholds == health.resolve_thresholds(parse_config(CONFIG).health.thresholds)
    assert health.thresholds_for("NVIDIA H100 80GB HBM3", state.thresholds).max_gpu_temp_c == 80
    # Only the field the config sets changes: the H100 family's other limits stay its defaults.
    default_h100 = health.thresholds_for("NVIDIA H100 80GB HBM3", health.resolve_thresholds(None))
    assert health.thresholds_for("NVIDIA H100 80GB HBM3", state.thresholds).max_power_w == default_h100.max_power_w
