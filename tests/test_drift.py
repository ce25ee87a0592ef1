"""gpuforge.drift: desired state from the config vs live state dicts; one item per difference, right path."""

from __future__ import annotations

import copy

import pytest

from gpuforge import desired, drift, render
from gpuforge.config import parse_config
from gpuforge.drift import CRITICAL, INFO, WARNING, DriftItem, LiveState
from gpuforge.remediation import SlurmNode

CONFIG = """
cluster_name: ml
k8s_cluster_nodes:
  - { ip: "10.0.0.1", name: cp-1, role: [control-plane, etcd] }
  - { ip: "10.0.0.2", name: gpu-1, role: [gpu-worker, schedulable], gpu_count: 8,
      labels: { team: vision }, taints: [{ key: dedicated, value: gpu, effect: NoSchedule }] }
  - { ip: "10.0.0.3", name: gpu-2, role: [gpu-worker, schedulable] }
  - { ip: "10.0.0.4", name: gpu-3, role: [gpu-worker, schedulable], gpu_count: 4, slurm: false }
deepops_services:
  gpu-operator:
    enabled: true
    releases:
      gpu-operator: { values: { driver: { enabled: false } } }
  monitoring_stack:
    enabled: true
    releases:
      kube-prometheus-stack: { values: { grafana: { adminPassword: hunter2 } } }
  slurm: { enabled: true }
"""


@pytest.fixture
def config():
    return parse_config(CONFIG)


def converged(config) -> LiveState:
    """A cluster exactly as install leaves it (gpu-2's count learned at install: 8, recorded on the node)."""
    learned = {"gpu-2": 8}
    nodes = {}
    for n in config.nodes:
        nodes[n.name] = {
            "kubelet_version": config.kubespray.kube_version,
            "labels": {"kubernetes.io/hostname": n.name, **render.node_labels(n, config.cluster_name)},
            "annotations": {"gpuforge.io/installed-gpu-count": "8"} if n.name == "gpu-2" else {},
            "taints": render.node_taints(n),
            "allocatable_gpus": (n.spec.gpu_count or learned.get(n.name, 0)) if n.spec.is_gpu else 0,
        }
    releases = {
        r.name: {
            "namespace": r.namespace,
            "status": "deployed",
            "chart": r.chart,
            "version": r.version,
            "values": copy.deepcopy(r.values),
        }
        for r in render.render_releases(config, learned)
    }
    sets = render.gpu_nodesets(config, learned)
    nodesets = [
        {"metadata": {"name": f"slurm-worker-{k}"}, "spec": {"replicas": len(v["nodes"])}} for k, v in sets.items()
    ]
    slurm = {
        node: SlurmNode(node, "idle", ("gpu",), f"gpu:{v['gpus']}") for k, v in sets.items() for node in v["nodes"]
    }
    return LiveState(
        nodes=nodes,
        releases=releases,
        cluster_policy={"status": {"state": "ready"}},
        cluster_policy_read=True,
        nodesets=nodesets,
        slurm_nodes=slurm,
    )


def state(config, live: LiveState) -> desired.DesiredState:
    """The desired state as the drift flow builds it: GPU counts the config leaves open read off the live nodes."""
    return desired.build(config, desired.learned_gpu_counts(config, live.nodes))


def compute(config, live: LiveState) -> list[DriftItem]:
    return drift.compute(state(config, live), live)


def detect(config, live: LiveState) -> dict:
    return drift.detect(state(config, live), live)


def nodeset(live: LiveState, name: str) -> dict:
    return next(n for n in live.nodesets if n["metadata"]["name"] == name)


def only(items: list[DriftItem]) -> DriftItem:
    assert len(items) == 1, [i.path for i in items]
    return items[0]


def test_converged_cluster_has_no_drift(config):
    report = detect(config, converged(config))
    assert report["items"] == [] and report["exit_code"] == 0
    assert report["summary"] == "no drift"


