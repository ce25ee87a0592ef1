"""gpu-health (nightly): judge every GPU from DCGM metrics in Prometheus, list nodes out of service on the
Kubernetes and the Slurm side, and (opt-in) take nodes with unhealthy GPUs out on both sides.

    nodes (1 list) -> fleet PromQL (len(health_queries()) queries, whatever the GPU count) -> verdicts
    -> Slurm (1 sinfo, 1 slurmd pod list) -> remediation.decide -> cordon + scontrol drain -> artifacts

`release=NODE` instead returns one node to service: health rules on fresh metrics, then a re-validation on the
node -- a CUDA smoke pod pinned to it (it tolerates the cordon) or, for a node in a Slurm NodeSet, whose GPUs
the slurmd pod holds, a 1-GPU Slurm job pinned to it (`sbatch -w NODE --gres=gpu:1`) inside a maintenance
reservation so no user job lands there meanwhile -- and only then the Slurm node is resumed and the
Kubernetes node uncordoned. A failed re-validation keeps (or puts back) both sides out and says why.

Exit codes in the report: 0 every GPU healthy (release: node returned); 1 an unhealthy or degraded GPU
(release: node kept out); 2 could not judge (Prometheus unreachable: every GPU unknown; or only unknown
GPUs). The run fails (and notifies) whenever the exit code is not 0.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.common import ClusterParams, PreconditionFailed, load, publish_markdown, publish_table, run_name
from flows.notify import notify_failure
from gpuforge import checks, health, remediation
from gpuforge.config import Config
from gpuforge.drift import expected_gpu_counts
from gpuforge.health import Thresholds, Verdict
from gpuforge.health_report import (
    EXIT_HEALTHY,
    EXIT_UNHEALTHY,
    EXIT_UNKNOWN,
    exit_code,
    failure_message,
    node_rows,
    one_line,
    release_markdown,
    slurm_out_rows,
    summary_markdown,
    unknown_verdicts,
)
from gpuforge.remediation import Action, SlurmNode
from tasks import kube, prometheus
from tasks import slurm as slurm_tasks


class HealthParams(ClusterParams):
    # Return this node to service (re-validate, then uncordon and resume) instead of the fleet check.
    release: str | None = None


class HealthCheckFailed(RuntimeError):
    """The run found unhealthy/degraded/unknown GPUs (or kept a node out); `report` is the full report."""

    def __init__(self, report: dict[str, Any], message: str):
        self.report = report
        super().__init__(message)


# ------------------------------------------------------------------------------------------ evaluation


def thresholds_table(config: Config) -> dict[str, Thresholds]:
    """The config's partial threshold sections laid over the built-in families (only the fields it sets)."""
    raw = {name: t.model_dump(exclude_unset=True) for name, t in config.health.thresholds.items()}
    return health.merge_threshold_config(raw)


# ------------------------------------------------------------------------------------------- the flow


@flow(
    name="gpu-health",
    flow_run_name=run_name("gpu-health"),
    on_failure=[notify_failure],
    on_crashed=[notify_failure],
)
def gpu_health(params: HealthParams) -> dict:
    config = load(params)
    if params.release:
        return _release(config, params.release)
    return _check(config)


def _gpu_state(config: Config) -> tuple[dict[str, kube.NodeState], str | None]:
    try:
        return kube.list_nodes(config.kubeconfig_path()), None
    except Exception as exc:  # noqa: BLE001 - health still judges GPUs without the API; nothing is changed
        return {}, f"Kubernetes API unreachable: {str(exc).splitlines()[0][:300]}"


def _expected(config: Config, nodes: dict[str, kube.NodeState]) -> dict[str, int | None]:
    """checks.expected_gpus of every GPU node, in one pass over the config."""
    return expected_gpu_counts(config, nodes)


def _slurm_state(config: Config, kubeconfig: Path) -> tuple[dict[str, SlurmNode] | None, dict[str, str], str | None]:
    if not config.enabled("slurm"):
        return None, {}, None
    try:
        nodes = slurm_tasks.Slurm(config, kubeconfig).nodes()
        pods = kube.slurm_pods(kubeconfig, config.validation.slurm_namespace)
    except Exception as exc:  # noqa: BLE001 - reported; no Slurm action (and no cordon of Slurm nodes) follows
        return None, {}, f"Slurm could not be read: {str(exc).splitlines()[0][:300]}"
    names = remediation.slurm_name_map([n.name for n in config.gpu_nodes], nodes, pods)
    return nodes, names, None


