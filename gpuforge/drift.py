"""Drift: the desired state (gpuforge.desired.DesiredState, the model `plan` uses) against the live cluster.

Pure domain code: no Prefect, no clients. The drift flow reads the cluster with a constant number of calls
(one node list, one Helm list, one ClusterPolicy get, one NodeSet list, one slurmd pod list, one `sinfo`) and
hands the answers here as plain data (:class:`LiveState`); :func:`compute` returns one :class:`DriftItem`
per difference.

Items
-----
``{resource, path, desired, live, severity}``. ``path`` is a JSON pointer (RFC 6901: ``/`` in a key is
written ``~1``, ``~`` is ``~0``) into this document::

    /nodes/<node>                               the node exists (desired "registered" / live "registered")
    /nodes/<node>/kubeletVersion                kubelet version vs the Kubespray pin
    /nodes/<node>/labels/<key>                  a label gpuforge manages (render.node_labels + any gpuforge.io/)
    /nodes/<node>/taints/<key>                  a taint gpuforge manages, as "value:Effect"
    /nodes/<node>/allocatableGpus               nvidia.com/gpu allocatable vs the expected count
    /helm/<release>                             the release exists
    /helm/<release>/{namespace,status,chart,version}
    /helm/<release>/values/<pointer>            a user-supplied value (deep diff; secrets masked)
    /clusterpolicy/cluster-policy[/status/state]
    /slurm/nodesets/<nodeset>[/replicas]        a Slinky NodeSet (key as in the chart's `nodesets.<key>`)
    /slurm/partitions/<partition>               a Slurm partition exists
    /slurm/nodes/<node>[/partitions|/gres]      a Slurm node exists, its partitions and GPU gres

``None`` as ``desired`` means "should not exist"; as ``live``, "does not exist". Severity is ``critical``
(something users lose: a missing node, release, GPU, Slurm node, a failed release, a ClusterPolicy that is
not ready), ``warning`` (the cluster differs from the config) or ``info`` (extra things gpuforge does not
own: nodes or Slurm nodes not in the config).

Ignore rules (``drift.ignore`` in the config) are JSON pointers matched as prefixes on whole segments:
``/helm/gpu-operator/values/driver`` silences ``/helm/gpu-operator/values/driver/version`` but not
``/helm/gpu-operator/values/driverX``. Exit codes follow helm-diff/Terraform: 0 no drift, 2 drift, 1 error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from gpuforge import render
from gpuforge.checks import CLUSTER_POLICY, CLUSTER_POLICY_READY, cluster_policy_ready, cluster_policy_state
from gpuforge.desired import SLURM_RELEASE, DesiredState
from gpuforge.remediation import SlurmNode, slurm_name_map

CRITICAL, WARNING, INFO = "critical", "warning", "info"
SEVERITY_ORDER = {CRITICAL: 0, WARNING: 1, INFO: 2}
MASK = "***"
REGISTERED = "registered"
PRESENT = "present"
EXIT_NO_DRIFT, EXIT_ERROR, EXIT_DRIFT = 0, 1, 2

# Helm value keys whose values never leave the cluster in a report (both sides masked, the path stays).
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|credential|key$)", re.IGNORECASE)
_MISSING = object()


@dataclass(frozen=True)
class DriftItem:
    resource: str
    path: str
    desired: Any
    live: Any
    severity: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LiveState:
    """What the flow read. A field left None was not read (its service is disabled or reading failed) and is
    not compared; an empty container means "read, and there is nothing"."""

    # node -> {kubelet_version, labels, annotations, taints: ["key=value:Effect"], allocatable_gpus}
    nodes: dict[str, dict[str, Any]]
    # release -> {namespace, status, chart, version, values} (tasks.helm.read_releases)
    releases: dict[str, dict[str, Any]] | None = None
    cluster_policy: dict[str, Any] | None = None
    cluster_policy_read: bool = False
    nodesets: list[dict[str, Any]] | None = None
    # Slurm nodes from `sinfo` (remediation.parse_sinfo) and the slurmd pods (name, hostname, node).
    slurm_nodes: dict[str, SlurmNode] | None = None
    slurm_pods: list[dict[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- pointers


def escape(segment: str) -> str:
    """One JSON-pointer segment: ``~`` -> ``~0``, ``/`` -> ``~1`` (RFC 6901)."""
    return str(segment).replace("~", "~0").replace("/", "~1")


def pointer(*segments: Any) -> str:
    return "".join("/" + escape(s) for s in segments)


def unescape(segment: str) -> str:
    return segment.replace("~1", "/").replace("~0", "~")


def is_ignored(path: str, rules: Iterable[str]) -> bool:
    """True when a rule is `path` itself or a parent of it (whole segments)."""
    for rule in rules:
        rule = rule.rstrip("/") if rule != "/" else ""
        if not rule or path == rule or path.startswith(rule + "/"):
            return True
    return False


# ------------------------------------------------------------------------------------------------ values


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps booleans apart from numbers (True != 1) and numbers apart from strings."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return type(a) is type(b) and a == b


def _empty(v: Any) -> bool:
    return v is _MISSING or v is None or v == {}


def deep_diff(desired: Any, live: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any, Any]]:
    """Leaf differences between two JSON-like values as (segments, desired, live); absent is ``None``.

    Mappings are compared key by key; an absent key and an empty mapping (or null) are the same. Lists of the
    same length are compared element by element, other lists as a whole."""
    if isinstance(desired, Mapping) and isinstance(live, Mapping):
        out = []
        for key in sorted(set(desired) | set(live), key=str):
            d, v = desired.get(key, _MISSING), live.get(key, _MISSING)
            if _empty(d) and _empty(v):
                continue
            out += deep_diff(d, v, (*path, str(key)))
        return out
    if isinstance(desired, list) and isinstance(live, list) and len(desired) == len(live):
        out = []
        for i, (d, v) in enumerate(zip(desired, live, strict=True)):
            out += deep_diff(d, v, (*path, str(i)))
        return out
    if isinstance(desired, Mapping) and _empty(live) and desired:
        # A whole subtree missing: one item per leaf, so each path can be ignored on its own.
        return deep_diff(desired, {}, path)
    if isinstance(live, Mapping) and _empty(desired) and live:
        return deep_diff({}, live, path)
    d = None if desired is _MISSING else desired
    v = None if live is _MISSING else live
    if d is None and v is None:
        return []
    return [] if _same(d, v) else [(path, d, v)]


def is_secret_path(segments: Iterable[str]) -> bool:
    return any(_SECRET_KEY.search(s) for s in segments)


def mask(value: Any) -> Any:
    """A secret's value as the report shows it: *** (None stays None: absent is not a secret)."""
    return None if value is None else MASK


