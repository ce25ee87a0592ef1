"""validate: prove the platform works for its users, on every GPU node and every GPU.

cluster (nodes Ready, ClusterPolicy, allocatable GPUs), then side by side, each touching its own system:
CUDA smoke on every GPU node (+ an oversized pod must stay Pending), DCGM metric coverage, and Slurm
(controller, GPU nodes, a 1-GPU batch job, an over-ask rejected). Disabled services are skipped.
"""

from __future__ import annotations

from dataclasses import replace

from prefect import flow, get_run_logger

from flows.common import ClusterParams, desired_state, publish_markdown, publish_table, run_name
from flows.notify import notify_failure
from gpuforge import desired, validation
from gpuforge.validation import ERROR, FAIL, SKIP, CheckResult
from tasks import kube, prometheus, slurm


class ValidateParams(ClusterParams):
    keep: bool = False


@flow(name="validate", flow_run_name=run_name("validate"), on_failure=[notify_failure])
def validate(params: ValidateParams) -> dict:
    logger = get_run_logger()
    given = desired_state(params)
    config = given.config
    kubeconfig = config.kubeconfig_path()
    try:
        nodes = kube.list_nodes(kubeconfig)
    except Exception as exc:  # noqa: BLE001 - no API: nothing below can be checked
        results = [CheckResult("cluster", "api-server", ERROR, f"Kubernetes API unreachable: {exc}")]
        return _finish(config, results)
    # With the GPU counts learned at install; the metric contract as given (an upgrade's gate hands down the one of
    # the exporter running now).
    state = replace(desired.build(config, desired.learned_gpu_counts(config, nodes)), metrics=given.metrics)
    expected = {n.name: n.expected_gpus or 1 for n in state.gpu_nodes}
    slurm_expected = {n.name: expected[n.name] for n in state.slurm_nodes}

    results = kube.cluster_checks(state, kubeconfig, nodes)
    # The three groups touch different systems and mostly wait: they run side by side (Prefect task runs).
    running = []
    if config.enabled("gpu-operator"):
        running.append(kube.cuda_smoke.submit(config, kubeconfig, nodes, expected, params.keep))
    else:
        results.append(_disabled("cuda-smoke", "gpu-operator"))
    if config.enabled("monitoring_stack"):
        running.append(prometheus.dcgm_coverage.submit(config, expected, state.metrics))
    else:
        results.append(_disabled("dcgm-metrics", "monitoring_stack"))
    if config.enabled("slurm"):
        running.append(slurm.validate_slurm.submit(config, kubeconfig, slurm_expected))
    else:
        results.append(_disabled("slurm", "slurm"))
    for future in running:
        results += future.result()
    logger.info("validation: %s", validation.summary(results))
    return _finish(config, results)


def _disabled(check: str, service: str) -> CheckResult:
    return CheckResult(check, "cluster", SKIP, f"{service} is disabled in the config")


def _finish(config, results: list[CheckResult]) -> dict:
    publish_table("validation-report", [r.row() for r in results], f"Validation of {config.cluster_name}")
    out = validation.report(results)
    out["exit_code"] = validation.exit_code(results)
    publish_markdown(
        "validation-summary",
        f"# Validation of `{config.cluster_name}`\n\n"
        + ", ".join(f"{v} {k}" for k, v in validation.counts(results).items())
        + "\n\n"
        + "\n".join(f"- **{r.check}** {r.target}: {r.detail}" for r in results if r.result in (FAIL, ERROR)),
        "validation",
    )
    if out["exit_code"]:
        raise ValidationFailed(out)
    return out


class ValidationFailed(RuntimeError):
    def __init__(self, report: dict):
        self.report = report
        first = "; ".join(f"{f['check']} {f['target']}: {f['detail']}" for f in report["failures"][:3])
        super().__init__(f"{len(report['failures'])} validation check(s) failed: {first}")
