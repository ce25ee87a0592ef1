"""The upgrade's steps, in order, with their gates and their way back: plain functions of the plan and of what the
read verbs return (no Prefect, no client). flows/upgrade.py carries them out.

Order (an upgrade is an install's chart phases again, at the new pins, one gated step at a time):

1. ``crds``: the CRDs of the charts' ``crds/`` folders that the plan found changed, for releases that exist
   (Helm installs a ``crds/`` folder once and never upgrades it), applied before any chart that uses them;
2. then each install phase that has Helm releases (:data:`gpuforge.phases.INSTALL_PHASES`: monitoring, GPU
   Operator, Slurm operator and Slurm, dashboard), when one of its releases is not already at the desired chart
   and values;
3. then Kubernetes (:func:`kubernetes_steps`), one minor at a time as the plan's path says, each through
   Kubespray's ``upgrade-cluster.yml`` of the release the plan names: the control-plane (and etcd) hosts first,
   gated, then every other node alone (``--limit <node>``), the last one gated again. A GPU node is taken out of
   service before its step (Slurm drained, its jobs waited for, cordoned: :func:`out_of_service_reason`) and
   returned only after it is Ready at the new version and re-validated; a node that fails stays out with the
   reason (:func:`kept_out_reason`).

Before the first step the cluster must be healthy (:func:`precheck_problems`) and the plan must hold nothing the
flow cannot carry out (:func:`blockers`). After every step a validation gate; a step that fails (Helm's error
or its gate) puts each release it moved back to the revision it had before the step (:func:`rollbacks`), so the
cluster is left as the last green validation saw it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from gpuforge.node_lifecycle import KUBESPRAY_UPGRADE
from gpuforge.phases import INSTALL_PHASES
from gpuforge.remediation import SLURM_REASON_MAX, SLURM_REASON_PREFIX
from gpuforge.upgrade import KubeStep, LiveState, TargetRelease, UpgradePlan, kube_version, stranded_versions

CRDS_STEP = "crds"
KUBE_CONTROL_PLANE_STEP = "kubernetes-control-plane"
KUBE_NODE_STEP = "kubernetes-node"
KUBE_STEPS = (KUBE_CONTROL_PLANE_STEP, KUBE_NODE_STEP)


@dataclass(frozen=True)
class Step:
    name: str  # CRDS_STEP, the install phase that converges the releases, or one of KUBE_STEPS
    releases: tuple[str, ...] = ()  # every release the phase converges, in order (its rollback scope)
    moving: tuple[str, ...] = ()  # the ones not yet at the desired chart and values
    crds: tuple[tuple[str, str], ...] = ()  # (release, CRD name) applied explicitly
    kube: KubeStep | None = None  # Kubernetes steps: the minor step of the plan's path this is part of
    hosts: tuple[str, ...] = ()  # Kubernetes steps: upgrade-cluster.yml's --limit
    gated: bool = True  # a validation gate after it (every chart step; the Kubernetes ones where it says so)

    @property
    def title(self) -> str:
        """The step's name in the recap: a node step names its node."""
        return f"{self.name} {self.hosts[0]}" if self.name == KUBE_NODE_STEP else self.name

    @property
    def detail(self) -> str:
        if self.name == CRDS_STEP:
            return "apply explicitly (server-side): " + ", ".join(f"{crd} ({rel})" for rel, crd in self.crds)
        if self.kube is not None:
            return (
                f"Kubernetes {self.kube.start} -> {self.kube.to}: Kubespray {self.kube.kubespray} "
                f"{KUBESPRAY_UPGRADE} --limit {','.join(self.hosts)}"
            )
        return "helm upgrade with gpuforge's rendered values: " + ", ".join(self.moving)


def installed_releases(plan: UpgradePlan) -> set[str]:
    return {
        c.component.removeprefix("helm/")
        for c in plan.components
        if c.component.startswith("helm/") and c.live != "absent"
    }


