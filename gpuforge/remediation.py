"""Remediation: what gpu-health does about unhealthy GPUs, decided from verdicts, node state and the config.

Pure domain code: no Prefect, no clients. The gpu-health flow reads the nodes (one list) and Slurm (one
`sinfo`), calls :func:`decide`, and carries out the returned :class:`Action` list; every decision, also the
ones not carried out, is listed in its report.

Policy
------
* ``remediate: off`` (the default): nothing changes; the report says what would have been done.
* Only **unhealthy** GPUs take a node out. Degraded GPUs are reported; unknown ones are not acted on either
  (missing metrics are more often a monitoring problem than a GPU one) -- a node with no metrics at all is
  still listed, never called healthy.
* ``remediate: cordon``: cordon the Kubernetes node with the annotation ``gpuforge.io/cordoned-reason``
  (why and when). A node that belongs to a Slurm NodeSet is *not* touched in this mode: cordoning it alone
  would leave Slurm scheduling jobs onto it (Slurm does not look at the Kubernetes cordon), breaking the rule
  that both sides are in the same state. The report says so and names the mode that would act.
* ``remediate: cordon+drain-slurm``: cordon, and drain the node's Slurm node
  (``scontrol update nodename=X state=drain reason="gpuforge: ..."``; running jobs finish, no new ones start,
  exactly what a cordon means for pods). Nodes gpuforge cordoned earlier whose Slurm node is no longer drained
  are drained again, so the two sides never disagree about a node gpuforge took out.
* Never more than ``remediation_max_fraction`` of the GPU nodes out of service at once (rounded down),
  counting nodes already out: cordoned in Kubernetes by anyone, or drained/down in Slurm by anyone.
  Candidates are taken worst first (most unhealthy GPUs), then by name; the rest are listed as skipped.
* Returning a node (``gpuforge health --release NODE``) is :func:`release_decision`: only after a passing
  re-validation and healthy fresh metrics is the node uncordoned and its Slurm node resumed.
* Both directions act on both sides through the same plan, :func:`steps_per_node`: the Slurm side first, then
  Kubernetes, each change with the change that takes it back, so that a failure half-way can be undone.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gpuforge.config import Config, Remediation
from gpuforge.desired import desired_nodes
from gpuforge.gres import gpu_count
from gpuforge.health import GpuVerdict, Verdict

CORDON_ANNOTATION = "gpuforge.io/cordoned-reason"
SLURM_REASON_PREFIX = "gpuforge:"
# Slurm keeps a reason of any length, but sinfo/squeue columns truncate; keep it readable.
SLURM_REASON_MAX = 200
ANNOTATION_MAX = 2000

# `sinfo -h -N -o FORMAT`: one line per node and partition; the reason last, as it may hold spaces.
SINFO_FORMAT = "%N|%P|%T|%G|%u|%E"
SINFO_ARGV = ["sinfo", "-h", "-N", "-o", SINFO_FORMAT]

# Kinds of action.
CORDON, DRAIN_SLURM, UNCORDON, RESUME_SLURM = "cordon", "drain-slurm", "uncordon", "resume-slurm"


# ------------------------------------------------------------------------------------------------ Slurm


@dataclass(frozen=True)
class SlurmNode:
    name: str
    state: str  # sinfo %T, e.g. idle, mixed, drained, draining, down*, idle+drain
    partitions: tuple[str, ...] = ()
    gres: str = ""
    user: str = ""
    reason: str = ""

    @property
    def gpus(self) -> int:
        return gpu_count(self.gres)

    @property
    def out_of_service(self) -> bool:
        return slurm_state_class(self.state) in ("drain", "down")

    @property
    def drained(self) -> bool:
        return slurm_state_class(self.state) == "drain"

    @property
    def by_gpuforge(self) -> bool:
        return self.reason.startswith(SLURM_REASON_PREFIX)


def slurm_state_class(state: str) -> str:
    """drain (drained, draining, idle+drain, also when not responding), down (down, fail, inval, unknown, not
    responding '*'), or up (idle, mixed, allocated, reserved, ...)."""
    s = state.strip().lower()
    words = set(re.split(r"\+", s.rstrip("*~#!%$@^-")))
    if any(w.startswith("drain") for w in words):
        return "drain"
    if s.endswith("*") or words & {"down", "fail", "failing", "inval", "unknown", "future"}:
        return "down"
    return "up"


def parse_sinfo(output: str) -> dict[str, SlurmNode]:
    """Output of :data:`SINFO_ARGV` -> node -> SlurmNode (partitions merged; the default's '*' stripped)."""
    nodes: dict[str, SlurmNode] = {}
    for line in output.splitlines():
        parts = line.strip().split("|", 5)
        if len(parts) < 3 or not parts[0]:
            continue
        name, partition, state = parts[0], parts[1].rstrip("*"), parts[2]
        gres = parts[3] if len(parts) > 3 else ""
        user = parts[4] if len(parts) > 4 else ""
        reason = parts[5].strip() if len(parts) > 5 else ""
        gres = "" if gres == "(null)" else gres
        user = "" if user in ("Unknown", "(null)") else user
        reason = "" if reason == "none" else reason
        old = nodes.get(name)
        partitions = tuple(sorted({*(old.partitions if old else ()), partition} - {""}))
        nodes[name] = SlurmNode(name, state, partitions, gres, user, reason)
    return nodes


def slurm_name_map(
    k8s_nodes: Iterable[str], slurm_nodes: Mapping[str, Any], pods: Sequence[Mapping[str, str]] = ()
) -> dict[str, str]:
    """Kubernetes node -> its Slurm node: the same name (the lab, and NodeSets with hostname = node name), or
    the slurmd pod running on it, by the pod's hostname or name (Slinky names Slurm nodes after the pod)."""
    on_node: dict[str, list[Mapping[str, str]]] = {}
    for pod in pods:
        if pod.get("node"):
            on_node.setdefault(pod["node"], []).append(pod)
    out = {}
    for node in k8s_nodes:
        candidates = [node]
        for pod in on_node.get(node, []):
            candidates += [pod.get("hostname") or "", pod.get("name") or ""]
        found = next((c for c in candidates if c and c in slurm_nodes), None)
        if found:
            out[node] = found
    return out


# ------------------------------------------------------------------------------------------------ texts


def stamp(now: dt.datetime, timezone: str) -> str:
    """`now` in the cluster's time zone, ISO 8601 to the second (with its offset)."""
    return now.astimezone(zoneinfo.ZoneInfo(timezone)).isoformat(timespec="seconds")


def node_reasons(verdicts: Iterable[GpuVerdict]) -> list[str]:
    """`GPU 3 (GPU-ab..): XID 79 (...)` for each unhealthy GPU, worst reasons first."""
    out = []
    for v in verdicts:
        if v.verdict == Verdict.UNHEALTHY:
            out.append(f"GPU {v.gpu}: {'; '.join(v.reasons) or 'unhealthy'}")
    return out


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def annotation_text(reasons: list[str], when: str) -> str:
    """The `gpuforge.io/cordoned-reason` value: who, when and why."""
    return _clip(f"cordoned by gpuforge gpu-health at {when}: {' | '.join(reasons)}", ANNOTATION_MAX)


def slurm_reason(reasons: list[str], when: str) -> str:
    """The Slurm drain reason: starts with `gpuforge:` so a later run knows whose drain it is."""
    return _clip(f"{SLURM_REASON_PREFIX} {' | '.join(reasons)} ({when})", SLURM_REASON_MAX)


# ----------------------------------------------------------------------------------------------- decide


@dataclass
class Action:
    node: str
    kind: str  # cordon | drain-slurm | uncordon | resume-slurm
    detail: str
    slurm_node: str | None = None
    annotation: str | None = None
    slurm_reason: str | None = None
    # planned: to be carried out; skipped: decided against (off, limit, mode); done/failed: set by the flow.
    status: str = "planned"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NodeInfo:
    """What remediation needs of a Kubernetes node (tasks.kube.NodeState has these fields)."""

    name: str
    unschedulable: bool = False
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class Decision:
    actions: list[Action]
    out_before: list[str]  # GPU nodes already out of service (cordoned or Slurm drained/down)
    budget: int  # how many GPU nodes may be out at once
    candidates: list[str]  # nodes with unhealthy GPUs, worst first

    @property
    def planned(self) -> list[Action]:
        return [a for a in self.actions if a.status == "planned"]


def _info(node: Any) -> NodeInfo:
    if isinstance(node, NodeInfo):
        return node
    if isinstance(node, Mapping):
        return NodeInfo(node["name"], bool(node.get("unschedulable")), dict(node.get("annotations") or {}))
    return NodeInfo(node.name, bool(node.unschedulable), dict(node.annotations or {}))


def decide(
    config: Config,
    verdicts: Sequence[GpuVerdict],
    nodes: Mapping[str, Any],
    slurm_nodes: Mapping[str, SlurmNode] | None,
    slurm_names: Mapping[str, str],
    now: dt.datetime,
) -> Decision:
    """The remediation actions for this run (see the module docstring for the policy).

    `nodes`: Kubernetes node name -> NodeInfo / NodeState / mapping; `slurm_nodes`: from :func:`parse_sinfo`
    (None when Slurm could not be read: no Slurm action is then planned, and Slurm nodes are not cordoned
    either, since the two sides could not be kept consistent); `slurm_names`: Kubernetes -> Slurm node name.
    """
    mode = Remediation(config.remediate)
    when = stamp(now, config.timezone)
    wanted = desired_nodes(config)
    gpu_names = [n.name for n in wanted if n.is_gpu]
    in_slurm = {n.name for n in wanted if n.in_slurm}
    infos = {name: _info(nodes[name]) for name in gpu_names if name in nodes}

    def slurm_of(name: str) -> SlurmNode | None:
        sname = slurm_names.get(name)
        return (slurm_nodes or {}).get(sname) if sname else None

    out_before = sorted(
        name
        for name in gpu_names
        if (name in infos and infos[name].unschedulable) or ((s := slurm_of(name)) is not None and s.out_of_service)
    )
    budget = math.floor(config.remediation_max_fraction * len(gpu_names) + 1e-9)
    out = set(out_before)

    by_node: dict[str, list[GpuVerdict]] = {}
    for v in verdicts:
        by_node.setdefault(v.node, []).append(v)
    bad = {name: node_reasons(vs) for name, vs in by_node.items() if name in gpu_names}
    bad = {name: reasons for name, reasons in bad.items() if reasons}
    candidates = sorted(bad, key=lambda n: (-len(bad[n]), n))

    actions: list[Action] = []
    for name in candidates:
        reasons = bad[name]
        info = infos.get(name)
        slurm = slurm_of(name)
        sname = slurm_names.get(name)
        wants_slurm = name in in_slurm
        note = annotation_text(reasons, when)
        sreason = slurm_reason(reasons, when)
        if info is None:
            actions.append(
                Action(name, CORDON, "node not registered in Kubernetes: nothing to cordon", status="skipped")
            )
            continue
        ours = CORDON_ANNOTATION in info.annotations
        if info.unschedulable:
            if wants_slurm and mode == Remediation.CORDON_DRAIN_SLURM and ours and slurm and not slurm.drained:
                actions.append(
                    Action(
                        name,
                        DRAIN_SLURM,
                        f"cordoned by gpuforge but Slurm node {sname} is {slurm.state}: drain it so both sides agree",
                        sname,
                        slurm_reason=sreason,
                    )  # fmt: skip
                )
            continue  # already out; nothing else to do
        if mode == Remediation.OFF:
            actions.append(Action(name, CORDON, f"remediate is off; would cordon: {'; '.join(reasons)}", sname,
                                  note, sreason if wants_slurm else None, status="skipped"))  # fmt: skip
            continue
        if wants_slurm and mode == Remediation.CORDON:
            actions.append(
                Action(
                    name,
                    CORDON,
                    "node is in a Slurm NodeSet: cordoning it alone would leave Slurm scheduling "
                    "onto it; set remediate: cordon+drain-slurm to take it out on both sides",
                    sname,
                    note,
                    sreason,
                    status="skipped",
                )  # fmt: skip
            )
            continue
        if wants_slurm and (slurm_nodes is None or slurm is None):
            why = "Slurm could not be read" if slurm_nodes is None else f"no Slurm node found for {name}"
            actions.append(Action(name, CORDON, f"{why}: not cordoned, the two sides could not be kept consistent",
                                  sname, note, sreason, status="skipped"))  # fmt: skip
            continue
        if len(out) + 1 > budget:
            actions.append(
                Action(
                    name,
                    CORDON,
                    f"limit reached: {len(out)} of {len(gpu_names)} GPU nodes out, at most "
                    f"{budget} (remediation_max_fraction {config.remediation_max_fraction:g})",
                    sname,
                    note,
                    sreason if wants_slurm else None,
                    status="skipped",
                )  # fmt: skip
            )
            continue
        out.add(name)
        actions.append(Action(name, CORDON, "; ".join(reasons), sname, note))
        if wants_slurm and slurm is not None and not slurm.drained:
            actions.append(Action(name, DRAIN_SLURM, f"Slurm node {sname}: {slurm.state} -> drain", sname,
                                  slurm_reason=sreason))  # fmt: skip
    return Decision(actions, out_before, budget, candidates)


# ------------------------------------------------------------------------------------------------ release


@dataclass
class ReleaseDecision:
    node: str
    ok: bool
    reasons: list[str]  # why it stays out (empty when ok)
    actions: list[Action]


def release_decision(
    node: str,
    validation_ok: bool,
    validation_detail: str,
    verdicts: Sequence[GpuVerdict],
    info: Any,
    slurm: SlurmNode | None,
    slurm_name: str | None,
    in_slurm: bool,
) -> ReleaseDecision:
    """Return `node` to service only when its re-validation passed and every GPU is healthy on fresh metrics.

    Healthy means healthy: degraded or unknown GPUs, or no GPU at all, keep it out too."""
    reasons = []
    mine = [v for v in verdicts if v.node == node]
    if not mine:
        reasons.append("no GPU metrics for the node")
    for v in mine:
        if v.verdict != Verdict.HEALTHY:
            reasons.append(f"GPU {v.gpu} {v.verdict.value}: {'; '.join(v.reasons) or '-'}")
    if not validation_ok:
        reasons.append(f"re-validation failed: {validation_detail}")
    if in_slurm and slurm is None:
        reasons.append(f"no Slurm node found for {node}: cannot resume it, so it is not uncordoned either")
    if reasons:
        return ReleaseDecision(node, False, reasons, [])
    actions = []
    i = _info(info) if info is not None else None
    if i is not None and (i.unschedulable or CORDON_ANNOTATION in i.annotations):
        actions.append(Action(node, UNCORDON, f"re-validated: {validation_detail}"))
    if in_slurm and slurm is not None and slurm.out_of_service:
        actions.append(Action(node, RESUME_SLURM, f"Slurm node {slurm_name}: {slurm.state} -> resume", slurm_name))
    return ReleaseDecision(node, True, [], actions)


# ------------------------------------------------------------------------------------ acting on both sides


@dataclass(frozen=True)
class Change:
    """One change on one side of a node: cordon or uncordon it in Kubernetes, drain or resume it in Slurm."""

    kind: str  # cordon | uncordon | drain-slurm | resume-slurm
    target: str  # the Kubernetes node (cordon, uncordon) or the Slurm node (drain, resume)
    note: str | None = None  # the cordon annotation, or the Slurm reason of a drain

    def __str__(self) -> str:
        what = {
            CORDON: f"cordoned {self.target}",
            UNCORDON: f"uncordoned {self.target}",
            DRAIN_SLURM: f"drained Slurm node {self.target}",
            RESUME_SLURM: f"resumed Slurm node {self.target}",
        }[self.kind]
        return f"{what}: {self.note}" if self.note else what


@dataclass
class Step:
    """A change, the change that takes it back, and the Action whose status and detail report on both."""

    action: Action
    change: Change
    undo: Change


def _step(action: Action, cordon_note: str | None, drain_reason: str | None) -> Step:
    if action.kind == CORDON:
        return Step(action, Change(CORDON, action.node, action.annotation), Change(UNCORDON, action.node))
    if action.kind == UNCORDON:
        return Step(action, Change(UNCORDON, action.node), Change(CORDON, action.node, cordon_note))
    slurm_node = action.slurm_node or action.node
    if action.kind == DRAIN_SLURM:
        return Step(action, Change(DRAIN_SLURM, slurm_node, action.slurm_reason), Change(RESUME_SLURM, slurm_node))
    return Step(action, Change(RESUME_SLURM, slurm_node), Change(DRAIN_SLURM, slurm_node, drain_reason))


def steps_per_node(
    actions: Iterable[Action], *, cordon_note: str | None = None, drain_reason: str | None = None
) -> dict[str, list[Step]]:
    """The planned actions as steps, per node: the Slurm side first, then Kubernetes.

    Taking a node out drains Slurm before the cordon and returning it resumes Slurm before the uncordon, so a
    failed Slurm change stops before Kubernetes is touched. Undoing an uncordon cordons again with
    `cordon_note`; undoing a resume drains again with `drain_reason` (only returning a node needs them)."""
    per_node: dict[str, list[Step]] = {}
    for action in actions:
        if action.status == "planned":
            per_node.setdefault(action.node, []).append(_step(action, cordon_note, drain_reason))
    for steps in per_node.values():
        steps.sort(key=lambda s: s.change.kind not in (DRAIN_SLURM, RESUME_SLURM))
    return per_node
