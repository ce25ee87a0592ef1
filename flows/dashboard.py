"""Phase 6, dashboard: the Kubernetes dashboard."""

from __future__ import annotations

from prefect import flow

from flows.common import ClusterParams, desired_state, publish_table, run_name
from tasks.helm import converge_service, outcome_rows, phase_summary


@flow(name="dashboard", flow_run_name=run_name("dashboard"))
def dashboard(params: ClusterParams) -> str:
    state = desired_state(params)
    config = state.config
    outcomes = converge_service(state, "k8s-dashboard", config.kubeconfig_path(), config.timeouts.dashboard)
    publish_table("dashboard-status", outcome_rows(outcomes), "Kubernetes dashboard release")
    return phase_summary(outcomes)
