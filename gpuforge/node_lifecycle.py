"""Node lifecycle rules: which nodes are new, whether a node may go, what Kubespray runs for it.

Pure functions over the desired state (gpuforge/desired.py: node names, addresses, roles, Slurm membership
are read there, never derived again) and what the cluster reported; the flows in flows/node.py act on them.
The config is the one source of truth: a node in `k8s_cluster_nodes` but not registered is to be added; a
node to remove has left the config (it is still found in the inventory the last install wrote).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuforge.config import Config
from gpuforge.desired import DesiredNode, DesiredState
from gpuforge.state import cluster_state_dir

# Kubernetes (cordon annotation) and Slurm (drain reason) say why a node takes no work; "gpuforge:" marks a
# Slurm reason as gpuforge's own (remediation.SLURM_REASON_PREFIX).
ADD_REASON = "gpuforge: node add: not validated yet"
REMOVE_REASON = "gpuforge: node remove: leaving the cluster"
SMOKE_FAILED_REASON = "gpuforge: node add: validation failed"

# Kubespray's playbooks that add and remove nodes, relative to its checkout.
KUBESPRAY_SCALE = "scale.yml"
KUBESPRAY_REMOVE = "remove-node.yml"
KUBESPRAY_UPGRADE = "upgrade-cluster.yml"


class NodeRefused(ValueError):
    """The node operation must not run; the message says why and what to do instead."""


def missing_nodes(state: DesiredState, registered: set[str]) -> list[DesiredNode]:
    """Config nodes that Kubernetes does not know yet, in config order."""
    return [n for n in state.nodes if n.name not in registered]


def joining_nodes(state: DesiredState, registered: set[str]) -> list[DesiredNode]:
    """The config nodes a running cluster lacks, for `install` to add as `node add` does: none when the cluster
    has none of the config's nodes yet (a first install), or when one of them is a control-plane or etcd node
    (Kubespray's scale.yml adds workers only: those join through cluster.yml, the kubespray phase)."""
    new = missing_nodes(state, registered)
    if len(new) == len(state.nodes) or scale_refusals(new):
        return []
    return new


def scale_refusals(nodes: list[DesiredNode]) -> list[str]:
    """Why Kubespray's scale.yml cannot add these nodes: it joins workers only (its docs: a control-plane or etcd
    node is appended to the inventory and joins with cluster.yml)."""
    return [
        f"{n.name} is {'a control-plane' if n.is_control_plane else 'an etcd'} node: Kubespray's scale.yml adds "
        "workers only; it joins with cluster.yml, which `gpuforge install --force-phase kubespray` runs"
        for n in nodes
        if n.is_control_plane or n.is_etcd
    ]


def config_node(state: DesiredState, name: str) -> DesiredNode:
    if (node := state.node(name)) is not None:
        return node
    known = ", ".join(n.name for n in state.nodes)
    raise NodeRefused(f"{name} is not in k8s_cluster_nodes of {state.cluster} (its nodes: {known}); add it there first")


def only_nodes(config: Config, names: list[str]) -> Config:
    """The config narrowed to `names` (each keeping the name it has in the whole config, derived or not): what
    per-node checks (host keys, preflight, GPUs offered) run on, so their cost follows the nodes added only."""
    wanted = set(names)
    nodes = [n.spec.model_copy(update={"name": n.name}) for n in config.nodes if n.name in wanted]
    return config.model_copy(update={"k8s_cluster_nodes": nodes})


def fact_cache_dir(cluster_name: str) -> Path:
    """Ansible's jsonfile fact cache kept with the cluster's state: Kubespray's `--limit` runs read the facts of
    the hosts they leave out here (a file per host)."""
    return cluster_state_dir(cluster_name) / "kubespray-facts"


def node_playbook(cluster_playbook: str, own: bool, kubespray_name: str) -> str:
    """The playbook that adds (scale.yml), removes (remove-node.yml) or upgrades (upgrade-cluster.yml) nodes
    beside the cluster playbook.

    Kubespray's own cluster.yml -> its scale.yml / remove-node.yml / upgrade-cluster.yml. An operator's own
    playbook `<prefix>cluster.yml` (the lab's lab-cluster.yml) -> `<prefix>scale.yml` /
    `<prefix>remove-node.yml` / `<prefix>upgrade-cluster.yml` in the same folder, so a site that wraps
    Kubespray wraps them all the same way."""
    if not own:
        return kubespray_name
    path = Path(cluster_playbook)
    if not path.name.endswith("cluster.yml"):
        raise NodeRefused(
            f"kubespray.playbook {cluster_playbook} is not named <prefix>cluster.yml, so its {kubespray_name} "
            "cannot be found beside it; name it so and put <prefix>scale.yml, <prefix>remove-node.yml and "
            "<prefix>upgrade-cluster.yml next to it"
        )
    return str(path.with_name(path.name[: -len("cluster.yml")] + kubespray_name))


@dataclass(frozen=True)
class InventoryHost:
    """One host of a rendered Kubespray inventory (render.render_inventory): its vars and its groups."""

    name: str
    vars: dict[str, Any]
    groups: frozenset[str]

    @property
    def control_plane(self) -> bool:
        return "kube_control_plane" in self.groups

    @property
    def etcd(self) -> bool:
        return "etcd" in self.groups


def inventory_hosts(inventory: dict[str, Any]) -> dict[str, InventoryHost]:
    """Hosts of a YAML inventory as render_inventory writes it, in its order."""
    root = (inventory or {}).get("all") or {}
    groups: dict[str, set[str]] = {}
    for group, body in (root.get("children") or {}).items():
        for host in ((body or {}).get("hosts") or {}) if isinstance(body, dict) else {}:
            groups.setdefault(host, set()).add(group)
    return {
        name: InventoryHost(name, dict(hvars or {}), frozenset(groups.get(name, ())))
        for name, hvars in (root.get("hosts") or {}).items()
    }


def with_host(inventory: dict[str, Any], host: InventoryHost) -> dict[str, Any]:
    """`inventory` (as render_inventory writes it) with `host` put back in, vars and groups: what
    remove-node.yml needs to find a host the config no longer names."""
    root = dict(inventory["all"])
    root["hosts"] = {**root["hosts"], host.name: host.vars}
    children = {k: dict(v) if isinstance(v, dict) else v for k, v in root["children"].items()}
    for group in host.groups:
        body = children.setdefault(group, {"hosts": {}})
        if "hosts" in body:
            body["hosts"] = {**(body["hosts"] or {}), host.name: None}
    root["children"] = children
    return {"all": root}


def address_changes(state: DesiredState, installed: dict[str, InventoryHost], keep: str | None = None) -> list[str]:
    """Config nodes whose name the installed inventory gives another address ("gpu-1: 10.0.0.11 -> 10.0.0.12"),
    except `keep` (the node being replaced). Derived names (gpu-1, gpu-2) follow the file order, so taking a node
    out of the middle renames the ones after it: acting then would take out or join the wrong machines."""
    changes = []
    for node in state.nodes:
        host = installed.get(node.name)
        if node.name != keep and host is not None and host.vars.get("ansible_host") != node.ip:
            changes.append(f"{node.name}: {host.vars.get('ansible_host')} -> {node.ip}")
    return changes


def etcd_quorum(members: int) -> int:
    return members // 2 + 1


@dataclass
class RemovalCheck:
    """Whether `name` may leave the cluster: refusals stop it, warnings are shown and it goes on."""

    refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def removal_check(
    name: str, hosts: dict[str, InventoryHost], ready: dict[str, bool], still_in_config: bool
) -> RemovalCheck:
    """Rules for taking `name` out, on the last installed inventory (`hosts`, in order) and node readiness.

    - the last control-plane node never goes; neither does the first control-plane or first etcd host of the
      inventory, which Kubespray's remove-node.yml cannot remove (it runs kubeadm and etcdctl there);
    - an etcd member goes only when the members left that are Ready still make a quorum of the members left
      (removing one of three while another is down would stop etcd);
    - a node still in the config comes back at the next install and shows up in drift (a warning).
    """
    check = RemovalCheck()
    host = hosts.get(name)
    if host is None:
        check.refusals.append(
            f"{name} is not in the inventory the last install wrote, so gpuforge did not install it; "
            "remove it with kubectl and Kubespray by hand"
        )
        return check
    control = [h for h in hosts.values() if h.control_plane]
    etcd = [h for h in hosts.values() if h.etcd]
    if host.control_plane:
        if len(control) == 1:
            check.refusals.append(
                f"{name} is the last control-plane node of the cluster: removing it removes the cluster. "
                "Add another control-plane node first (install), then remove this one"
            )
        elif control[0].name == name:
            check.refusals.append(
                f"{name} is the first control-plane host of the inventory, which Kubespray's remove-node.yml "
                f"cannot remove: move another control-plane node ({control[1].name}) before it in "
                "k8s_cluster_nodes and run install, then remove it"
            )
    if host.etcd:
        left = [h.name for h in etcd if h.name != name]
        ready_left = [n for n in left if ready.get(n, False)]
        if not left:
            check.refusals.append(f"{name} is the last etcd member: removing it loses the cluster's data")
        elif etcd[0].name == name:
            check.refusals.append(
                f"{name} is the first etcd host of the inventory, which Kubespray's remove-node.yml cannot remove: "
                f"move another etcd node ({etcd[1].name}) before it in k8s_cluster_nodes and run install, then "
                "remove it"
            )
        elif len(ready_left) < etcd_quorum(len(left)):
            down = sorted(set(left) - set(ready_left))
            check.refusals.append(
                f"removing etcd member {name} would break etcd's quorum: {len(left)} members would be left, "
                f"{etcd_quorum(len(left))} needed, but {', '.join(down)} not Ready. Bring them back first"
            )
        elif len(left) % 2 == 0:
            check.warnings.append(
                f"etcd keeps {len(left)} members, an even count: it tolerates no more failures than "
                f"{len(left) - 1} would; add an etcd node to make it odd again"
            )
    if still_in_config:
        check.warnings.append(
            f"{name} is still in k8s_cluster_nodes: drift will report it missing and the next install adds it "
            "back; take it out of the config"
        )
    return check


@dataclass(frozen=True)
class JobWait:
    """What a drain wait found: whether the node may go on, and the jobs that still hold it."""

    proceed: bool
    holding: list[str]
    detail: str


def drain_verdict(jobs: list[str], waited_s: float, timeout_s: float, force: bool) -> JobWait | None:
    """After `waited_s` of waiting for `jobs` running on a drained node: None to keep waiting, else the verdict.
    With `force` the removal goes on when the time is up, naming the jobs it leaves behind."""
    if not jobs:
        return JobWait(True, [], "no running jobs")
    if waited_s < timeout_s:
        return None
    names = ", ".join(jobs)
    if force:
        return JobWait(True, jobs, f"--force: going on after {timeout_s:.0f}s with running jobs {names}")
    return JobWait(
        False,
        jobs,
        f"jobs {names} still run after {timeout_s:.0f}s; the node stays drained and cordoned. Wait for them, "
        "scancel them, or pass --force",
    )
