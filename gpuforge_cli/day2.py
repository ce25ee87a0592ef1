"""Day-2 commands: `gpuforge health` and `gpuforge drift` (registered on gpuforge_cli.app.app).

Same conventions as gpuforge_cli.app: the config is loaded first (a bad config: one line per problem, exit 2 for
these checks), the flow runs in this process, `--json` prints the report on stdout.

    health  exit 0 every GPU healthy, 1 unhealthy/degraded found (or --release kept the node out),
            2 could not judge (Prometheus unreachable, only unknown GPUs, or the run could not start)
    drift   exit 0 no drift, 2 drift found, 1 error (helm-diff / Terraform convention)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gpuforge.config import ConfigError, load_config
from gpuforge_cli.common import config_option, fail, json_option, report_of, run_flow


def _check_config(config_path: Path, code: int) -> None:
    try:
        load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), code)


@click.command("health")
@config_option
@click.option(
    "--release",
    "release",
    metavar="NODE",
    help="Return NODE to service: re-validate it (CUDA smoke pod, or a Slurm job for Slurm nodes) and its "
    "GPUs on fresh metrics, then uncordon it and resume its Slurm node.",
)
@json_option
def health(config_path: Path, release: str | None, as_json: bool) -> None:
    """Judge every GPU from DCGM metrics (and remediate if the config says so).

    Exit 0 all healthy, 1 unhealthy or degraded GPUs (or the node was kept out), 2 could not judge.
    """
    _check_config(config_path, 2)
    from flows.gpu_health import HealthCheckFailed, HealthParams, gpu_health

    state = run_flow(gpu_health, HealthParams(config=str(config_path), release=release))
    report = report_of(state, HealthCheckFailed, "gpu-health", 2)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif report["mode"] == "release":
        _print_release(report)
    else:
        _print_check(report)
    sys.exit(report["exit_code"])


def _print_check(report: dict) -> None:
    from gpuforge.health import GpuVerdict, format_table

    verdicts = [GpuVerdict.model_validate(g) for g in report["gpus"]]
    if verdicts:
        click.echo(format_table(verdicts))
    healthy = report["healthy_gpus_by_node"]
    if healthy:
        click.echo(f"{sum(healthy.values())} GPUs on {len(healthy)} nodes healthy (counted per node, not listed)")
    c = report["counts"]
    click.echo(
        f"\n{sum(c.values())} GPUs: {c['healthy']} healthy, {c['degraded']} degraded, {c['unhealthy']} unhealthy, "
        f"{c['unknown']} unknown ({report['queries']} PromQL queries, {report['seconds']} s)"
    )
    for row in report["nodes"]:
        if row["kubernetes"] != "schedulable" or row["slurm_reason"] or not row["consistent"]:
            slurm = f", Slurm {row['slurm_node']} {row['slurm_state']}" if row["slurm_node"] else ""
            why = row["cordon_reason"] or row["slurm_reason"]
            flag = "" if row["consistent"] else " [Kubernetes and Slurm disagree]"
            click.echo(f"node {row['node']}: {row['kubernetes']}{slurm}{': ' + why if why else ''}{flag}")
    for row in report["slurm_out_of_service"]:
        if not row["node"]:
            click.echo(f"Slurm node {row['slurm_node']}: {row['state']}: {row['reason'] or '-'}")
    for a in report["actions"]:
        click.echo(f"action {a['kind']} {a['node']}: {a['status']} -- {a['detail']}")
    for e in report["errors"]:
        click.echo(f"error: {e}", err=True)


def _print_release(report: dict) -> None:
    v = report["validation"]
    verdict = "returned to service" if report["released"] else "kept out of service"
    click.echo(f"{report['node']}: {verdict}")
    click.echo(f"re-validation {'passed' if v['ok'] else 'failed'} ({v['how']}): {v['detail']}")
    for r in report["reasons"]:
        click.echo(f"  - {r}")
    for a in report["actions"]:
        click.echo(f"action {a['kind']}: {a['status']} -- {a['detail']}")


@click.command("drift")
@config_option
@json_option
def drift(config_path: Path, as_json: bool) -> None:
    """Compare the cluster with the config, read-only. Exit 0 no drift, 2 drift found, 1 error."""
    _check_config(config_path, 1)
    from flows.common import ClusterParams
    from flows.drift import DriftFound
    from flows.drift import drift as drift_flow

    state = run_flow(drift_flow, ClusterParams(config=str(config_path)))
    report = report_of(state, DriftFound, "drift", 1)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        from gpuforge.drift import table_rows

        for row in table_rows(report["items"]):
            click.echo(f"{row['severity']:<9} {row['path']}  desired={row['desired']}  live={row['live']}")
        click.echo(report["summary"])
        for e in report["errors"]:
            click.echo(f"error: {e}", err=True)
    sys.exit(report["exit_code"])
