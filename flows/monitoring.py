"""Phase 3, monitoring: kube-prometheus-stack, gpuforge's GPU dashboard and GPU alert rules.

Runs before the GPU Operator so the ServiceMonitor CRD exists when dcgm-exporter's ServiceMonitor arrives.
"""

from __future__ import annotations

import json

from prefect import flow

from flows.common import ClusterParams, load, publish_table, run_name
from gpuforge import render
from tasks.helm import converge_service, outcome_rows, phase_summary
from tasks.kube import apply, config_map


@flow(name="monitoring", flow_run_name=run_name("monitoring"))
def monitoring(params: ClusterParams) -> str:
    config = load(params)
    kubeconfig = config.kubeconfig_path()
    outcomes = converge_service(config, "monitoring_stack", kubeconfig, config.timeouts.monitoring)
    dashboard = config_map(
        render.DASHBOARD_CONFIGMAP,
        "monitoring",
        {"gpuforge-gpus.json": json.dumps(render.render_dashboard())},
        labels={
            render.DASHBOARD_SIDECAR_LABEL[0]: render.DASHBOARD_SIDECAR_LABEL[1],
            "app.kubernetes.io/managed-by": "gpuforge",
        },
    )
    apply(kubeconfig, dashboard)
    apply(kubeconfig, render.render_alert_rules(config))
    publish_table("monitoring-status", outcome_rows(outcomes), "kube-prometheus-stack release")
    return phase_summary(outcomes, "dashboard and GPU alerts applied")