def _taint_map(taints: Iterable[str]) -> dict[str, str]:
    """["key=value:Effect", "key:Effect"] -> {key: "value:Effect" | ":Effect"} (one entry per key and effect)."""
    out: dict[str, str] = {}
    for t in taints:
        head, _, effect = t.rpartition(":")
        key, _, value = head.partition("=")
        out[key if key not in out else f"{key}:{effect}"] = f"{value}:{effect}"
    return out


def _chart_name(ref: str) -> str:
    return ref.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------- compare


def compare_nodes(state: DesiredState, live: LiveState) -> list[DriftItem]:
    items: list[DriftItem] = []
    pin = state.config.kubespray.kube_version.lstrip("v")
    wanted = {n.name: n for n in state.nodes}
    # Taint keys gpuforge owns anywhere in the config: removing one from a node's config is drift too.
    owned_taints = {k for n in state.nodes for k in _taint_map(n.taints)}
    gpu_operator = state.config.enabled("gpu-operator")
    for name, node in wanted.items():
        res = f"node/{name}"
        state = live.nodes.get(name)
        if state is None:
            items.append(DriftItem(res, pointer("nodes", name), REGISTERED, None, CRITICAL))
            continue
        have_version = str(state.get("kubelet_version") or "").lstrip("v")
        if have_version != pin:
            items.append(DriftItem(res, pointer("nodes", name, "kubeletVersion"), pin, have_version or None, WARNING))
        want_labels = dict(node.labels)
        have_labels = dict(state.get("labels") or {})
        keys = set(want_labels) | {k for k in have_labels if k.startswith(render.LABEL_PREFIX)}
        for key in sorted(keys):
            if want_labels.get(key) != have_labels.get(key):
                items.append(
                    DriftItem(
                        res, pointer("nodes", name, "labels", key), want_labels.get(key), have_labels.get(key), WARNING
                    )
                )
        want_taints = _taint_map(node.taints)
        have_taints = _taint_map(state.get("taints") or [])
        keys = set(want_taints) | {
            k for k in have_taints if k in owned_taints or k.split(":")[0].startswith(render.LABEL_PREFIX)
        }
        for key in sorted(keys):
            if want_taints.get(key) != have_taints.get(key):
                items.append(
                    DriftItem(
                        res, pointer("nodes", name, "taints", key), want_taints.get(key), have_taints.get(key), WARNING
                    )
                )
        if gpu_operator and node.is_gpu:
            want = node.expected_gpus
            have = int(state.get("allocatable_gpus") or 0)
            if (want is None and have < 1) or (want is not None and have != want):
                items.append(
                    DriftItem(
                        res,
                        pointer("nodes", name, "allocatableGpus"),
                        want if want is not None else ">=1",
                        have,
                        CRITICAL if want is None or have < want else WARNING,
                    )
                )
    for name in sorted(set(live.nodes) - set(wanted)):
        items.append(DriftItem(f"node/{name}", pointer("nodes", name), None, REGISTERED, INFO))
    return items


