"""The node lifecycle's rules (gpuforge/node_lifecycle.py): which nodes are new, whether a node may go, which
playbook adds or removes it, when a drain wait ends."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuforge import desired
from gpuforge.config import parse_config
from gpuforge.node_lifecycle import (
    NodeRefused,
    address_changes,
    config_node,
    drain_verdict,
    inventory_hosts,
    joining_nodes,
    missing_nodes,
    node_playbook,
    only_nodes,
    removal_check,
    scale_refusals,
    with_host,
)
from gpuforge.render import render_inventory

CONFIG = """
cluster_name: c
ansible_user: ubuntu
k8s_cluster_nodes:
  - { ip: "10.0.0.1", role: [control-plane, etcd] }
  - { ip: "10.0.0.2", role: [control-plane, etcd] }
  - { ip: "10.0.0.3", role: [control-plane, etcd] }
  - { ip: "10.0.0.11", role: [gpu-worker], gpu_count: 8 }
  - { ip: "10.0.0.12", role: [gpu-worker], gpu_count: 8, labels: { rack: r7 } }
  - { ip: "10.0.0.21", role: [cpu-worker] }
"""


def config(text: str = CONFIG):
    return parse_config(text, "config.yml", Path("."))


def state(text: str = CONFIG):
    return desired.build(config(text))


def hosts(text: str = CONFIG):
    return inventory_hosts(render_inventory(config(text)))


def test_missing_nodes_are_config_nodes_kubernetes_lacks_in_config_order():
    wanted = state()
    assert [n.name for n in missing_nodes(wanted, {"cp-1", "cp-2", "cp-3", "gpu-1"})] == ["gpu-2", "cpu-1"]
    assert missing_nodes(wanted, {n.name for n in wanted.nodes}) == []


def test_install_adds_the_workers_a_running_cluster_lacks_but_builds_a_new_cluster_or_control_plane_itself():
    wanted = state()
    running = {"cp-1", "cp-2", "cp-3", "gpu-1"}
    assert [n.name for n in joining_nodes(wanted, running)] == ["gpu-2", "cpu-1"]
    assert joining_nodes(wanted, set()) == []  # a first install: Kubespray's cluster.yml builds every node
    assert joining_nodes(wanted, {"gpu-1", "ex-node"}) == []  # control-plane nodes missing: cluster.yml again
    assert joining_nodes(wanted, {n.name for n in wanted.nodes}) == []


def test_scale_yml_is_refused_for_control_plane_and_etcd_nodes():
    wanted = state(CONFIG + '  - { ip: "10.0.0.4", role: [etcd] }\n  - { ip: "10.0.0.5", role: [etcd] }\n')
    (cp, etcd) = scale_refusals([wanted.node("cp-2"), wanted.nodes[-1], wanted.node("gpu-1")])
    assert cp.startswith("cp-2 is a control-plane node: Kubespray's scale.yml adds workers only")
    assert etcd.startswith(f"{wanted.nodes[-1].name} is an etcd node") and "--force-phase kubespray" in etcd


def test_only_nodes_keeps_derived_names_and_labels():
    narrowed = only_nodes(config(), ["gpu-2"])
    assert [(n.name, n.spec.ip, n.spec.labels) for n in narrowed.nodes] == [("gpu-2", "10.0.0.12", {"rack": "r7"})]


def test_an_unknown_node_is_refused_naming_the_known_ones():
    with pytest.raises(NodeRefused, match="gpu-9 is not in k8s_cluster_nodes of c .*gpu-1"):
        config_node(state(), "gpu-9")


def test_node_playbooks_sit_beside_the_cluster_playbook():
    assert node_playbook("cluster.yml", False, "scale.yml") == "scale.yml"
    assert node_playbook("../../lab/kubespray/lab-cluster.yml", True, "remove-node.yml") == (
        "../../lab/kubespray/lab-remove-node.yml"
    )
    with pytest.raises(NodeRefused, match="not named <prefix>cluster.yml"):
        node_playbook("site.yml", True, "scale.yml")


def test_a_worker_may_go_and_a_node_still_in_the_config_is_a_warning():
    check = removal_check("gpu-1", hosts(), {}, still_in_config=True)
    assert check.refusals == []
    assert "drift will report it" in check.warnings[0]


def test_the_last_control_plane_node_is_refused():
    single = """
