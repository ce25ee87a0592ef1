"""gpu-health (nightly): judge every GPU from DCGM metrics in Prometheus, list nodes out of service on the
Kubernetes and the Slurm side, and (opt-in) take nodes with unhealthy GPUs out on both sides.

    nodes (1 list) -> fleet PromQL summary (fleet_queries, whatever the GPU count) -> per-GPU PromQL about the
    nodes it cannot call healthy (closer_look, up to 3 more) -> verdicts, healthy GPUs counted per node
    -> Slurm (1 sinfo, 1 slurmd pod list) -> remediation.decide -> scontrol drain, then cordon -> artifacts

`release=NODE` instead returns one node to service: see flows/gpu_release.py.

Exit codes in the report: 0 every GPU healthy (release: node returned); 1 an unhealthy or degraded GPU
(release: node kept out); 2 could not judge (Prometheus unreachable: every GPU unknown; or only unknown
GPUs). The run fails (and notifies) whenever the exit code is not 0.
"""

from __future__ import annotations

import datetime as dt
import time

from prefect import flow, get_run_logger

from flows.common import (
    ClusterParams,
    act_on_both_sides,
    change_node,
    desired_state,
    publish_markdown,
    publish_table,
    run_name,
)
from flows.gpu_release import release_node
from flows.notify import notify_failure
from gpuforge import desired, health, remediation
from gpuforge.config import Config
from gpuforge.health_report import (
    EXIT_HEALTHY,
    EXIT_UNKNOWN,
    HealthCheckFailed,
    exit_code,
    failure_message,
    node_rows,
    one_line,
    slurm_out_rows,
    summary_markdown,
    unknown_verdicts,
)
from gpuforge.remediation import Action
from tasks import kube, prometheus
from tasks import slurm as slurm_tasks


class HealthParams(ClusterParams):
    # Return this node to service (re-validate, then uncordon and resume) instead of the fleet check.
    release: str | None = None


@flow(
    name="gpu-health",
    flow_run_name=run_name("gpu-health"),
    on_failure=[notify_failure],
    on_crashed=[notify_failure],
)
def gpu_health(params: HealthParams) -> dict:
    config = desired_state(params).config
    if params.release:
        return release_node(config, params.release)
    return _check(config)


def _gpu_state(config: Config) -> tuple[dict[str, kube.NodeState], str | None]:
    try:
        return kube.list_nodes(config.kubeconfig_path()), None
    except Exception as exc:  # noqa: BLE001 - health still judges GPUs without the API; nothing is changed
        return {}, f"Kubernetes API unreachable: {str(exc).splitlines()[0][:300]}"


def _check(config: Config) -> dict:
    logger = get_run_logger()
    kubeconfig = config.kubeconfig_path()
    started = time.monotonic()
    nodes, kube_error = _gpu_state(config)
    state = desired.build(config, desired.learned_gpu_counts(config, nodes))
    expected = state.expected_gpus()
    table = state.thresholds
    queries = health.fleet_queries(table, state.metrics)
    prom_error = None
    try:
        fleet, sent = prometheus.evaluate_fleet(
            prometheus.prometheus(config), expected, table, queries, contract=state.metrics
        )
    except prometheus.PrometheusUnreachable as exc:
        prom_error, sent = str(exc), 0
        fleet = health.FleetHealth(unknown_verdicts(expected, f"could not judge: {exc}"))
    slurm_nodes, slurm_names, slurm_error = slurm_tasks.slurm_state(config, kubeconfig)

    actions: list[Action] = []
    decision = None
    if prom_error is None and kube_error is None:
        decision = remediation.decide(config, fleet.verdicts, nodes, slurm_nodes, slurm_names, dt.datetime.now(dt.UTC))
        actions = decision.actions
        apply = change_node(kubeconfig, slurm_tasks.Slurm(config, kubeconfig))
        for steps in remediation.steps_per_node(actions).values():
            act_on_both_sides(steps, apply, logger.info)
        if any(a.status in ("done", "undone") for a in actions):  # report the state the actions left
            nodes, _ = _gpu_state(config)
            slurm_nodes, slurm_names, slurm_error = slurm_tasks.slurm_state(config, kubeconfig)
    elif config.remediate != "off":
        why = "Prometheus unreachable" if prom_error else "Kubernetes API unreachable"
        actions = [Action("-", "none", f"{why}: no remediation this run", status="skipped")]

    code = EXIT_UNKNOWN if prom_error else exit_code(fleet)
    report = {
        "cluster": config.cluster_name,
        "mode": "check",
        "exit_code": code,
        "counts": {k.value: n for k, n in fleet.counts().items()},
        "gpus": [v.model_dump(mode="json") for v in fleet.verdicts],  # judged one by one; the rest:
        "healthy_gpus_by_node": {node: h.gpus for node, h in fleet.healthy.items()},
        "nodes": node_rows(config, nodes, fleet, slurm_nodes, slurm_names),
        "slurm_out_of_service": slurm_out_rows(slurm_nodes, slurm_names),
        "actions": [a.as_dict() for a in actions],
        "remediate": str(config.remediate),
        "max_out": decision.budget if decision else None,
        "queries": sent,
        "errors": [e for e in (prom_error, kube_error, slurm_error) if e],
        "seconds": round(time.monotonic() - started, 2),
    }
    publish_table("gpu-health", fleet.table_rows(), f"GPU health of {config.cluster_name}")
    publish_markdown("gpu-health-summary", summary_markdown(report), f"GPU health summary of {config.cluster_name}")
    logger.info("gpu-health: %s", one_line(report))
    if code != EXIT_HEALTHY:
        raise HealthCheckFailed(report, failure_message(report))
    return report
