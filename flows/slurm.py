"""Phase 5, slurm: cert-manager, the Slinky operator and the Slurm cluster with a GPU NodeSet per GPU count."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.common import ClusterParams, desired_state, publish_table, run_name
from gpuforge import desired
from gpuforge.desired import SLURM_RELEASE
from gpuforge.pins import release_namespace
from tasks.helm import converge_service, outcome_rows, phase_summary
from tasks.kube import list_custom, list_nodes, wait_for
from tasks.slurm import NODESET_API, controller_answers


@flow(name="slurm", flow_run_name=run_name("slurm"))
def slurm(params: ClusterParams) -> str:
    logger = get_run_logger()
    config = desired_state(params).config
    kubeconfig, namespace = config.kubeconfig_path(), release_namespace(SLURM_RELEASE)
    # GPU counts the config leaves open: the ones the gpu-operator phase recorded on the nodes.
    state = desired.build(config, desired.learned_gpu_counts(config, list_nodes(kubeconfig)))
    outcomes = converge_service(state, "slurm", kubeconfig, config.timeouts.slurm)

    def nodesets_ready() -> tuple[bool, str]:
        sets = list_custom(kubeconfig, *NODESET_API, namespace)
        pending = [
            f"{s['metadata']['name']} {(s.get('status') or {}).get('readyReplicas', 0)}/{s['spec'].get('replicas', 0)}"
            for s in sets
            if (s.get("status") or {}).get("readyReplicas", 0) != s["spec"].get("replicas", 0)
        ]
        return bool(sets) and not pending, "; ".join(pending) or f"{len(sets)} NodeSets ready"

    wait_for(
        "the Slurm controller",
        lambda: controller_answers(kubeconfig, namespace),
        config.timeouts.slurm,
        log=logger.info,
    )
    detail = wait_for("the GPU NodeSets", nodesets_ready, config.timeouts.slurm, log=logger.info)
    publish_table("slurm-status", outcome_rows(outcomes), "Slurm releases")
    return phase_summary(outcomes, detail)
