"""gpu-health --release NODE: return one node to service (the explicit end of a remediation).

1. The health rules on fresh metrics for that node's GPUs (cheap, before any job runs).
2. A re-validation on the node itself: a CUDA smoke pod pinned to it (tolerating the cordon) or, for a node in
   a Slurm NodeSet (whose GPUs the slurmd pod holds), a 1-GPU Slurm job pinned to it (`sbatch -w NODE
   --gres=gpu:1`) inside a maintenance reservation, so no user job lands there meanwhile.
3. Only then the Slurm node is resumed and the Kubernetes node uncordoned (flows.common.act_on_both_sides). A
   failed re-validation keeps (or puts back) both sides out and says why.
"""

from __future__ import annotations

import datetime as dt
import time

from prefect import get_run_logger

from flows.common import PreconditionFailed, act_on_both_sides, change_node, publish_markdown, publish_table
from gpuforge import desired, health, remediation
from gpuforge.config import Config
from gpuforge.health import Verdict
from gpuforge.health_report import (
    EXIT_HEALTHY,
    EXIT_UNHEALTHY,
    EXIT_UNKNOWN,
    HealthCheckFailed,
    release_markdown,
    unknown_verdicts,
)
from gpuforge.remediation import Action
from tasks import kube, prometheus
from tasks import slurm as slurm_tasks


def release_node(config: Config, node: str) -> dict:
    logger = get_run_logger()
    if node not in {n.name for n in config.gpu_nodes}:
        raise PreconditionFailed(f"{node} is not a GPU node of cluster {config.cluster_name}")
    kubeconfig = config.kubeconfig_path()
    started = time.monotonic()
    nodes = kube.list_nodes(kubeconfig)
    if node not in nodes:
        raise PreconditionFailed(f"node {node} is not registered in Kubernetes")
    state = desired.build(config, desired.learned_gpu_counts(config, nodes))
    wanted = state.node(node)
    in_slurm = wanted.in_slurm
    slurm_nodes, slurm_names, slurm_error = (
        slurm_tasks.slurm_state(config, kubeconfig) if in_slurm else (None, {}, None)
    )
    if in_slurm and slurm_error:
        raise PreconditionFailed(f"{slurm_error}: cannot resume {node}'s Slurm node, so it stays out")
    sname = slurm_names.get(node)
    snode = (slurm_nodes or {}).get(sname) if sname else None

    # 1. The health rules on fresh metrics (cheap: before any job runs).
    table = state.thresholds
    expected = {node: wanted.expected_gpus}
    prom_error = None
    try:
        fleet, _ = prometheus.evaluate_fleet(
            prometheus.prometheus(config), expected, table, contract=state.metrics, closely=[node]
        )
        verdicts = fleet.verdicts  # `closely`: the node's GPUs each judged, never only counted
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

    # 3. Decide, then act: the Slurm side first (already resumed by the job path), then the cordon. A step that
    #    fails puts back the ones done, so that both sides stay out together.
    slurm = slurm_tasks.Slurm(config, kubeconfig)
    if in_slurm and snode is not None:
        snode = slurm.nodes().get(sname, snode)
    decision = remediation.release_decision(node, ok, detail, verdicts, nodes[node], snode, sname, in_slurm)
    when = remediation.stamp(dt.datetime.now(dt.UTC), config.timezone)
    if decision.ok:
        put_back = ["returning the node to service failed half-way: put back out"]
        steps = remediation.steps_per_node(
            decision.actions,
            cordon_note=nodes[node].annotations.get(remediation.CORDON_ANNOTATION)
            or remediation.annotation_text(put_back, when),
            drain_reason=remediation.slurm_reason(put_back, when),
        )
        if not act_on_both_sides(steps.get(node, []), change_node(kubeconfig, slurm), logger.info):
            decision.ok = False
            failed = [a.detail for a in decision.actions if a.status == "failed"]
            decision.reasons.append("returning the node failed: " + "; ".join(failed))
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
