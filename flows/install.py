"""install: the runbook. Each phase is a subflow, run in order; a converged phase skips itself.

preflight -> kubespray -> monitoring -> gpu-operator -> slurm -> dashboard -> validate
(monitoring comes before the GPU Operator so the ServiceMonitor CRD exists when dcgm-exporter needs it)
"""

from __future__ import annotations

import time
from typing import Literal

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Failed

from flows.common import ClusterParams, cluster_lock, load, publish_table, run_name
from flows.dashboard import dashboard
from flows.gpu_operator import gpu_operator
from flows.kubespray import KubesprayParams, kubespray
from flows.monitoring import monitoring
from flows.notify import notify_failure
from flows.preflight import preflight
from flows.slurm import slurm
from flows.validate import ValidateParams, validate
from tasks.kube import nodes_converged

Phase = Literal["preflight", "kubespray", "monitoring", "gpu-operator", "slurm", "dashboard", "validate"]
PHASES: list[str] = ["preflight", "kubespray", "monitoring", "gpu-operator", "slurm", "dashboard", "validate"]
SERVICE = {
    "monitoring": "monitoring_stack",
    "gpu-operator": "gpu-operator",
    "slurm": "slurm",
    "dashboard": "k8s-dashboard",
}


class InstallParams(ClusterParams):
    only: list[Phase] = []
    from_phase: Phase | None = None
    force_phases: list[Phase] = []


def _run_phase(phase: str, params: InstallParams):
    base = {"config": params.config}
    calls = {
        "preflight": lambda: preflight(ClusterParams(**base), return_state=True),
        "kubespray": lambda: kubespray(
            KubesprayParams(**base, force="kubespray" in params.force_phases), return_state=True
        ),
        "monitoring": lambda: monitoring(ClusterParams(**base), return_state=True),
        "gpu-operator": lambda: gpu_operator(ClusterParams(**base), return_state=True),
        "slurm": lambda: slurm(ClusterParams(**base), return_state=True),
        "dashboard": lambda: dashboard(ClusterParams(**base), return_state=True),
        "validate": lambda: validate(ValidateParams(**base), return_state=True),
    }
    return calls[phase]()


def selected_phases(params: InstallParams) -> list[str]:
    if params.only:
        return [p for p in PHASES if p in params.only]
    start = PHASES.index(params.from_phase) if params.from_phase else 0
    return PHASES[start:]


@flow(name="install", flow_run_name=run_name("install"), on_failure=[notify_failure], on_crashed=[notify_failure])
def install(params: InstallParams) -> list[dict]:
    logger = get_run_logger()
    config = load(params, connects=True)
    rows: list[dict] = []
    # Preflight guards what Kubespray does to the nodes; when Kubespray has nothing to do, neither has it.
    nodes_done = "kubespray" not in params.force_phases and nodes_converged(
        config.kubeconfig_path(), [n.name for n in config.nodes], config.kubespray.kube_version
    )
    with cluster_lock(config.cluster_name, "install"):
        for phase in selected_phases(params):
            skip = None
            if phase in SERVICE and not config.enabled(SERVICE[phase]):
                skip = f"{SERVICE[phase]} is disabled in the config"
            elif phase == "preflight" and nodes_done and not params.only:
                skip = "skipped: every node is Ready at the pinned version; Kubespray will not run"
            if skip:
                rows.append({"phase": phase, "result": "skipped", "seconds": 0, "detail": skip})
                continue
            started = time.monotonic()
            # A phase runs in install's own process, whose heartbeat already shows it alive. Prefect joins a
            # flow run's heartbeat thread when the run ends, and that thread sleeps in 1 s steps: ~0.8 s a phase.
            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                state = _run_phase(phase, params)
            detail = _one_line(state.result(raise_on_failure=False))
            failed = state.is_failed() or state.is_crashed()
            result = "failed" if failed else ("skipped" if str(detail).startswith("skipped") else "ran")
            rows.append(
                {
                    "phase": phase,
                    "result": result,
                    "seconds": round(time.monotonic() - started, 1),
                    "detail": str(detail)[:500],
                }
            )
            logger.info("phase %s %s: %s", phase, result, rows[-1]["detail"])
            if failed:
                break
    publish_table("install-summary", rows, f"install of {config.cluster_name}: a row per phase")
    if any(r["result"] == "failed" for r in rows):
        failed_row = next(r for r in rows if r["result"] == "failed")
        return Failed(message=f"phase {failed_row['phase']} failed: {failed_row['detail']}", data=rows)
    return rows


def _one_line(result) -> str:
    """A phase's result as one summary line (validate returns its whole report)."""
    if isinstance(result, dict) and "checks" in result:
        counts: dict[str, int] = {}
        for check in result["checks"]:
            counts[check["result"]] = counts.get(check["result"], 0) + 1
        return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) + " checks"
    return str(result)