def test_helm_value_changed_is_one_item_with_pointer(config):
    live = converged(config)
    live.releases["gpu-operator"]["values"]["driver"]["enabled"] = True
    item = only(compute(config, live))
    assert (item.path, item.desired, item.live, item.severity) == (
        "/helm/gpu-operator/values/driver/enabled",
        False,
        True,
        WARNING,
    )
    assert item.resource == "helm/gpu-operator"


def test_helm_value_added_and_list_element(config):
    live = converged(config)
    live.releases["slurm"]["values"]["nodesets"]["gpu-8"]["extraConfMap"]["Gres"] = ["gpu:4"]
    live.releases["gpu-operator"]["values"]["toolkit"]["env"] = [{"name": "X", "value": "1"}]
    items = compute(config, live)
    assert [(i.path, i.desired, i.live) for i in items] == [
        ("/helm/gpu-operator/values/toolkit/env", None, [{"name": "X", "value": "1"}]),
        ("/helm/slurm/values/nodesets/gpu-8/extraConfMap/Gres/0", "gpu:8", "gpu:4"),
    ]


def test_bool_is_not_a_number_and_int_equals_float(config):
    live = converged(config)
    live.releases["slurm"]["values"]["nodesets"]["gpu-8"]["replicas"] = 1.0  # same as 1
    live.releases["gpu-operator"]["values"]["driver"]["enabled"] = 0  # not False
    item = only(compute(config, live))
    assert item.path == "/helm/gpu-operator/values/driver/enabled" and item.live == 0


def test_secrets_are_masked_but_reported(config):
    live = converged(config)
    live.releases["kube-prometheus-stack"]["values"]["grafana"]["adminPassword"] = "changed-by-hand"
    live.releases["kube-prometheus-stack"]["values"]["grafana"]["apiToken"] = "abc"
    items = compute(config, live)
    assert [(i.path, i.desired, i.live) for i in items] == [
        ("/helm/kube-prometheus-stack/values/grafana/adminPassword", "***", "***"),
        ("/helm/kube-prometheus-stack/values/grafana/apiToken", None, "***"),
    ]
    assert "hunter2" not in str(detect(config, live)) and "changed-by-hand" not in str(detect(config, live))


def test_release_status_version_and_missing(config):
    live = converged(config)
    live.releases["gpu-operator"]["status"] = "failed"
    live.releases["gpu-operator"]["version"] = "v26.3.0"
    del live.releases["cert-manager"]
    items = {i.path: i for i in compute(config, live)}
    assert set(items) == {"/helm/gpu-operator/status", "/helm/gpu-operator/version", "/helm/cert-manager"}
    assert items["/helm/gpu-operator/status"].severity == CRITICAL
    assert items["/helm/cert-manager"].live is None and items["/helm/cert-manager"].desired["chart"] == "cert-manager"


def test_relabelled_node_escapes_slash(config):
    live = converged(config)
    live.nodes["gpu-1"]["labels"]["gpuforge.io/nodeset"] = "other"
    item = only(compute(config, live))
    assert item.path == "/nodes/gpu-1/labels/gpuforge.io~1nodeset"
    assert (item.desired, item.live) == ("gpu-8", "other")


def test_only_managed_labels_are_compared(config):
    live = converged(config)
    live.nodes["gpu-1"]["labels"]["nvidia.com/gpu.product"] = "H100"  # not gpuforge's
    live.nodes["gpu-1"]["labels"]["gpuforge.io/stray"] = "x"  # gpuforge's prefix: it owns it
    del live.nodes["gpu-1"]["labels"]["team"]  # the user's own label from the config
    items = compute(config, live)
    assert [(i.path, i.desired, i.live) for i in items] == [
        ("/nodes/gpu-1/labels/gpuforge.io~1stray", None, "x"),
        ("/nodes/gpu-1/labels/team", "vision", None),
    ]


