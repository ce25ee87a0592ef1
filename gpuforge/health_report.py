"""gpu-health's report as data and text: rows per node, Slurm nodes out of service, the one-line and
markdown summaries. Pure: no Prefect, no clients."""

from __future__ import annotations

from typing import Any

from gpuforge import remediation
from gpuforge.config import Config
from gpuforge.health import FleetHealth, GpuVerdict, Verdict
from gpuforge.remediation import SlurmNode

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNKNOWN = 0, 1, 2


def unknown_verdicts(expected: dict[str, int | None], why: str) -> list[GpuVerdict]:
    return [
        GpuVerdict(node=node, gpu=i, verdict=Verdict.UNKNOWN, reasons=[why])
        for node, count in expected.items()
        for i in range(count or 1)
    ]


def exit_code(fleet: FleetHealth) -> int:
    counts = fleet.counts()
    if counts[Verdict.UNHEALTHY] or counts[Verdict.DEGRADED]:
        return EXIT_UNHEALTHY
    if counts[Verdict.UNKNOWN] or not any(counts.values()):
        return EXIT_UNKNOWN
    return EXIT_HEALTHY


def node_rows(
    config: Config,
    nodes: dict[str, Any],
    fleet: FleetHealth,
    slurm_nodes: dict[str, SlurmNode] | None,
    slurm_names: dict[str, str],
) -> list[dict[str, Any]]:
    """One row per GPU node: worst GPU verdict, the Kubernetes side (cordon and why), the Slurm side."""
    rows = []
    for gpu in config.gpu_nodes:
        state = nodes.get(gpu.name)
        sname = slurm_names.get(gpu.name)
        snode = (slurm_nodes or {}).get(sname) if sname else None
        verdict, gpus = fleet.node(gpu.name)
        row = {
            "node": gpu.name,
            "verdict": verdict.value,
            "gpus": gpus,
            "kubernetes": "unregistered" if state is None else ("cordoned" if state.unschedulable else "schedulable"),
            "cordon_reason": (state.annotations.get(remediation.CORDON_ANNOTATION, "") if state else ""),
            "slurm_node": sname or "",
            "slurm_state": snode.state if snode else "",
            "slurm_reason": snode.reason if snode else "",
            "consistent": True,
        }
        if snode is not None and state is not None:
            ours_k8s = bool(row["cordon_reason"])
            if (ours_k8s and state.unschedulable and not snode.out_of_service) or (
                snode.by_gpuforge and snode.drained and not state.unschedulable
            ):
                row["consistent"] = False
        rows.append(row)
    return rows


def slurm_out_rows(slurm_nodes: dict[str, SlurmNode] | None, slurm_names: dict[str, str]) -> list[dict[str, str]]:
    """Every Slurm node drained or down, by anyone, with its reason."""
    k8s = {s: k for k, s in slurm_names.items()}
    return [
        {"slurm_node": s.name, "node": k8s.get(s.name, ""), "state": s.state, "reason": s.reason, "user": s.user}
        for s in (slurm_nodes or {}).values()
        if s.out_of_service
    ]


def one_line(report: dict) -> str:
    c = report["counts"]
    return (
        f"{sum(c.values())} GPUs: {c['healthy']} healthy, {c['degraded']} degraded, {c['unhealthy']} unhealthy, "
        f"{c['unknown']} unknown; {sum(a['status'] == 'done' for a in report['actions'])} actions; "
        f"exit {report['exit_code']}"
    )


def failure_message(report: dict) -> str:
    lines = [f"{report['cluster']}: {one_line(report)}"]
    lines += report["errors"]
    bad = [g for g in report["gpus"] if g["verdict"] != Verdict.HEALTHY.value]
    order = {Verdict.UNHEALTHY.value: 0, Verdict.UNKNOWN.value: 1, Verdict.DEGRADED.value: 2}
    for g in sorted(bad, key=lambda g: (order.get(g["verdict"], 3), g["node"], g["gpu"]))[:5]:
        lines.append(f"{g['node']} GPU {g['gpu']} {g['verdict']}: {'; '.join(g['reasons']) or '-'}")
    return "\n".join(lines)


def summary_markdown(report: dict) -> str:
    c = report["counts"]
    lines = [
        f"# GPU health of `{report['cluster']}`",
        "",
        f"**exit {report['exit_code']}** -- {sum(c.values())} GPUs, {report['queries']} PromQL queries, "
        f"{report['seconds']} s",
        "",
        "| verdict | GPUs |",
        "|---|---|",
        *(f"| {k} | {n} |" for k, n in c.items()),
        "",
    ]
    if report["errors"]:
        lines += ["## Errors", "", *(f"- {e}" for e in report["errors"]), ""]
    bad = [g for g in report["gpus"] if g["verdict"] != Verdict.HEALTHY.value]
    if bad:
        lines += ["## GPUs not healthy", "", "| node | gpu | verdict | reasons |", "|---|---|---|---|"]
        lines += [f"| {g['node']} | {g['gpu']} | {g['verdict']} | {'; '.join(g['reasons'])} |" for g in bad]
        lines.append("")
    lines += [
        "## Nodes",
        "",
        "| node | verdict | kubernetes | cordon reason | slurm node | slurm state | slurm reason | consistent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['node']} | {r['verdict']} | {r['kubernetes']} | {r['cordon_reason'] or '-'} | {r['slurm_node'] or '-'} "
        f"| {r['slurm_state'] or '-'} | {r['slurm_reason'] or '-'} | {'yes' if r['consistent'] else 'NO'} |"
        for r in report["nodes"]
    ]
    lines += ["", f"## Actions (remediate: {report['remediate']}, at most {report['max_out']} GPU nodes out)", ""]
    if report["actions"]:
        lines += ["| node | action | status | detail |", "|---|---|---|---|"]
        lines += [f"| {a['node']} | {a['kind']} | {a['status']} | {a['detail']} |" for a in report["actions"]]
    else:
        lines.append("none")
    if report["slurm_out_of_service"]:
        lines += ["", "## Slurm nodes out of service (by anyone)", "", "| slurm node | node | state | reason | user |"]
        lines.append("|---|---|---|---|---|")
        lines += [
            f"| {r['slurm_node']} | {r['node'] or '-'} | {r['state']} | {r['reason'] or '-'} | {r['user'] or '-'} |"
            for r in report["slurm_out_of_service"]
        ]
    return "\n".join(lines) + "\n"


def release_markdown(report: dict) -> str:
    v = report["validation"]
    lines = [
        f"# Release of `{report['node']}` ({report['cluster']})",
        "",
        f"**{'returned to service' if report['released'] else 'kept out of service'}** (exit {report['exit_code']})",
        "",
        f"- re-validation: {'passed' if v['ok'] else 'failed'} -- {v['how']}: {v['detail']}",
        *(f"- {r}" for r in report["reasons"]),
        "",
        "| action | status | detail |",
        "|---|---|---|",
        *(f"| {a['kind']} | {a['status']} | {a['detail']} |" for a in report["actions"]),
    ]
    return "\n".join(lines) + "\n"


class HealthCheckFailed(RuntimeError):
    """The run found unhealthy/degraded/unknown GPUs (or kept a node out); `report` is the full report."""

    def __init__(self, report: dict[str, Any], message: str):
        self.report = report
        super().__init__(message)