cluster_name: c
ansible_user: ubuntu
k8s_cluster_nodes:
  - { ip: "10.0.0.1", role: [control-plane, etcd, schedulable] }
  - { ip: "10.0.0.11", role: [gpu-worker] }
"""
    check = removal_check("cp-1", hosts(single), {"cp-1": True}, still_in_config=False)
    assert any("last control-plane node" in r for r in check.refusals)
    assert any("last etcd member" in r for r in check.refusals)


def test_the_first_control_plane_host_is_refused_as_kubespray_cannot_remove_it():
    check = removal_check("cp-1", hosts(), {"cp-2": True, "cp-3": True}, still_in_config=False)
    assert any("first control-plane host" in r and "cp-2" in r for r in check.refusals)


def test_an_etcd_member_goes_only_when_the_rest_keep_quorum():
    all_ready = {"cp-1": True, "cp-2": True, "cp-3": True}
    ok = removal_check("cp-3", hosts(), all_ready, still_in_config=False)
    assert ok.refusals == [] and "even count" in ok.warnings[0]
    broken = removal_check("cp-3", hosts(), {**all_ready, "cp-2": False}, still_in_config=False)
    assert any("break etcd's quorum" in r and "cp-2 not Ready" in r for r in broken.refusals)


def test_a_node_gpuforge_never_installed_is_refused():
    check = removal_check("stranger", hosts(), {}, still_in_config=False)
    assert "not in the inventory the last install wrote" in check.refusals[0]


GPU_1 = '  - { ip: "10.0.0.11", role: [gpu-worker], gpu_count: 8 }\n'


def test_taking_a_derived_name_out_of_the_middle_renames_the_next_node_and_is_caught():
    after = state(CONFIG.replace(GPU_1, ""))
    assert address_changes(after, hosts()) == ["gpu-1: 10.0.0.11 -> 10.0.0.12"]
    named = CONFIG.replace("gpu_count: 8 }", "gpu_count: 8, name: a }", 1).replace(
        "gpu_count: 8, lab", "gpu_count: 8, name: b, lab"
    )
    assert (
        address_changes(
            state(named.replace('  - { ip: "10.0.0.11", role: [gpu-worker], gpu_count: 8, name: a }\n', "")),
            hosts(named),
        )
        == []
    )


def test_a_replaced_node_may_change_its_address():
    moved = state(CONFIG.replace("10.0.0.21", "10.0.0.99"))
    assert address_changes(moved, hosts()) == ["cpu-1: 10.0.0.21 -> 10.0.0.99"]
    assert address_changes(moved, hosts(), keep="cpu-1") == []


def test_with_host_puts_a_removed_host_back_with_its_groups():
    after = render_inventory(config(CONFIG.replace('  - { ip: "10.0.0.21", role: [cpu-worker] }\n', "")))
    gone = hosts()["cpu-1"]
    assert "cpu-1" not in inventory_hosts(after)
    restored = inventory_hosts(with_host(after, gone))["cpu-1"]
    assert restored.vars["ansible_host"] == "10.0.0.21"
    assert restored.groups == {"kube_node"}


def test_drain_wait_goes_on_without_jobs_waits_until_the_timeout_then_stops_or_forces():
    assert drain_verdict([], 0, 60, force=False).proceed
    assert drain_verdict(["7 train (alice)"], 10, 60, force=False) is None
    stopped = drain_verdict(["7 train (alice)"], 60, 60, force=False)
    assert not stopped.proceed and "7 train (alice)" in stopped.detail and "--force" in stopped.detail
    forced = drain_verdict(["7 train (alice)"], 60, 60, force=True)
    assert forced.proceed and forced.holding == ["7 train (alice)"]