def test_taints_and_kubelet_version(config):
    live = converged(config)
    live.nodes["gpu-1"]["taints"] = ["dedicated=cpu:NoSchedule", "node.kubernetes.io/unschedulable:NoSchedule"]
    live.nodes["gpu-3"]["kubelet_version"] = "1.34.2"
    items = compute(config, live)
    assert [(i.path, i.desired, i.live) for i in items] == [
        ("/nodes/gpu-1/taints/dedicated", "gpu:NoSchedule", "cpu:NoSchedule"),
        ("/nodes/gpu-3/kubeletVersion", "1.35.4", "1.34.2"),
    ]
    # cp-1 is a pure control plane: Kubespray taints it, and gpuforge says so.
    live = converged(config)
    live.nodes["cp-1"]["taints"] = []
    item = only(compute(config, live))
    assert item.path == "/nodes/cp-1/taints/node-role.kubernetes.io~1control-plane"


def test_allocatable_gpus_lowered_uses_install_count_when_config_has_none(config):
    live = converged(config)
    live.nodes["gpu-2"]["allocatable_gpus"] = 7  # the config leaves gpu-2 open; 8 were recorded at install
    item = only(compute(config, live))
    assert (item.path, item.desired, item.live, item.severity) == ("/nodes/gpu-2/allocatableGpus", 8, 7, CRITICAL)


def test_nodes_missing_and_extra(config):
    live = converged(config)
    del live.nodes["gpu-3"]
    live.nodes["stranger"] = {"kubelet_version": "1.35.4", "labels": {}, "taints": [], "allocatable_gpus": 0}
    items = {i.path: i for i in compute(config, live)}
    assert set(items) == {"/nodes/gpu-3", "/nodes/stranger"}
    assert (items["/nodes/gpu-3"].desired, items["/nodes/gpu-3"].live, items["/nodes/gpu-3"].severity) == (
        "registered",
        None,
        CRITICAL,
    )
    assert (items["/nodes/stranger"].desired, items["/nodes/stranger"].severity) == (None, INFO)


def test_cluster_policy(config):
    live = converged(config)
    live.cluster_policy = {"status": {"state": "notReady"}}
    item = only(compute(config, live))
    assert (item.path, item.live) == ("/clusterpolicy/cluster-policy/status/state", "notReady")
    live.cluster_policy = None
    assert only(compute(config, live)).path == "/clusterpolicy/cluster-policy"
    live.cluster_policy_read = False  # could not be read: not compared (the flow reports the error)
    assert compute(config, live) == []


def test_nodeset_scaled_is_one_item(config):
    live = converged(config)
    nodeset(live, "slurm-worker-gpu-8")["spec"]["replicas"] = 2
    item = only(compute(config, live))
    assert (item.path, item.desired, item.live) == ("/slurm/nodesets/gpu-8/replicas", 1, 2)
    live.nodesets.remove(nodeset(live, "slurm-worker-gpu"))
    items = compute(config, live)
    assert [(i.path, i.desired, i.live) for i in items] == [
        ("/slurm/nodesets/gpu", {"replicas": 1}, None),
        ("/slurm/nodesets/gpu-8/replicas", 1, 2),
    ]


def test_slurm_nodes_partitions_and_gres(config):
    live = converged(config)
    live.slurm_nodes["gpu-1"] = SlurmNode("gpu-1", "idle", ("debug",), "gpu:8")
    live.slurm_nodes["gpu-2"] = SlurmNode("gpu-2", "idle", ("gpu",), "gpu:4")
    live.slurm_nodes["login-1"] = SlurmNode("login-1", "idle", ("gpu",), "")
    items = [(i.path, i.desired, i.live) for i in compute(config, live)]
    assert items == [
        ("/slurm/nodes/gpu-2/gres", "gpu:8", "gpu:4"),
        ("/slurm/nodes/gpu-1/partitions", ["gpu"], ["debug"]),
        ("/slurm/nodes/login-1", None, "registered"),
    ]
    live = converged(config)
    del live.slurm_nodes["gpu-2"]
    assert only(compute(config, live)).path == "/slurm/nodes/gpu-2"


