"""Whether the cluster has room to drain each node an upgrade takes out of service, judged before anything moves.

A node upgrade drains its node first (`kubectl drain --ignore-daemonsets` semantics: every pod but DaemonSet and
static pods is evicted through the Eviction API, which PodDisruptionBudgets can refuse). Two things make that drain
hang half-way through a maintenance window, with a node already cordoned:

- a PodDisruptionBudget covering one of the node's pods that allows no disruption right now (the classic
  single-replica Deployment with `minAvailable: 1`): every eviction is refused (429) until someone intervenes;
- a pod that fits on no other node: its controller recreates it and it stays Pending (a GPU job on the only GPU
  node with free GPUs, a pod pinned by nodeSelector/affinity to the one node of its kind).

:func:`drain_problems` finds both for every node about to be drained, from one reading of nodes, pods and budgets
(tasks.kube.read_drain_room). Each node is judged against the cluster as it is now, one at a time, as the upgrade
drains them (serial): a pod fits where a Ready, schedulable other node matches its nodeSelector and required node
affinity, tolerates its NoSchedule and NoExecute taints and has the requests and a pod slot still free (allocatable
minus what its pods take); the node's pods are placed largest first, each taking its room. Pods owned by a
NodeSet (Slinky's slurmd, one per node like a DaemonSet) are not moved: the Slurm side of their node is drained
the Slurm way. Pod affinity/anti-affinity and topology spread are not judged (the scheduler has the last word).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuforge.checks import requirement_matches, selector_matches

# Pods that stay on a drained node: one per node by design, recreated there by their controller.
STAYING_OWNERS = frozenset({"DaemonSet", "NodeSet"})
_BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")


@dataclass(frozen=True)
class Pod:
    """A pod bound to a node, as a drain and the scheduler see it."""

    namespace: str
    name: str
    node: str
    requests: Mapping[str, float] = field(default_factory=dict)  # cpu in cores, memory in bytes, extended counts
    labels: Mapping[str, str] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    node_affinity: Sequence[Sequence[Mapping]] = ()  # required nodeSelectorTerms: OR of ANDed matchExpressions
    tolerations: Sequence[Mapping[str, str]] = ()
    owner_kind: str = ""  # the controller's kind; "" for a bare pod
    finished: bool = False  # Succeeded or Failed: holds no room and is not moved
    mirror: bool = False  # a static pod the kubelet runs: never evicted

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def moves(self, staying: Collection[str] = STAYING_OWNERS) -> bool:
        """A drain evicts it (and its controller starts it elsewhere): not finished, not static, not owned by one of
        the `staying` kinds."""
        return not (self.finished or self.mirror or self.owner_kind in staying)


@dataclass(frozen=True)
class Node:
    name: str
    ready: bool
    schedulable: bool
    allocatable: Mapping[str, float]
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Mapping[str, str]] = ()


@dataclass(frozen=True)
class Budget:
    """A PodDisruptionBudget: its selector and how many evictions it allows right now (status)."""

    namespace: str
    name: str
    selector: Mapping[str, Any] | None  # policy/v1: null selects no pod, `{}` every pod of the namespace
    disruptions_allowed: int

    def covers(self, pod: Pod) -> bool:
        return pod.namespace == self.namespace and selector_matches(self.selector, pod.labels)


def tolerates(tolerations: Sequence[Mapping[str, str]], taint: Mapping[str, str]) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        if not tol.get("key") and tol.get("operator") == "Exists":
            return True
        if tol.get("key") == taint.get("key") and (
            tol.get("operator") == "Exists" or tol.get("value", "") == taint.get("value", "")
        ):
            return True
    return False


def can_run_on(pod: Pod, node: Node) -> bool:
    """The node matches the pod's nodeSelector and required node affinity, and the pod tolerates its
    NoSchedule/NoExecute taints."""
    if any(node.labels.get(k) != v for k, v in pod.node_selector.items()):
        return False
    if pod.node_affinity and not any(
        all(requirement_matches(e, node.labels) for e in term) for term in pod.node_affinity
    ):
        return False
    return all(tolerates(pod.tolerations, t) for t in node.taints if t.get("effect") in _BLOCKING_EFFECTS)


def free_room(nodes: Sequence[Node], pods: Sequence[Pod]) -> dict[str, dict[str, float]]:
    """Each node's allocatable minus the requests of the unfinished pods bound to it."""
    room = {n.name: dict(n.allocatable) for n in nodes}
    for pod in pods:
        if pod.node in room and not pod.finished:
            for resource, amount in _needs(pod).items():
                room[pod.node][resource] = room[pod.node].get(resource, 0.0) - amount
    return room


def _needs(pod: Pod) -> dict[str, float]:
    """What a pod takes from its node: its requests and one of the node's pod slots (allocatable `pods`)."""
    return {**pod.requests, "pods": 1.0}


def drain_problems(
    draining: Sequence[str], nodes: Sequence[Node], pods: Sequence[Pod], budgets: Sequence[Budget]
) -> list[str]:
    """What would stop each node of `draining` from being drained now, one line per blocked pod or budget."""
    room = free_room(nodes, pods)
    by_node: dict[str, list[Pod]] = {}
    for pod in pods:
        if pod.moves():
            by_node.setdefault(pod.node, []).append(pod)
    places = [n for n in nodes if n.ready and n.schedulable]
    out: list[str] = []
    for name in dict.fromkeys(draining):
        moving = sorted(by_node.get(name, ()), key=_size, reverse=True)
        for budget in budgets:
            held = [p.ref for p in moving if budget.covers(p)]
            if held and budget.disruptions_allowed < 1:
                out.append(
                    f"draining {name}: PodDisruptionBudget {budget.namespace}/{budget.name} allows no disruption "
                    f"now and covers {', '.join(held)}: its eviction would be refused until the budget allows one "
                    "(scale the workload up or relax the budget first)"
                )
        taken: dict[str, dict[str, float]] = {}  # room left where this node's pods were placed (copied on use)
        for pod in moving:
            need = _needs(pod)
            candidates = (n.name for n in places if n.name != name and can_run_on(pod, n))
            place = next((n for n in candidates if _fits(need, taken.get(n, room[n]))), None)
            if place is None:
                out.append(f"draining {name}: pod {pod.ref} ({_describe(pod)}) fits on no other Ready, "
                           "schedulable node: it would stay Pending")  # fmt: skip
                continue
            free = taken.setdefault(place, dict(room[place]))
            for resource, amount in need.items():
                free[resource] = free.get(resource, 0.0) - amount
    return out


def _fits(requests: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(amount <= 0 or free.get(resource, 0.0) >= amount for resource, amount in requests.items())


def _size(pod: Pod) -> tuple[float, ...]:
    """Scarcest first: extended resources (GPUs), then CPU, then memory."""
    extended = sum(v for k, v in pod.requests.items() if k not in ("cpu", "memory", "ephemeral-storage", "pods"))
    return extended, pod.requests.get("cpu", 0.0), pod.requests.get("memory", 0.0)


def _describe(pod: Pod) -> str:
    asks = [f"{k} {_amount(k, v)}" for k, v in sorted(pod.requests.items()) if v > 0]
    asks += [f"{k}={v}" for k, v in sorted(pod.node_selector.items())]
    if pod.node_affinity:
        asks.append("required node affinity")
    return "requests " + ", ".join(asks) if asks else "no requests"


def _amount(resource: str, value: float) -> str:
    if resource == "memory":
        return f"{value / 2**30:.1f}Gi"
    return f"{value:g}"
