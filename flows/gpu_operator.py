"""Phase 4, gpu-operator: the GPU Operator chart, then wait until every GPU node offers its GPUs."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.common import ClusterParams, load, publish_table, run_name
from gpuforge import checks, render
from tasks.helm import converge_service, phase_summary
from tasks.kube import (
    WaitTimeout,
    annotate_node,
    apply,
    config_map,
    ensure_namespace,
    get_custom,
    list_custom,
    list_nodes,
    wait_for,
)

NAMESPACE = "gpu-operator"


@flow(name="gpu-operator", flow_run_name=run_name("gpu-operator"))
def gpu_operator(params: ClusterParams) -> str:
    logger = get_run_logger()
    config = load(params)
    kubeconfig = config.kubeconfig_path()
    ensure_namespace(kubeconfig, NAMESPACE)
    # dcgm-exporter's default CSV lacks ECC, remap and throttle counters the health rules read.
    apply(kubeconfig, config_map(render.DCGM_CONFIGMAP, NAMESPACE, {"dcgm-metrics.csv": render.render_dcgm_counters()}))
    outcomes = converge_service(config, "gpu-operator", kubeconfig, config.timeouts.gpu_operator)

    def probe() -> tuple[bool, str]:
        policy = get_custom(kubeconfig, "nvidia.com", "v1", "clusterpolicies", "cluster-policy")
        rows, missing = checks.gpu_node_rows(config, list_nodes(kubeconfig), policy)
        probe.rows = rows
        return not missing, "; ".join(missing) or "ClusterPolicy ready, every GPU node offers its GPUs"

    try:
        wait_for("the GPU stack", probe, config.timeouts.gpu_operator, log=logger.info)
    finally:
        publish_table("gpu-operator-status", getattr(probe, "rows", []), "GPU nodes: labels and allocatable GPUs")

    # Nodes the config leaves open get the count found now recorded, so health can tell a lost GPU later.
    nodes = list_nodes(kubeconfig)
    for gpu in config.gpu_nodes:
        if gpu.spec.gpu_count is None and checks.INSTALLED_GPU_COUNT not in nodes[gpu.name].annotations:
            annotate_node(kubeconfig, gpu.name, {checks.INSTALLED_GPU_COUNT: str(nodes[gpu.name].allocatable_gpus)})
    if config.enabled("monitoring_stack"):
        monitors = list_custom(kubeconfig, "monitoring.coreos.com", "v1", "servicemonitors", NAMESPACE)
        prometheuses = list_custom(kubeconfig, "monitoring.coreos.com", "v1", "prometheuses")
        if problems := checks.servicemonitor_problems(prometheuses, monitors):
            raise WaitTimeout("dcgm-exporter metrics would not be scraped: " + "; ".join(problems))
    return phase_summary(outcomes, f"{len(config.gpu_nodes)} GPU nodes offer their GPUs")
