"""validate: prove the platform works for its users, on every GPU node and every GPU.

cluster -> CUDA smoke on every GPU node (+ an oversized pod must stay Pending) -> DCGM metric coverage
-> Slurm (controller, GPU nodes, a 1-GPU batch job, an over-ask rejected). Disabled services are skipped.
"""

from __future__ import annotations

import time
import uuid

from prefect import flow, get_run_logger

from flows.common import ClusterParams, load, publish_markdown, publish_table, run_name
from flows.notify import notify_failure
from gpuforge import checks, validation
from gpuforge.validation import ERROR, FAIL, PASS, SKIP, CheckResult
from tasks import kube, prometheus
from tasks import slurm as slurm_tasks


class ValidateParams(ClusterParams):
    keep: bool = False


@flow(name="validate", flow_run_name=run_name("validate"), on_failure=[notify_failure])
def validate(params: ValidateParams) -> dict:
    logger = get_run_logger()
    config = load(params)
    kubeconfig = config.kubeconfig_path()
    try:
        nodes = kube.list_nodes(kubeconfig)
    except Exception as exc:  # noqa: BLE001 - no API: nothing below can be checked
        results = [CheckResult("cluster", "api-server", ERROR, f"Kubernetes API unreachable: {exc}")]
        return _finish(config, results)
    expected = {n.name: checks.expected_gpus(config, nodes.get(n.name), n.name) or 1 for n in config.gpu_nodes}

    results = cluster_checks(config, kubeconfig, nodes)
    if config.enabled("gpu-operator"):
        # GPUs a Slurm NodeSet (or anything else) holds cannot take a smoke pod; say who holds them.
        held = kube.gpus_held(kubeconfig)
        free = [n for n in expected if nodes[n].allocatable_gpus - sum(held.get(n, {}).values()) >= 1] if nodes else []
        for node in expected:
            if node not in free and node in nodes:
                results.append(
                    CheckResult(
                        "cuda-smoke",
                        node,
                        SKIP,
                        f"no free GPU: held by {', '.join(held.get(node, {})) or 'nobody (0 allocatable)'}",
                    )
                )
        if free:
            results += cuda_smoke(config, kubeconfig, free, params.keep)
    else:
        results.append(CheckResult("cuda-smoke", "cluster", SKIP, "gpu-operator is disabled in the config"))
    if config.enabled("monitoring_stack"):
        results += dcgm_metrics(config, expected)
    else:
        results.append(CheckResult("dcgm-metrics", "cluster", SKIP, "monitoring_stack is disabled in the config"))
    if config.enabled("slurm"):
        results += slurm_checks(config, kubeconfig, {n.name: expected[n.name] for n in config.slurm_gpu_nodes})
    else:
        results.append(CheckResult("slurm", "cluster", SKIP, "slurm is disabled in the config"))
    logger.info("validation: %d checks, %d failed", len(results), sum(r.result != PASS for r in results))
    return _finish(config, results)


