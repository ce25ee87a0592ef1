"""Cluster checks as plain functions over data read from the API: shared by install waits and validation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

GPU_PRESENT = "nvidia.com/gpu.present"
# The GPU Operator's one ClusterPolicy, and the state it reports once every operand it manages is up.
CLUSTER_POLICY = "cluster-policy"
CLUSTER_POLICY_API = ("nvidia.com", "v1", "clusterpolicies")
CLUSTER_POLICY_READY = "ready"


class NodeView(Protocol):
    """What the checks need of a node (tasks.kube.NodeState provides it)."""

    name: str
    ready: bool
    allocatable_gpus: int
    labels: dict[str, str]
    annotations: dict[str, str]


def cluster_policy_state(policy: Mapping[str, Any] | None) -> str | None:
    """The ClusterPolicy's status.state (None: no ClusterPolicy, or no state yet)."""
    return ((policy or {}).get("status") or {}).get("state")


def cluster_policy_ready(policy: Mapping[str, Any] | None) -> bool:
    """The one rule for "the GPU Operator is ready": its ClusterPolicy exists and reports `ready`."""
    return cluster_policy_state(policy) == CLUSTER_POLICY_READY


def gpu_node_rows(
    expected: Mapping[str, int | None], nodes: Mapping[str, NodeView], cluster_policy: dict | None
) -> tuple[list[dict], list[str]]:
    """A row per GPU node (labels, allocatable vs expected) and the list of what is still missing. `expected`
    maps each GPU node to the GPUs it must offer (None: at least one), as the desired state has it."""
    missing = []
    if cluster_policy is None:
        missing.append(f"ClusterPolicy {CLUSTER_POLICY} does not exist")
    elif not cluster_policy_ready(cluster_policy):
        state = cluster_policy_state(cluster_policy)
        missing.append(f"ClusterPolicy {CLUSTER_POLICY} state is {state or 'unset'}, not {CLUSTER_POLICY_READY}")
    rows = []
    for name, want in expected.items():
        node = nodes.get(name)
        have = node.allocatable_gpus if node else 0
        labelled = bool(node and node.labels.get(GPU_PRESENT) == "true")
        problems = []
        if node is None:
            problems.append("node not registered")
        else:
            if not labelled:
                problems.append(f"label {GPU_PRESENT}=true missing")
            if want is None and have < 1:
                problems.append("allocatable nvidia.com/gpu is 0, expected at least 1")
            elif want is not None and have != want:
                problems.append(f"allocatable nvidia.com/gpu is {have}, expected {want}")
        missing += [f"{name}: {p}" for p in problems]
        rows.append(
            {
                "node": name,
                "gpu.present label": "yes" if labelled else "no",
                "product": (node.labels.get("nvidia.com/gpu.product", "") if node else ""),
                "allocatable": have,
                "expected": want if want is not None else ">=1",
                "result": "ok" if not problems else "; ".join(problems),
            }
        )
    return rows, missing


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels + matchExpressions) against labels; None selects nothing, `{}`
    everything."""
    if selector is None:
        return False
    return all(labels.get(key) == value for key, value in (selector.get("matchLabels") or {}).items()) and all(
        requirement_matches(expr, labels) for expr in selector.get("matchExpressions") or []
    )


def requirement_matches(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """One requirement of a label selector (In, NotIn, Exists, DoesNotExist) or of a node selector term (those and
    Gt, Lt: integer comparisons) against labels."""
    key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
    if operator == "In":
        return labels.get(key) in values
    if operator == "NotIn":
        return labels.get(key) not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    if operator in ("Gt", "Lt") and key in labels and values:
        try:
            have, bound = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > bound if operator == "Gt" else have < bound
    return False


def prometheus_selects(
    prometheus: dict, kind: str, obj: dict, namespace_labels: Mapping[str, Mapping[str, str]] | None = None
) -> bool:
    """Whether a Prometheus resource picks up `obj`, a ServiceMonitor (kind "serviceMonitor") or PrometheusRule
    ("rule"), as prometheus-operator decides: the object's labels by `<kind>Selector` (unset selects nothing) and
    its namespace by `<kind>NamespaceSelector` (unset means the Prometheus's own namespace only; `{}` all).
    `namespace_labels` gives namespaces' labels; absent, a namespace has the `kubernetes.io/metadata.name` label
    the API server sets on every namespace."""
    spec = prometheus.get("spec") or {}
    meta = obj["metadata"]
    namespace = meta.get("namespace") or ""
    if not selector_matches(spec.get(f"{kind}Selector"), meta.get("labels") or {}):
        return False
    namespace_selector = spec.get(f"{kind}NamespaceSelector")
    if namespace_selector is None:
        return namespace == prometheus["metadata"].get("namespace")
    labels = (namespace_labels or {}).get(namespace) or {"kubernetes.io/metadata.name": namespace}
    return selector_matches(namespace_selector, dict(labels))


def servicemonitor_problems(
    prometheuses: list[dict], monitors: list[dict], namespace_labels: Mapping[str, Mapping[str, str]] | None = None
) -> list[str]:
    """ServiceMonitors that no Prometheus selects, by labels (the `release` label trap of kube-prometheus-stack) or
    by namespace."""
    if not prometheuses:
        return ["no Prometheus resource found (monitoring.coreos.com/v1)"]
    problems = []
    for sm in monitors:
        if not any(prometheus_selects(p, "serviceMonitor", sm, namespace_labels) for p in prometheuses):
            labels = sm["metadata"].get("labels") or {}
            name = f"{sm['metadata'].get('namespace')}/{sm['metadata']['name']}"
            problems.append(
                f"ServiceMonitor {name} (labels {labels}) is selected by no Prometheus (labels or namespace selector)"
            )
    return problems