def _check(config: Config) -> dict:
    logger = get_run_logger()
    kubeconfig = config.kubeconfig_path()
    started = time.monotonic()
    nodes, kube_error = _gpu_state(config)
    expected = _expected(config, nodes)
    table = thresholds_table(config)
    queries = health.fleet_queries(table)
    prom_error = None
    try:
        verdicts, sent = prometheus.evaluate_fleet(prometheus.prometheus(config), expected, table, queries)
    except prometheus.PrometheusUnreachable as exc:
        prom_error, sent = str(exc), 0
        verdicts = unknown_verdicts(expected, f"could not judge: {exc}")
    slurm_nodes, slurm_names, slurm_error = _slurm_state(config, kubeconfig)

    actions: list[Action] = []
    decision = None
    if prom_error is None and kube_error is None:
        decision = remediation.decide(config, verdicts, nodes, slurm_nodes, slurm_names, dt.datetime.now(dt.UTC))
        actions = decision.actions
        _carry_out(config, kubeconfig, actions, logger.info)
        if any(a.status in ("done", "undone") for a in actions):  # report the state the actions left
            nodes, _ = _gpu_state(config)
            slurm_nodes, slurm_names, slurm_error = _slurm_state(config, kubeconfig)
    elif config.remediate != "off":
        why = "Prometheus unreachable" if prom_error else "Kubernetes API unreachable"
        actions = [Action("-", "none", f"{why}: no remediation this run", status="skipped")]

    code = EXIT_UNKNOWN if prom_error else exit_code(verdicts)
    report = {
        "cluster": config.cluster_name,
        "mode": "check",
        "exit_code": code,
        "counts": {k.value: n for k, n in health.summarize(verdicts).items()},
        "gpus": [v.model_dump(mode="json") for v in verdicts],
        "nodes": node_rows(config, nodes, verdicts, slurm_nodes, slurm_names),
        "slurm_out_of_service": slurm_out_rows(slurm_nodes, slurm_names),
        "actions": [a.as_dict() for a in actions],
        "remediate": str(config.remediate),
        "max_out": decision.budget if decision else None,
        "queries": sent,
        "errors": [e for e in (prom_error, kube_error, slurm_error) if e],
        "seconds": round(time.monotonic() - started, 2),
    }
    publish_table("gpu-health", health.table_rows(verdicts), f"GPU health of {config.cluster_name}")
    publish_markdown("gpu-health-summary", summary_markdown(report), f"GPU health summary of {config.cluster_name}")
    logger.info("gpu-health: %s", one_line(report))
    if code != EXIT_HEALTHY:
        raise HealthCheckFailed(report, failure_message(report))
    return report


def _carry_out(config: Config, kubeconfig: Path, actions: list[Action], log: Callable[[str], None]) -> None:
    """Planned actions, per node: drain Slurm first, then cordon; a failed cordon resumes the Slurm node again
    (and a failed drain means no cordon), so both sides always end in the same state."""
    slurm = slurm_tasks.Slurm(config, kubeconfig)
    by_node: dict[str, list[Action]] = {}
    for a in actions:
        if a.status == "planned":
            by_node.setdefault(a.node, []).append(a)
    for node, todo in by_node.items():
        drain = next((a for a in todo if a.kind == remediation.DRAIN_SLURM), None)
        cordon = next((a for a in todo if a.kind == remediation.CORDON), None)
        if drain:
            try:
                slurm.update(drain.slurm_node, "drain", drain.slurm_reason)
                drain.status = "done"
                log(f"drained Slurm node {drain.slurm_node}: {drain.slurm_reason}")
            except Exception as exc:  # noqa: BLE001 - recorded in the report
                drain.status, drain.detail = "failed", f"{drain.detail}; {exc}"
                if cordon:
                    cordon.status, cordon.detail = "skipped", f"not cordoned: the Slurm drain failed ({exc})"
                continue
        if cordon:
            try:
                kube.set_cordon(kubeconfig, node, True, cordon.annotation)
                cordon.status = "done"
                log(f"cordoned {node}: {cordon.annotation}")
            except Exception as exc:  # noqa: BLE001
                cordon.status, cordon.detail = "failed", f"{cordon.detail}; {exc}"
                if drain and drain.status == "done":
                    try:
                        slurm.update(drain.slurm_node, "resume")
                        drain.status, drain.detail = "undone", f"{drain.detail}; resumed again: the cordon failed"
                    except Exception as exc2:  # noqa: BLE001
                        drain.detail += f"; cordon failed and resuming failed too ({exc2}): fix by hand"


# ------------------------------------------------------------------------------------------- release


