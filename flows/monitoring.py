"""Phase 3, monitoring: kube-prometheus-stack, gpuforge's GPU dashboard and GPU alert rules.

Runs before the GPU Operator so the ServiceMonitor CRD exists when dcgm-exporter's ServiceMonitor arrives.
"""

from __future__ import annotations

import json

from prefect import flow

from flows.common import ClusterParams, desired_state, publish_table, run_name
from gpuforge import render
from gpuforge.desired import MONITORING_RELEASE
from gpuforge.plan import alert_rules
from tasks.helm import converge_service, outcome_rows, phase_summary
from tasks.kube import apply, config_map


@flow(name="monitoring", flow_run_name=run_name("monitoring"))
def monitoring(params: ClusterParams) -> str:
    state = desired_state(params)
    config = state.config
    kubeconfig = config.kubeconfig_path()
    outcomes = converge_service(state, "monitoring_stack", kubeconfig, config.timeouts.monitoring)
    dashboard = config_map(
        render.DASHBOARD_CONFIGMAP,
        state.namespace(MONITORING_RELEASE),
        {"gpuforge-gpus.json": json.dumps(render.render_dashboard())},
        labels={
            render.DASHBOARD_SIDECAR_LABEL[0]: render.DASHBOARD_SIDECAR_LABEL[1],
            "app.kubernetes.io/managed-by": "gpuforge",
        },
    )
    apply(kubeconfig, dashboard)
    apply(kubeconfig, alert_rules(state))
    publish_table("monitoring-status", outcome_rows(outcomes), "kube-prometheus-stack release")
    return phase_summary(outcomes, "dashboard and GPU alerts applied")