def _finish(config, results: list[CheckResult]) -> dict:
    publish_table("validation-report", [r.row() for r in results], f"Validation of {config.cluster_name}")
    out = validation.report(results)
    out["exit_code"] = validation.exit_code(results)
    counts = {k: sum(r.result == k for r in results) for k in (PASS, FAIL, SKIP, ERROR)}
    publish_markdown(
        "validation-summary",
        f"# Validation of `{config.cluster_name}`\n\n"
        + ", ".join(f"{v} {k}" for k, v in counts.items())
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


def cluster_checks(config, kubeconfig, nodes) -> list[CheckResult]:
    results = []
    for node in config.nodes:
        state = nodes.get(node.name)
        ok = bool(state and state.ready)
        results.append(
            CheckResult(
                "node-ready",
                node.name,
                PASS if ok else FAIL,
                "Ready" if ok else ("not registered" if state is None else "not Ready"),
            )
        )
    if config.enabled("gpu-operator"):
        policy = kube.get_custom(kubeconfig, "nvidia.com", "v1", "clusterpolicies", "cluster-policy")
        rows, missing = checks.gpu_node_rows(config, nodes, policy)
        state = ((policy or {}).get("status") or {}).get("state")
        results.append(
            CheckResult(
                "cluster-policy", "cluster-policy", PASS if state == "ready" else FAIL, f"state {state or 'missing'}"
            )
        )
        for row in rows:
            results.append(
                CheckResult(
                    "gpu-allocatable",
                    row["node"],
                    PASS if row["result"] == "ok" else FAIL,
                    f"{row['allocatable']} allocatable, expected {row['expected']}"
                    if row["result"] == "ok"
                    else row["result"],
                )
            )
        bad = [
            f"{p.metadata.name} {p.status.phase}"
            for p in kube.list_pods(kubeconfig, "gpu-operator")
            if p.status.phase not in ("Running", "Succeeded")
        ]
        results.append(
            CheckResult(
                "gpu-operator-pods", "gpu-operator", FAIL if bad else PASS, ", ".join(bad) or "all Running/Succeeded"
            )
        )
    return results


def cuda_smoke(config, kubeconfig, gpu_nodes: list[str], keep: bool) -> list[CheckResult]:
    namespace = f"gpuforge-validate-{uuid.uuid4().hex[:6]}"
    kube.ensure_namespace(kubeconfig, namespace, {"app.kubernetes.io/managed-by": "gpuforge"})
    pods = [kube.smoke_pod(f"cuda-smoke-{node}", node, config.validation.cuda_image) for node in gpu_nodes]
    final = kube.run_pods_to_completion(kubeconfig, namespace, pods, config.timeouts.validate_)
    logs = kube.pod_logs(kubeconfig, namespace, [f"cuda-smoke-{node}" for node in gpu_nodes])
    results, passed = [], []
    for node in gpu_nodes:
        name = f"cuda-smoke-{node}"
        pod = final[name]
        log = logs[name]
        events = [] if pod.status.phase == "Succeeded" else kube.pod_events(kubeconfig, namespace, name)
        result = validation.smoke_result(node, pod.status.phase, log, events)
        results.append(result)
        if result.result == PASS:
            passed.append(name)
    # More GPUs than any node has, so the scheduler must refuse it everywhere.
    too_many = max(checks.expected_gpus(config, None, n.name) or 1 for n in config.gpu_nodes) + 1
    refused, why = kube.wait_unschedulable(
        kubeconfig, namespace, kube.smoke_pod("cuda-oversized", "", config.validation.cuda_image, too_many), 60
    )
    results.append(
        CheckResult(
            "gpu-scheduling",
            f"{too_many} GPUs",
            PASS if refused else FAIL,
            f"stays Pending: {why}" if refused else f"should be unschedulable but {why}",
        )
    )
    if not keep:
        kube.delete_pods(kubeconfig, namespace, passed)
        if len(passed) == len(gpu_nodes):
            kube.delete_namespace(kubeconfig, namespace)
    return results


def dcgm_metrics(config, expected: dict[str, int]) -> list[CheckResult]:
    try:
        pc = prometheus.prometheus(config)
        interval = prometheus.scrape_interval_s(pc)
        answer = prometheus.query(pc, validation.dcgm_coverage_query())
    except prometheus.PrometheusUnreachable as exc:
        return [CheckResult("dcgm-metrics", "prometheus", ERROR, str(exc))]
    return validation.dcgm_coverage(answer, expected, time.time(), max_age_s=2 * interval)


def slurm_checks(config, kubeconfig, expected: dict[str, int]) -> list[CheckResult]:
    ns = config.validation.slurm_namespace

    def run(*argv: str, timeout: float = 20):
        return slurm_tasks.slurm_exec(kubeconfig, ns, list(argv), timeout_s=timeout)

    ping = run("scontrol", "ping")
    if not (ping.ok and "UP" in ping.stdout):
        return [
            CheckResult("slurm-controller", "slurmctld", FAIL, (ping.stdout + ping.stderr).strip() or f"rc {ping.rc}")
        ]
    results = [CheckResult("slurm-controller", "slurmctld", PASS, ping.stdout.strip())]
    sinfo = run("sinfo", "-h", "-N", "-o", "%N %T %G")
    results += validation.slurm_node_results(validation.sinfo_nodes(sinfo.stdout), expected)
    job = run("sbatch", "--parsable", "--gres=gpu:1", "--output=/dev/null", "--wrap", 'test -n "$CUDA_VISIBLE_DEVICES"')
    results.append(_job_result(run, job))
    over = run("sbatch", "--parsable", f"--gres=gpu:{max(expected.values()) + 1}", "--wrap", "true")
    results.append(
        CheckResult(
            "slurm-gpu-limit",
            f"gpu:{max(expected.values()) + 1}",
            FAIL if over.ok else PASS,
            f"accepted as job {over.stdout.strip()}" if over.ok else over.stderr.strip(),
        )
    )
    return results


def _job_result(run, job) -> CheckResult:
    if not job.ok:
        return CheckResult("slurm-gpu-job", "gpu:1", FAIL, f"sbatch refused: {job.stderr.strip()}")
    job_id = job.stdout.strip().split(";")[0]
    ended = slurm_tasks.wait_job(run, job_id, 60)
    if ended is None:
        return CheckResult("slurm-gpu-job", f"job {job_id}", FAIL, "did not finish within 60s")
    state, code = ended
    ok = state == "COMPLETED" and code == "0:0"
    return CheckResult(
        "slurm-gpu-job",
        f"job {job_id}",
        PASS if ok else FAIL,
        f"{state}, exit {code}" + ("" if ok else " (CUDA_VISIBLE_DEVICES unset or job failed)"),
    )