def compare_releases(state: DesiredState, live: LiveState) -> list[DriftItem]:
    if live.releases is None:
        return []
    items: list[DriftItem] = []
    for rel in state.releases:
        res = f"helm/{rel.name}"
        have = live.releases.get(rel.name)
        if have is None:
            want = {"chart": _chart_name(rel.chart), "version": rel.version, "namespace": rel.namespace}
            items.append(DriftItem(res, pointer("helm", rel.name), want, None, CRITICAL))
            continue
        if have.get("namespace") != rel.namespace:
            items.append(
                DriftItem(res, pointer("helm", rel.name, "namespace"), rel.namespace, have.get("namespace"), WARNING)
            )
        if have.get("status") != "deployed":
            items.append(DriftItem(res, pointer("helm", rel.name, "status"), "deployed", have.get("status"), CRITICAL))
        if have.get("chart") and have.get("chart") != _chart_name(rel.chart):
            items.append(
                DriftItem(res, pointer("helm", rel.name, "chart"), _chart_name(rel.chart), have["chart"], WARNING)
            )
        if str(have.get("version") or "").lstrip("v") != rel.version.lstrip("v"):
            items.append(
                DriftItem(res, pointer("helm", rel.name, "version"), rel.version, have.get("version"), WARNING)
            )
        for segments, want, got in deep_diff(rel.values, have.get("values") or {}):
            if is_secret_path(segments):
                want, got = mask(want), mask(got)
            items.append(DriftItem(res, pointer("helm", rel.name, "values", *segments), want, got, WARNING))
    return items


def compare_cluster_policy(state: DesiredState, live: LiveState) -> list[DriftItem]:
    if not state.config.enabled("gpu-operator") or not live.cluster_policy_read:
        return []
    res = f"clusterpolicy/{CLUSTER_POLICY}"
    if live.cluster_policy is None:
        return [DriftItem(res, pointer("clusterpolicy", CLUSTER_POLICY), PRESENT, None, CRITICAL)]
    if not cluster_policy_ready(live.cluster_policy):
        have = cluster_policy_state(live.cluster_policy)
        path = pointer("clusterpolicy", CLUSTER_POLICY, "status", "state")
        return [DriftItem(res, path, CLUSTER_POLICY_READY, have, CRITICAL)]
    return []


def _nodeset_key(name: str, keys: Iterable[str]) -> str | None:
    """The chart key of a live NodeSet: `slurm-worker-gpu-8` (Slinky's <fullname>-worker-<key>) -> `gpu-8`."""
    for key in sorted(keys, key=len, reverse=True):
        if name == key or name.endswith(f"-worker-{key}"):
            return key
    return None