def upgrade_steps(plan: UpgradePlan, services: Mapping[str, Sequence[str]], moving: Collection[str]) -> list[Step]:
    """The steps, in order. `services`: each enabled service's releases in install order; `moving`: the releases
    whose stored chart version or values differ from the desired ones."""
    installed = installed_releases(plan)
    crds = tuple((c.release, c.crd) for c in plan.crd_changes if not c.helm_upgrades_it and c.release in installed)
    steps = [Step(CRDS_STEP, crds=crds)] if crds else []
    for phase in INSTALL_PHASES:
        releases = tuple(services.get(phase.service or "", ()))
        if changed := tuple(r for r in releases if r in moving):
            steps.append(Step(phase.name, releases, changed))
    return steps


class Host(Protocol):
    """A config node as the Kubernetes steps see it (gpuforge.desired.DesiredNode)."""

    name: str
    is_control_plane: bool
    is_etcd: bool


def kubernetes_steps(
    plan: UpgradePlan, live: LiveState, hosts: Sequence[Host], target: str, kubespray: str
) -> list[Step]:
    """The Kubernetes steps, in order: for each minor step of the plan's path, the control-plane and etcd hosts
    together (Kubespray upgrades them one at a time itself), then every other host alone, in config order. A
    cluster whose API server is at `target` but with kubelets behind (an earlier run stopped half-way) gets the
    steps for those hosts only, through `kubespray`. Hosts already at a step's version are left out. The
    control-plane step and the last step are gated."""
    path = list(plan.kube_path)
    stale = sorted((v.lstrip("v") for v in live.kubelets.values() if _older(v, target)), key=kube_version)
    if not path and stale:
        path = [KubeStep(stale[0], target, kubespray)]
    server = live.server_version or target
    out: list[Step] = []
    for kstep in path:
        behind = [h.name for h in hosts if h.name in live.kubelets and _older(live.kubelets[h.name], kstep.to)]
        control = tuple(h.name for h in hosts if (h.is_control_plane or h.is_etcd))
        if _older(server, kstep.to) or set(control) & set(behind):
            out.append(Step(KUBE_CONTROL_PLANE_STEP, kube=kstep, hosts=control))
        out += [Step(KUBE_NODE_STEP, kube=kstep, hosts=(n,), gated=False) for n in behind if n not in control]
    if out:
        out[-1] = replace(out[-1], gated=True)
    return out


def _older(version: str, than: str) -> bool:
    return kube_version(version) < kube_version(than)


def out_of_service_reason(step: Step) -> str:
    """Why a node is drained and cordoned for its Kubernetes step (both sides, gpuforge's Slurm prefix)."""
    assert step.kube is not None
    return f"{SLURM_REASON_PREFIX} upgrade: Kubernetes {step.kube.to} (Kubespray {step.kube.kubespray})"


def kept_out_reason(step: Step, why: str) -> str:
    """Why a node whose Kubernetes step failed stays drained and cordoned."""
    assert step.kube is not None
    text = f"{SLURM_REASON_PREFIX} upgrade to Kubernetes {step.kube.to} failed: {' '.join(why.split())}"
    return text if len(text) <= SLURM_REASON_MAX else text[: SLURM_REASON_MAX - 3] + "..."


def crd_manifests(step: Step, targets: Sequence[TargetRelease]) -> list[dict[str, Any]]:
    """The CRD objects of a crds step, as the target charts' crds/ folders write them."""
    by_release = {t.release.name: t.facts for t in targets}
    out = []
    for release, name in step.crds:
        facts = by_release.get(release)
        if facts is None or name not in facts.crd_objects:
            raise KeyError(f"CRD {name}: not in the crds/ folder of {release}'s target chart")
        out.append(facts.crd_objects[name])
    return out


