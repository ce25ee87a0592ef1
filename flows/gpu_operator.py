"""Phase 4, gpu-operator: the GPU Operator chart, then wait until every GPU node offers its GPUs."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.common import ClusterParams, desired_state, publish_table, run_name
from gpuforge import checks, desired, render
from gpuforge.desired import GPU_OPERATOR_RELEASE
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


@flow(name="gpu-operator", flow_run_name=run_name("gpu-operator"))
def gpu_operator(params: ClusterParams) -> str:
    logger = get_run_logger()
    state = desired_state(params)
    config = state.config
    kubeconfig = config.kubeconfig_path()
    namespace = state.namespace(GPU_OPERATOR_RELEASE)
    ensure_namespace(kubeconfig, namespace)
    # dcgm-exporter's default CSV lacks ECC, remap and throttle counters the health rules read.
    counters = render.render_dcgm_counters(state.metrics)
    apply(kubeconfig, config_map(render.DCGM_CONFIGMAP, namespace, {"dcgm-metrics.csv": counters}))
    outcomes = converge_service(state, "gpu-operator", kubeconfig, config.timeouts.gpu_operator)

    def probe() -> tuple[bool, str]:
        nodes = list_nodes(kubeconfig)
        expected = desired.expected_gpu_counts(config, desired.learned_gpu_counts(config, nodes))
        policy = get_custom(kubeconfig, *checks.CLUSTER_POLICY_API, checks.CLUSTER_POLICY)
        rows, missing = checks.gpu_node_rows(expected, nodes, policy)
        probe.rows = rows
        return not missing, "; ".join(missing) or "ClusterPolicy ready, every GPU node offers its GPUs"

    try:
        wait_for("the GPU stack", probe, config.timeouts.gpu_operator, log=logger.info)
    finally:
        publish_table("gpu-operator-status", getattr(probe, "rows", []), "GPU nodes: labels and allocatable GPUs")

    # Nodes the config leaves open get the count found now recorded, so health can tell a lost GPU later.
    nodes = list_nodes(kubeconfig)
    recorded = desired.learned_gpu_counts(config, nodes)
    for gpu in state.gpu_nodes:
        if gpu.expected_gpus is None and gpu.name not in recorded:
            annotate_node(kubeconfig, gpu.name, {desired.INSTALLED_GPU_COUNT: str(nodes[gpu.name].allocatable_gpus)})
    if config.enabled("monitoring_stack"):
        monitors = list_custom(kubeconfig, "monitoring.coreos.com", "v1", "servicemonitors", namespace)
        prometheuses = list_custom(kubeconfig, "monitoring.coreos.com", "v1", "prometheuses")
        if problems := checks.servicemonitor_problems(prometheuses, monitors):
            raise WaitTimeout("dcgm-exporter metrics would not be scraped: " + "; ".join(problems))
    return phase_summary(outcomes, f"{len(state.gpu_nodes)} GPU nodes offer their GPUs")
