"""Cluster checks as plain functions over data read from the API: shared by install waits and validation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from gpuforge.config import Config

GPU_PRESENT = "nvidia.com/gpu.present"
INSTALLED_GPU_COUNT = "gpuforge.io/installed-gpu-count"


class NodeView(Protocol):
    """What the checks need of a node (tasks.kube.NodeState provides it)."""

    name: str
    ready: bool
    allocatable_gpus: int
    labels: dict[str, str]
    annotations: dict[str, str]


def expected_gpus(config: Config, node: NodeView | None, name: str) -> int | None:
    """The configured GPU count, else the count recorded on the node at install time, else None (>= 1)."""
    spec = next(n.spec for n in config.gpu_nodes if n.name == name)
    if spec.gpu_count:
        return spec.gpu_count
    if node and node.annotations.get(INSTALLED_GPU_COUNT, "").isdigit():
        return int(node.annotations[INSTALLED_GPU_COUNT])
    return None


def gpu_node_rows(config: Config, nodes: dict[str, Any], cluster_policy: dict | None) -> tuple[list[dict], list[str]]:
    """A row per GPU node (labels, allocatable vs expected) and the list of what is still missing."""
    state = ((cluster_policy or {}).get("status") or {}).get("state")
    missing = []
    if cluster_policy is None:
        missing.append("ClusterPolicy cluster-policy does not exist")
    elif state != "ready":
        missing.append(f"ClusterPolicy cluster-policy state is {state or 'unset'}, not ready")
    rows = []
    for gpu in config.gpu_nodes:
        node = nodes.get(gpu.name)
        want = expected_gpus(config, node, gpu.name)
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
        missing += [f"{gpu.name}: {p}" for p in problems]
        rows.append(
            {
                "node": gpu.name,
                "gpu.present label": "yes" if labelled else "no",
                "product": (node.labels.get("nvidia.com/gpu.product", "") if node else ""),
                "allocatable": have,
                "expected": want if want is not None else ">=1",
                "result": "ok" if not problems else "; ".join(problems),
            }
        )
    return rows, missing


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels + matchExpressions) against labels; None selects nothing."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


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
