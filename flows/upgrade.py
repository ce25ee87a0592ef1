"""upgrade: move a live cluster to gpuforge's pins, one gated step at a time (`gpuforge upgrade apply`).

1. The plan (gpuforge.upgrade). Nothing to do: done, nothing touched. Something this flow cannot carry out (a plan
   error, nodes behind the pin that the config does not name, removed APIs in use, stranded CRD versions): stop
   before touching anything.
2. Pre-checks: the API server ready with `[+]etcd ok`, no node NotReady, a green validation now; with Kubernetes
   steps, Kubespray ready too (checkout and venv of each release the plan names, playbook, host keys, facts).
3. The steps (gpuforge.upgrade_steps): the changed CRDs of the charts' crds/ folders applied server-side, then each
   install phase with Helm releases (monitoring, GPU Operator, Slurm operator and Slurm, dashboard), through the
   install's own converge at the rendered values (never --reuse-values). After each step a validation gate. A step
   that fails, in Helm's words or at its gate, puts each release it moved back to its revision from before the
   step (Helm history, `helm rollback`) and stops the run.
4. Then Kubernetes (flows.upgrade_kubernetes): Kubespray's upgrade-cluster.yml on the control plane, gated, then
   node by node, each GPU node drained the Slurm way first and re-validated before it takes work again, the last
   step gated. A node step that fails leaves its node cordoned and drained with the reason and stops the run.
5. The plan again: it must have nothing left to do.
"""

from __future__ import annotations

import time
from dataclasses import replace

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows import upgrade_kubernetes
from flows.common import (
    ClusterParams,
    cluster_lock,
    desired_state,
    handing_down,
    publish_markdown,
    publish_table,
    read_upgrade_plan,
    run_name,
)
from flows.install import RUNBOOKS, InstallParams
from flows.notify import notify_failure
from flows.validate import ValidateParams, validate
from gpuforge import desired, drain_room, metric_contract
from gpuforge import upgrade_steps as steps
from gpuforge.upgrade import plan_lines
from tasks import helm, kube

EXIT_DONE, EXIT_STEP_FAILED, EXIT_REFUSED = 0, 1, 2


class UpgradeParams(ClusterParams):
    # How long a node's drain may take (a GPU node's Slurm jobs, then evictions PodDisruptionBudgets hold back)
    # before its Kubernetes step gives up (the node then stays drained and cordoned, and the run stops).
    drain_timeout_s: float = 3600


class UpgradeFailed(RuntimeError):
    """The upgrade stopped: refused before touching anything (exit 2) or a step failed (1): a chart step rolled
    back, or a node kept out of service."""

    def __init__(self, report: dict):
        self.report = report
        super().__init__(report["outcome"])


@flow(name="upgrade", flow_run_name=run_name("upgrade"), on_failure=[notify_failure], on_crashed=[notify_failure])
def upgrade(params: UpgradeParams) -> dict:
    config = desired_state(params).config
    kubeconfig = config.kubeconfig_path()
    nodes = kube.list_nodes(kubeconfig)
    state = desired.build(config, desired.learned_gpu_counts(config, nodes))
    rows: list[dict] = []
    with cluster_lock(config.cluster_name, "install or upgrade"), handing_down(params, state):
        plan, live, wanted = read_upgrade_plan(config, state.releases)
        lines = plan_lines(plan)
        publish_markdown("upgrade-plan", "```\n" + "\n".join(lines) + "\n```", f"upgrade plan of {config.cluster_name}")
        if plan.exit_code == 0:
            return _finish(config, lines, rows, "nothing to do: the cluster is at the pins", EXIT_DONE)
        started = time.monotonic()
        ks = config.kubespray
        kube_steps = steps.kubernetes_steps(plan, live, state.nodes, ks.kube_version, ks.version)
        problems = (
            steps.blockers(plan, live, wanted, {n.name for n in state.nodes})
            or steps.precheck_problems(*kube.readyz(kubeconfig), {name: node.ready for name, node in nodes.items()})
            or (
                kube_steps
                and drain_room.drain_problems(
                    [h for s in kube_steps for h in s.hosts], *kube.read_drain_room(kubeconfig)
                )
            )
        )
        kubespray, problems = _kubespray(state, kube_steps, problems)
        gate = None if problems else _gate(params)
        ok = not problems and gate.startswith("green")
        detail = "; ".join(problems) or "API server and etcd ready, every node Ready" + (
            f"; room to drain each node they take out; Kubespray {', '.join(kubespray.releases)} ready for "
            f"{len(kube_steps)} Kubernetes step(s)"
            if kube_steps
            else ""
        )
        rows.append(_row("pre-check", started, detail, gate, result="done" if ok else "refused"))
        if not ok:
            return _finish(
                config, lines, rows, f"refused before any change: {'; '.join(problems) or gate}", EXIT_REFUSED
            )
        records = helm.release_records(kubeconfig)
        moving = {r.name for r in state.releases if not helm.unchanged(r, records.get((r.namespace, r.name)))}
        services = {r.service: [s.name for s in state.service_releases(r.service)] for r in state.releases}
        for step in steps.upgrade_steps(plan, services, moving):
            rows.append(_step(step, params, wanted))
            if rows[-1]["result"] != "done":
                outcome = f"step {step.name} failed and was rolled back: {rows[-1]['detail']}"
                return _finish(config, lines, rows, outcome, EXIT_STEP_FAILED)
        for step in kube_steps:
            rows.append(upgrade_kubernetes.run_step(step, state, kubespray, params.drain_timeout_s))
            if rows[-1]["result"] == "done" and step.gated:
                gated = time.monotonic()
                rows[-1]["gate"] = _gate(params)
                rows[-1]["seconds"] = round(rows[-1]["seconds"] + time.monotonic() - gated, 1)  # as chart steps
                rows[-1]["result"] = "done" if rows[-1]["gate"].startswith("green") else "gate red"
            if rows[-1]["result"] != "done":
                outcome = f"step {step.title} failed: {rows[-1]['gate'] or rows[-1]['detail']}"
                return _finish(config, lines, rows, outcome, EXIT_STEP_FAILED)
        after, _, _ = read_upgrade_plan(config, state.releases)
        if after.exit_code != 0:
            left = "; ".join(plan_lines(after)[1:])[:800]
            return _finish(config, lines, rows, f"the plan still has work after every step: {left}", EXIT_STEP_FAILED)
    return _finish(config, lines, rows, f"upgraded: {len(rows) - 1} step(s), every gate green", EXIT_DONE)


