"""Phase 4, gpu-operator: the GPU Operator chart, then wait until every GPU node offers its GPUs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger

from flows.common import ClusterParams, desired_state, publish_table, run_name
from gpuforge import checks, desired, render
from gpuforge.desired import GPU_OPERATOR_RELEASE, DesiredState
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
    wait_for_gpus(state, kubeconfig, [n.name for n in state.gpu_nodes], logger.info)
    if config.enabled("monitoring_stack"):
        monitors = list_custom(kubeconfig, "monitoring.coreos.com", "v1", "servicemonitors", namespace)
        prometheuses = list_custom(kubeconfig, "monitoring.coreos.com", "v1", "prometheuses")
        if problems := checks.servicemonitor_problems(prometheuses, monitors):
            raise WaitTimeout("dcgm-exporter metrics would not be scraped: " + "; ".join(problems))
    return phase_summary(outcomes, f"{len(state.gpu_nodes)} GPU nodes offer their GPUs")


def wait_for_gpus(state: DesiredState, kubeconfig: Path, names: list[str], log: Callable[[str], None]) -> None:
    """Wait until the ClusterPolicy is ready and GPU nodes `names` carry the GPU labels and offer the GPUs they
    must (the table `gpu-operator-status` shows each), then record the count found on those the config leaves
    open, so health can tell a lost GPU later (a count recorded before stays)."""
    config = state.config

    def probe() -> tuple[bool, str]:
        nodes = list_nodes(kubeconfig)
        expected = desired.expected_gpu_counts(config, desired.learned_gpu_counts(config, nodes))
        policy = get_custom(kubeconfig, *checks.CLUSTER_POLICY_API, checks.CLUSTER_POLICY)
        rows, missing = checks.gpu_node_rows({n: expected[n] for n in names}, nodes, policy)
        probe.rows = rows
        return not missing, "; ".join(missing) or "ClusterPolicy ready, the GPU nodes offer their GPUs"

    try:
        wait_for("the GPU stack", probe, config.timeouts.gpu_operator, log=log)
    finally:
        publish_table("gpu-operator-status", getattr(probe, "rows", []), "GPU nodes: labels and allocatable GPUs")
    nodes = list_nodes(kubeconfig)
    recorded = desired.learned_gpu_counts(config, nodes)
    for gpu in state.gpu_nodes:
        if gpu.name in names and gpu.expected_gpus is None and gpu.name not in recorded:
            annotate_node(kubeconfig, gpu.name, {desired.INSTALLED_GPU_COUNT: str(nodes[gpu.name].allocatable_gpus)})
