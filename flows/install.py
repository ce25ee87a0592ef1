"""install: the runbook. Each phase of the catalogue (gpuforge.phases.INSTALL_PHASES) is a subflow, run in
catalogue order; a converged phase skips itself, a phase whose service is disabled in the config is skipped."""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Failed

from flows.common import ClusterParams, cluster_lock, desired_state, handing_down, publish_table, run_name
from flows.dashboard import dashboard
from flows.gpu_operator import gpu_operator
from flows.kubespray import KubesprayParams, kubespray
from flows.monitoring import monitoring
from flows.node import NodeAddParams, add_for_install
from flows.notify import notify_failure
from flows.preflight import preflight
from flows.slurm import slurm
from flows.validate import ValidateParams, validate
from gpuforge import node_lifecycle
from gpuforge.desired import DesiredState
from gpuforge.phases import PhaseName, selected_phases
from tasks.kube import list_nodes, nodes_converged


class InstallParams(ClusterParams):
    only: list[PhaseName] = []
    from_phase: PhaseName | None = None
    force_phases: list[PhaseName] = []


def _cluster(params: InstallParams) -> ClusterParams:
    return ClusterParams(config=params.config)


# The flow that runs each phase of the catalogue, given the install's parameters; it returns the phase's state.
RUNBOOKS: dict[str, Callable[[InstallParams], State]] = {
    "preflight": lambda p: preflight(_cluster(p), return_state=True),
    "kubespray": lambda p: kubespray(
        KubesprayParams(config=p.config, force="kubespray" in p.force_phases), return_state=True
    ),
    "monitoring": lambda p: monitoring(_cluster(p), return_state=True),
    "gpu-operator": lambda p: gpu_operator(_cluster(p), return_state=True),
    "slurm": lambda p: slurm(_cluster(p), return_state=True),
    "dashboard": lambda p: dashboard(_cluster(p), return_state=True),
    "validate": lambda p: validate(ValidateParams(config=p.config), return_state=True),
}


@flow(name="install", flow_run_name=run_name("install"), on_failure=[notify_failure], on_crashed=[notify_failure])
def install(params: InstallParams) -> list[dict]:
    logger = get_run_logger()
    state = desired_state(params, connects=True)
    config = state.config
    rows: list[dict] = []

    # Preflight guards what Kubespray does to the nodes; when Kubespray has nothing to do, neither has it.
    def converged() -> bool:
        return "kubespray" not in params.force_phases and nodes_converged(
            config.kubeconfig_path(), [n.name for n in state.nodes], config.kubespray.kube_version
        )

    nodes_done = converged()
    phases = selected_phases(params.only, params.from_phase)
    with cluster_lock(config.cluster_name, "install"), handing_down(params, state):
        if joining := ([] if nodes_done else _joining(state, params)):
            # Worker nodes new to a running cluster join as `node add` has them: scale.yml on them only,
            # validated before they take work. Then every phase converges as usual, over all the nodes.
            rows.append(_add_row(params, joining))
            logger.info("node-add %s: %s", rows[-1]["result"], rows[-1]["detail"])
            if rows[-1]["result"] == "failed":
                phases = []
            else:
                nodes_done = converged()
        for phase in phases:
            skip = None
            if phase.service and not config.enabled(phase.service):
                skip = f"{phase.service} is disabled in the config"
            elif phase.name == "preflight" and nodes_done and not params.only:
                skip = "skipped: every node is Ready at the pinned version; Kubespray will not run"
            if skip:
                rows.append({"phase": phase.name, "result": "skipped", "seconds": 0, "detail": skip})
                continue
            started = time.monotonic()
            # A phase runs in install's own process, whose heartbeat already shows it alive. Prefect joins a
            # flow run's heartbeat thread when the run ends, and that thread sleeps in 1 s steps: ~0.8 s a phase.
            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                phase_state = RUNBOOKS[phase.name](params)
            detail = _one_line(phase_state.result(raise_on_failure=False))
            failed = phase_state.is_failed() or phase_state.is_crashed()
            result = "failed" if failed else ("skipped" if str(detail).startswith("skipped") else "ran")
            rows.append(
                {
                    "phase": phase.name,
                    "result": result,
                    "seconds": round(time.monotonic() - started, 1),
                    "detail": str(detail)[:500],
                }
            )
            logger.info("phase %s %s: %s", phase.name, result, rows[-1]["detail"])
            if failed:
                break
    publish_table("install-summary", rows, f"install of {config.cluster_name}: a row per phase")
    if any(r["result"] == "failed" for r in rows):
        failed_row = next(r for r in rows if r["result"] == "failed")
        return Failed(message=f"phase {failed_row['phase']} failed: {failed_row['detail']}", data=rows)
    return rows


def _joining(state: DesiredState, params: InstallParams) -> list[str]:
    """Worker nodes of the config the running cluster lacks, added first by a plain install (one that names no
    phase: `--only`, `--from` and `--force-phase kubespray` run what they name)."""
    kubeconfig = state.config.kubeconfig_path()
    if params.only or params.from_phase or params.force_phases or not kubeconfig.exists():
        return []
    return [n.name for n in node_lifecycle.joining_nodes(state, set(list_nodes(kubeconfig)))]


def _add_row(params: InstallParams, names: list[str]) -> dict:
    started = time.monotonic()
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        add_state = add_for_install(NodeAddParams(config=params.config, nodes=names), return_state=True)
    failed = add_state.is_failed() or add_state.is_crashed()
    return {
        "phase": "node-add",
        "result": "failed" if failed else "ran",
        "seconds": round(time.monotonic() - started, 1),
        "detail": _one_line(add_state.result(raise_on_failure=False))[:500],
    }


def _one_line(result) -> str:
    """A phase's result as one summary line (validate returns its whole report, node-add a row per node)."""
    if isinstance(result, list):
        return "; ".join(f"{r['node']} {r['result']}: {r['detail']}" for r in result)
    if isinstance(result, dict) and "checks" in result:
        counts: dict[str, int] = {}
        for check in result["checks"]:
            counts[check["result"]] = counts.get(check["result"], 0) + 1
        return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) + " checks"
    return str(result)