def blockers(
    plan: UpgradePlan, live: LiveState, targets: Sequence[TargetRelease], hosts: Collection[str] = ()
) -> list[str]:
    """What stops the upgrade before anything is touched: plan errors, nodes behind the pin that the config does
    not name (no Kubespray run reaches them), built-in APIs a step removes that live objects still use, CRD
    versions the target stops serving while objects may be stored at them."""
    out = [f"plan error: {e}" for e in plan.errors]
    if plan.kube_path or any(c.component == "kubelets" and c.changes for c in plan.components):
        target = next(c.target for c in plan.components if c.component == "kubernetes")
        strays = sorted(n for n, v in live.kubelets.items() if n not in hosts and _older(v, target))
        out += [
            f"node {n} (kubelet {live.kubelets[n]}) is not in the config: Kubespray's upgrade-cluster.yml would not "
            "reach it; add it to k8s_cluster_nodes or remove it from the cluster first"
            for n in strays
        ]
    out += [f"removed API in use: {line}" for line in plan.removed_apis]
    for t in targets:
        if t.facts is not None:
            out += [
                f"stranded CRD version: {line}"
                for line in stranded_versions(live.crds, t.facts.crds_for(t.release.values))
            ]
    return out


def precheck_problems(readyz_ok: bool, readyz: str, nodes_ready: Mapping[str, bool]) -> list[str]:
    """The API server's verbose /readyz (its etcd check included) and every node's Ready condition."""
    out = []
    failing = [line.strip() for line in readyz.splitlines() if line.strip().startswith("[-]")]
    if not readyz_ok or failing:
        out.append("API server not ready: " + ("; ".join(failing) or readyz.strip()[:300] or "no answer"))
    if "[+]etcd ok" not in readyz:
        out.append("etcd: the API server does not report `[+]etcd ok` in /readyz?verbose")
    out += [f"node {name} is NotReady" for name, ready in sorted(nodes_ready.items()) if not ready]
    return out


class Revision(Protocol):
    """A release's latest revision as Helm stored it (tasks.helm.ReleaseRecord)."""

    revision: int
    status: str
    chart_version: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Rollback:
    release: str
    to_revision: int | None  # None: nothing for gpuforge to run
    detail: str


def rollbacks(releases: Sequence[str], before: Mapping[str, Revision], now: Mapping[str, Revision]) -> list[Rollback]:
    """How each release of a failed step gets back to the revision it had before the step, last first."""
    out = []
    for name in reversed(releases):
        was, current = before.get(name), now.get(name)
        if was is None:
            out.append(Rollback(name, None, "installed by this step: no earlier revision, left for inspection"))
        elif current is None:
            out.append(Rollback(name, None, f"its release record is gone (was revision {was.revision})"))
        elif current.revision == was.revision:
            out.append(Rollback(name, None, f"untouched: still revision {was.revision}"))
        elif current.status == "deployed" and (current.chart_version, current.values) == (
            was.chart_version,
            was.values,
        ):
            out.append(
                Rollback(
                    name,
                    None,
                    f"already back: revision {current.revision} holds revision {was.revision}'s chart "
                    f"{was.chart_version} and values (Helm's --atomic rollback)",
                )
            )
        else:
            out.append(
                Rollback(
                    name,
                    was.revision,
                    f"revision {current.revision} ({current.status}, chart {current.chart_version}) -> rollback to "
                    f"revision {was.revision} (chart {was.chart_version})",
                )
            )
    return out


def recap_markdown(cluster: str, plan_lines: Sequence[str], rows: Sequence[Mapping[str, Any]], outcome: str) -> str:
    """The run's recap: the outcome, a line per step, then the plan it started from."""
    lines = [f"# Upgrade of `{cluster}`", "", f"**{outcome}**", ""]
    lines += [
        f"- **{r['step']}** {r['result']} in {r['seconds']} s: {r['detail']}"
        + (f" (gate: {r['gate']})" if r.get("gate") else "")
        for r in rows
    ]
    lines += ["", "## The plan it started from", "", "```", *plan_lines, "```"]
    return "\n".join(lines)