def _kubespray(state, kube_steps: list[steps.Step], problems: list[str]):
    """Kubespray made ready for the Kubernetes steps before anything changes; what stops it joins `problems`."""
    if not kube_steps or problems:
        return None, problems
    try:
        return upgrade_kubernetes.prepare(state, kube_steps), problems
    except Exception as exc:  # noqa: BLE001 - a refusal before any change, in the words of what failed
        return None, [f"Kubespray for the Kubernetes steps: {exc}"]


def _step(step: steps.Step, params: ClusterParams, wanted) -> dict:
    """One step and its gate; on failure every release of the step goes back to its revision from before it."""
    logger = get_run_logger()
    kubeconfig = desired_state(params).config.kubeconfig_path()
    started = time.monotonic()
    before = _by_name(helm.release_records(kubeconfig))
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):  # the upgrade run's heartbeat suffices
        if step.name == steps.CRDS_STEP:
            for crd in steps.crd_manifests(step, wanted):
                kube.apply(kubeconfig, crd)
            error = None
        else:
            phase = RUNBOOKS[step.name](InstallParams(config=params.config))
            error = None if phase.is_completed() else str(phase.result(raise_on_failure=False))
        gate = None if error else _gate(params)
    after = _by_name(helm.release_records(kubeconfig))
    moved = ", ".join(
        f"{n} {before[n].revision} -> {after[n].revision}"
        for n in step.releases
        if n in before and n in after and before[n].revision != after[n].revision
    )
    if error is None and gate.startswith("green"):
        return _row(step.name, started, step.detail, gate, moved)
    logger.error("step %s failed: %s", step.name, error or gate)
    undone = []
    timeout = desired_state(params).config.timeouts.model_dump(by_alias=True).get(step.name, 600)
    for back in steps.rollbacks(step.releases, before, after):
        try:
            if back.to_revision is not None:
                namespace = before[back.release].namespace
                helm.rollback_release(kubeconfig, back.release, namespace, back.to_revision, timeout)
            undone.append(f"{back.release}: {back.detail}")
        except helm.HelmError as exc:
            undone.append(f"{back.release}: {back.detail} FAILED, fix by hand: {exc}")
    if step.name == steps.CRDS_STEP:
        undone.append("CRDs are not put back: objects may already be stored at their new versions")
    why = error or f"gate {gate}"
    detail = f"{why}; way back: {'; '.join(undone)}; validation after it: {_gate(params)}"
    return _row(step.name, started, detail, gate, moved, result="rolled back")


def _gate(params: ClusterParams) -> str:
    """The validation gate: "green (N checks)" or the validation's failures. DCGM series are read by the contract
    of the exporter running now: until the GPU Operator step the cluster serves the old exporter's names and
    labels, while the config already names the target's."""
    state = desired_state(params)
    kubeconfig = state.config.kubeconfig_path()
    operator = next((r for r in state.releases if r.name == desired.GPU_OPERATOR_RELEASE), None)
    live = operator and helm.release_records(kubeconfig).get((operator.namespace, operator.name))
    running = metric_contract.of_live_release(live.chart_version if live else None, live.values if live else {},
                                              state.metrics)  # fmt: skip
    with (
        handing_down(params, replace(state, metrics=running)),
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        outcome = validate(ValidateParams(config=params.config), return_state=True)
    read_as = f"; DCGM read as dcgm-exporter {running.tag}, the one running" if running != state.metrics else ""
    if outcome.is_completed():
        return f"green ({len(outcome.result()['checks'])} checks{read_as})"
    return f"red{read_as}: {outcome.result(raise_on_failure=False)}"


def _by_name(records: dict) -> dict:
    return {name: record for (_, name), record in records.items()}


def _row(step: str, started: float, detail: str, gate: str | None, revisions: str = "", result: str = "done") -> dict:
    return {
        "step": step,
        "result": result,
        "seconds": round(time.monotonic() - started, 1),
        "revisions": revisions,
        "gate": gate or "",
        "detail": detail[:3000],
    }


def _finish(config, lines: list[str], rows: list[dict], outcome: str, code: int) -> dict:
    publish_table("upgrade-steps", rows, f"upgrade of {config.cluster_name}: a row per step")
    publish_markdown(
        "upgrade-recap",
        steps.recap_markdown(config.cluster_name, lines, rows, outcome),
        f"upgrade of {config.cluster_name}",
    )
    report = {"cluster": config.cluster_name, "outcome": outcome, "exit_code": code, "steps": rows, "plan": lines}
    if code:
        raise UpgradeFailed(report)
    return report