def compare_slurm(state: DesiredState, live: LiveState) -> list[DriftItem]:
    if not state.config.enabled("slurm"):
        return []
    slurm = state.release(SLURM_RELEASE)
    values = slurm.values if slurm else {}
    want_sets = {k: v for k, v in (values.get("nodesets") or {}).items() if k != "_defaults" and v.get("enabled", True)}
    items: list[DriftItem] = []
    if live.nodesets is not None:
        seen = set()
        for ns in live.nodesets:
            name = ns["metadata"]["name"]
            key = _nodeset_key(name, want_sets)
            if key is None:
                items.append(DriftItem(f"nodeset/{name}", pointer("slurm", "nodesets", name), None, PRESENT, WARNING))
                continue
            seen.add(key)
            want, have = want_sets[key].get("replicas"), (ns.get("spec") or {}).get("replicas")
            if want is not None and not _same(want, have):
                items.append(
                    DriftItem(f"nodeset/{name}", pointer("slurm", "nodesets", key, "replicas"), want, have, WARNING)
                )
        for key in sorted(set(want_sets) - seen):
            want = {"replicas": want_sets[key].get("replicas")}
            items.append(DriftItem(f"nodeset/{key}", pointer("slurm", "nodesets", key), want, None, CRITICAL))
    if live.slurm_nodes is None:
        return items
    # Expected Slurm nodes: every node of every NodeSet, in the partitions that name its NodeSet.
    partitions = {
        p: set(spec.get("nodesets") or [])
        for p, spec in (values.get("partitions") or {}).items()
        if spec.get("enabled", True)
    }
    want_nodes: dict[str, tuple[list[str], int]] = {}
    for set_name, nodeset in state.nodesets.items():
        for node in nodeset.nodes:
            parts = sorted(p for p, sets in partitions.items() if set_name in sets)
            want_nodes[node] = (parts, nodeset.gpus or 1)
    names = slurm_name_map(list(want_nodes), live.slurm_nodes, live.slurm_pods)
    live_parts = {p for sn in live.slurm_nodes.values() for p in sn.partitions}
    for part in sorted(partitions):
        if part not in live_parts:
            items.append(
                DriftItem(f"slurm-partition/{part}", pointer("slurm", "partitions", part), PRESENT, None, CRITICAL)
            )
    matched = set()
    for node, (parts, gpus) in sorted(want_nodes.items()):
        sname = names.get(node)
        if sname is None:
            items.append(DriftItem(f"slurm-node/{node}", pointer("slurm", "nodes", node), REGISTERED, None, CRITICAL))
            continue
        matched.add(sname)
        sn = live.slurm_nodes[sname]
        have_parts = sorted(sn.partitions)
        if {p for p in parts if p in live_parts} != set(have_parts):
            items.append(
                DriftItem(
                    f"slurm-node/{sname}", pointer("slurm", "nodes", sname, "partitions"), parts, have_parts, WARNING
                )
            )
        if sn.gpus != gpus:
            items.append(
                DriftItem(
                    f"slurm-node/{sname}",
                    pointer("slurm", "nodes", sname, "gres"),
                    f"gpu:{gpus}",
                    sn.gres or None,
                    CRITICAL if sn.gpus < gpus else WARNING,
                )
            )
    for sname in sorted(set(live.slurm_nodes) - matched):
        items.append(DriftItem(f"slurm-node/{sname}", pointer("slurm", "nodes", sname), None, REGISTERED, INFO))
    return items


def compute(state: DesiredState, live: LiveState) -> list[DriftItem]:
    """Every difference, before ignore rules. `state` is the desired state built with the GPU counts recorded
    on the live nodes at install (:func:`gpuforge.desired.learned_gpu_counts`), as install rendered it."""
    items = (
        compare_nodes(state, live)
        + compare_releases(state, live)
        + compare_cluster_policy(state, live)
        + compare_slurm(state, live)
    )
    return sorted(items, key=lambda i: (SEVERITY_ORDER[i.severity], i.path))


def apply_ignores(items: Iterable[DriftItem], rules: Iterable[str]) -> tuple[list[DriftItem], list[DriftItem]]:
    """(kept, ignored)."""
    rules = list(rules)
    kept, ignored = [], []
    for item in items:
        (ignored if is_ignored(item.path, rules) else kept).append(item)
    return kept, ignored


def detect(state: DesiredState, live: LiveState) -> dict[str, Any]:
    """The drift report: items after the config's ignore rules, what was ignored, the summary, the exit code."""
    kept, ignored = apply_ignores(compute(state, live), state.config.drift.ignore)
    return {
        "cluster": state.cluster,
        "items": [i.as_dict() for i in kept],
        "ignored": [i.as_dict() for i in ignored],
        "summary": summary(kept, len(ignored)),
        "exit_code": EXIT_DRIFT if kept else EXIT_NO_DRIFT,
    }


# ---------------------------------------------------------------------------------------------- output


def _short(value: Any) -> str:
    text = "absent" if value is None else (value if isinstance(value, str) else repr(value))
    return text if len(text) <= 40 else text[:37] + "..."


def summary(items: list[DriftItem], ignored: int = 0, shown: int = 3) -> str:
    """One line: `3 drifts: /a (x -> y), /b (...), /c (...)`, `no drift`; ignored ones counted at the end."""
    tail = f" ({ignored} ignored)" if ignored else ""
    if not items:
        return f"no drift{tail}"
    parts = [f"{i.path} ({_short(i.desired)} -> {_short(i.live)})" for i in items[:shown]]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"{len(items)} drift{'s' if len(items) != 1 else ''}: {', '.join(parts)}{more}{tail}"


TABLE_COLUMNS = ("severity", "resource", "path", "desired", "live")


def table_rows(items: Iterable[DriftItem | Mapping[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for item in items:
        d = item.as_dict() if isinstance(item, DriftItem) else dict(item)
        rows.append(
            {
                "severity": d["severity"],
                "resource": d["resource"],
                "path": d["path"],
                "desired": "absent" if d["desired"] is None else str(d["desired"]),
                "live": "absent" if d["live"] is None else str(d["live"]),
            }
        )
    return rows