def test_slurm_node_named_after_its_slurmd_pod(config):
    """Slinky names Slurm nodes after the slurmd pod; the pod's node says which Kubernetes node it is."""
    live = converged(config)
    live.slurm_nodes = {
        "gpu-8-0": SlurmNode("gpu-8-0", "idle", ("gpu",), "gpu:8"),
        "gpu-8-1": SlurmNode("gpu-8-1", "idle", ("gpu",), "gpu:8"),
    }
    live.slurm_pods = [
        {"name": "slurm-worker-gpu-8-0", "hostname": "gpu-8-0", "node": "gpu-1"},
        {"name": "slurm-worker-gpu-8-1", "hostname": "gpu-8-1", "node": "gpu-2"},
    ]
    assert compute(config, live) == []


def test_ignore_rules_match_whole_segments(config):
    live = converged(config)
    live.releases["gpu-operator"]["values"]["driver"]["version"] = "550"
    live.releases["gpu-operator"]["values"]["driverX"] = 1
    rules = ["/helm/gpu-operator/values/driver"]
    kept, ignored = drift.apply_ignores(compute(config, live), rules)
    assert [i.path for i in kept] == ["/helm/gpu-operator/values/driverX"]
    assert [i.path for i in ignored] == ["/helm/gpu-operator/values/driver/version"]


def test_config_ignore_rules_and_summary(config):
    config.drift.ignore = ["/nodes/gpu-1/labels/gpuforge.io~1nodeset"]
    live = converged(config)
    live.nodes["gpu-1"]["labels"]["gpuforge.io/nodeset"] = "other"
    nodeset(live, "slurm-worker-gpu-8")["spec"]["replicas"] = 2
    report = detect(config, live)
    assert report["exit_code"] == 2
    assert [i["path"] for i in report["items"]] == ["/slurm/nodesets/gpu-8/replicas"]
    assert [i["path"] for i in report["ignored"]] == ["/nodes/gpu-1/labels/gpuforge.io~1nodeset"]
    assert report["summary"] == "1 drift: /slurm/nodesets/gpu-8/replicas (1 -> 2) (1 ignored)"


def test_summary_names_first_three():
    items = [DriftItem("r", f"/x/{i}", i, i + 1, WARNING) for i in range(5)]
    assert drift.summary(items) == "5 drifts: /x/0 (0 -> 1), /x/1 (1 -> 2), /x/2 (2 -> 3) and 2 more"


def test_pointer_escaping():
    assert drift.pointer("nodes", "a/b", "c~d") == "/nodes/a~1b/c~0d"
    assert drift.unescape("a~1b~0c") == "a/b~c"
    assert drift.is_ignored("/helm/x/values/a", ["/helm/x/"])
    assert not drift.is_ignored("/helm/xy", ["/helm/x"])


def test_disabled_or_unread_parts_are_not_compared(config):
    live = LiveState(nodes=converged(config).nodes)  # nothing but nodes was read
    assert compute(config, live) == []


def test_automation_definition_validates_and_targets_both_day2_flows():
    """deployments/automations.yaml is what `prefect automation create --from-file` accepts (once the block id
    is filled in): failed or crashed gpu-health/drift runs send a notification."""
    import uuid
    from pathlib import Path

    import yaml
    from prefect.events.schemas.automations import AutomationCore

    text = (Path(__file__).resolve().parents[1] / "deployments" / "automations.yaml").read_text()
    assert "BLOCK_DOCUMENT_ID" in text
    (data,) = yaml.safe_load(text.replace("BLOCK_DOCUMENT_ID", str(uuid.uuid4())))["automations"]
    automation = AutomationCore.model_validate(data)
    assert automation.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert automation.trigger.match_related.root["prefect.resource.name"] == ["gpu-health", "drift"]
    assert [a.type for a in automation.actions] == ["send-notification"]