def _release(config: Config, node: str) -> dict:
    logger = get_run_logger()
    if node not in {n.name for n in config.gpu_nodes}:
        raise PreconditionFailed(f"{node} is not a GPU node of cluster {config.cluster_name}")
    kubeconfig = config.kubeconfig_path()
    started = time.monotonic()
    nodes = kube.list_nodes(kubeconfig)
    if node not in nodes:
        raise PreconditionFailed(f"node {node} is not registered in Kubernetes")
    in_slurm = config.enabled("slurm") and node in {n.name for n in config.slurm_gpu_nodes}
    slurm_nodes, slurm_names, slurm_error = _slurm_state(config, kubeconfig) if in_slurm else (None, {}, None)
    if in_slurm and slurm_error:
        raise PreconditionFailed(f"{slurm_error}: cannot resume {node}'s Slurm node, so it stays out")
    sname = slurm_names.get(node)
    snode = (slurm_nodes or {}).get(sname) if sname else None

    # 1. The health rules on fresh metrics (cheap: before any job runs).
    table = thresholds_table(config)
    expected = {node: checks.expected_gpus(config, nodes[node], node)}
    prom_error = None
    try:
        verdicts, _ = prometheus.evaluate_fleet(prometheus.prometheus(config), expected, table)
    except prometheus.PrometheusUnreachable as exc:
        prom_error = str(exc)
        verdicts = unknown_verdicts(expected, f"could not judge: {exc}")
    verdicts = [v for v in verdicts if v.node == node]
    healthy = bool(verdicts) and all(v.verdict == Verdict.HEALTHY for v in verdicts)

    # 2. Re-validation on the node itself.
    actions: list[Action] = []
    if not healthy:
        ok, detail, how = False, "not run: the health rules failed first", "-"
    elif in_slurm:
        how = (
            f"Slurm job on {sname} (sbatch -w {sname} --gres=gpu:1): the node's GPUs are held by its slurmd pod, "
            "so a CUDA smoke pod could not get one"
        )
        ok, detail = slurm_tasks.revalidate_with_job(config, kubeconfig, sname, snode, actions, logger.info)
    else:
        how = f"CUDA smoke pod pinned to {node} (tolerating the cordon)"
        ok, detail = kube.revalidate_with_smoke_pod(config, kubeconfig, node)

    # 3. Decide, then act: Slurm side first (already resumed by the job path), then the cordon.
    if in_slurm and snode is not None:
        snode = slurm_tasks.Slurm(config, kubeconfig).nodes().get(sname, snode)
    decision = remediation.release_decision(node, ok, detail, verdicts, nodes[node], snode, sname, in_slurm)
    slurm = slurm_tasks.Slurm(config, kubeconfig)
    when = remediation.stamp(dt.datetime.now(dt.UTC), config.timezone)
    if decision.ok:
        done: list[Action] = []
        for a in decision.actions:
            if any(x.status == "failed" for x in decision.actions):
                a.status, a.detail = "skipped", f"{a.detail}; not done: an earlier step failed"
                continue
            try:
                if a.kind == remediation.RESUME_SLURM:
                    slurm.update(a.slurm_node, "resume")
                elif a.kind == remediation.UNCORDON:
                    kube.set_cordon(kubeconfig, node, False, None)
                a.status = "done"
                done.append(a)
            except Exception as exc:  # noqa: BLE001
                a.status, a.detail = "failed", f"{a.detail}; {exc}"
        failed = [a.detail for a in decision.actions if a.status == "failed"]
        if failed:
            decision.ok = False
            decision.reasons.append("returning the node failed: " + "; ".join(failed))
            for a in done:  # undo, so that both sides stay out together
                if a.kind == remediation.UNCORDON:
                    note = nodes[node].annotations.get(remediation.CORDON_ANNOTATION) or remediation.annotation_text(
                        decision.reasons, when
                    )
                    kube.set_cordon(kubeconfig, node, True, note)
                    a.status = "undone"
                elif a.kind == remediation.RESUME_SLURM:
                    slurm.update(a.slurm_node, "drain", remediation.slurm_reason(decision.reasons, when))
                    a.status = "undone"
        actions += decision.actions
    if not decision.ok and in_slurm and sname and snode is not None:
        # The job path may have resumed a drained node for the job: put it back, with the reason. A node that
        # was in service in Slurm before stays as it was (gpuforge does not take out what it did not).
        was_out = any(a.kind == remediation.RESUME_SLURM and a.status == "done" for a in actions)
        current = slurm.nodes().get(sname)
        if was_out and current is not None and not current.drained:
            reason = remediation.slurm_reason([f"release refused: {r}" for r in decision.reasons], when)
            slurm.update(sname, "drain", reason)
            actions.append(Action(node, remediation.DRAIN_SLURM, "release refused: drained again", sname,
                                  slurm_reason=reason, status="done"))  # fmt: skip

    if decision.ok:
        code = EXIT_HEALTHY
    elif prom_error:
        code = EXIT_UNKNOWN
    else:
        code = EXIT_UNHEALTHY
    report = {
        "cluster": config.cluster_name,
        "mode": "release",
        "node": node,
        "released": decision.ok,
        "exit_code": code,
        "reasons": decision.reasons,
        "validation": {"ok": ok, "how": how, "detail": detail},
        "gpus": [v.model_dump(mode="json") for v in verdicts],
        "actions": [a.as_dict() for a in actions],
        "seconds": round(time.monotonic() - started, 2),
    }
    publish_table("gpu-health", health.table_rows(verdicts), f"GPU health of {node} (release)")
    publish_markdown("gpu-health-summary", release_markdown(report), f"release of {node}")
    logger.info("gpu-health --release %s: %s", node, "returned to service" if decision.ok else "kept out")
    if not decision.ok:
        raise HealthCheckFailed(report, f"{node} kept out of service:\n" + "\n".join(decision.reasons[:5]))
    return report
