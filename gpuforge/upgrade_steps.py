"""The upgrade's steps, in order, with their gates and their way back: plain functions of the plan and of what the
read verbs return (no Prefect, no client). flows/upgrade.py carries them out.

Order (an upgrade is an install's chart phases again, at the new pins, one gated step at a time):

1. ``crds``: the CRDs of the charts' ``crds/`` folders that the plan found changed, for releases that exist
   (Helm installs a ``crds/`` folder once and never upgrades it), applied before any chart that uses them;
2. then each install phase that has Helm releases (:data:`gpuforge.phases.INSTALL_PHASES`: monitoring, GPU
   Operator, Slurm operator and Slurm, dashboard), when one of its releases is not already at the desired chart
   and values.

Before the first step the cluster must be healthy (:func:`precheck_problems`) and the plan must hold nothing the
flow cannot carry out (:func:`blockers`). After every step a validation gate; a step that fails (Helm's error
or its gate) puts each release it moved back to the revision it had before the step (:func:`rollbacks`), so the
cluster is left as the last green validation saw it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gpuforge.phases import INSTALL_PHASES
from gpuforge.upgrade import LiveState, TargetRelease, UpgradePlan, stranded_versions

CRDS_STEP = "crds"


@dataclass(frozen=True)
class Step:
    name: str  # CRDS_STEP or the install phase that converges the releases
    releases: tuple[str, ...] = ()  # every release the phase converges, in order (its rollback scope)
    moving: tuple[str, ...] = ()  # the ones not yet at the desired chart and values
    crds: tuple[tuple[str, str], ...] = ()  # (release, CRD name) applied explicitly

    @property
    def detail(self) -> str:
        if self.name == CRDS_STEP:
            return "apply explicitly (server-side): " + ", ".join(f"{crd} ({rel})" for rel, crd in self.crds)
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


def blockers(plan: UpgradePlan, live: LiveState, targets: Sequence[TargetRelease]) -> list[str]:
    """What stops the upgrade before anything is touched: plan errors, Kubernetes steps (not carried out by this
    flow), built-in APIs a step removes that live objects still use, CRD versions the target stops serving while
    objects may be stored at them."""
    out = [f"plan error: {e}" for e in plan.errors]
    kube = [c for c in plan.components if c.component in ("kubernetes", "kubelets") and c.changes]
    if kube or plan.kube_path:
        moves = ", ".join(f"{c.component} {c.live} -> {c.target}" for c in kube)
        out.append(
            f"Kubernetes changes ({moves}): `gpuforge upgrade apply` upgrades charts only, it does not run Kubespray's "
            "upgrade-cluster.yml; set kubespray.kube_version to the live version to upgrade the charts first"
        )
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
