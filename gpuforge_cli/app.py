"""The `gpuforge` command line (console script `gpuforge`, or `python -m gpuforge_cli`).

Each command loads the config first (a bad config prints one line per problem and exits 1 before
anything is touched), then hands over to a flow or to the lab. Usage errors print one line and exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gpuforge.config import ConfigError, load_config
from gpuforge.phases import PHASE_NAMES
from gpuforge_cli.common import (
    config_option,
    fail,
    json_option,
    load,
    prefect_defaults,
    report_of,
    run_flow,
    state_error,
)
from gpuforge_cli.day2 import drift, health
from gpuforge_cli.fleet import fleet
from gpuforge_cli.node import node
from gpuforge_cli.upgrade import upgrade


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Stand up and keep alive a GPU Kubernetes cluster (the DeepOps recipe) as Prefect flows."""


@app.command()
@config_option
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder to write the rendered files into.",
)
@json_option
def plan(config_path: Path, out: Path, as_json: bool) -> None:
    """Render inventory, group_vars, Helm values, dashboard and alert rules; change nothing else."""
    from gpuforge import desired, render
    from gpuforge.plan import render_summary, write_plan

    state = desired.build(load(config_path))
    written = write_plan(state, out)
    summary = render_summary(state)
    if as_json:
        click.echo(json.dumps({**summary, "files": [str(p) for p in written]}, indent=2, ensure_ascii=False))
    else:
        click.echo(render.summary_markdown(summary))
        click.echo(f"{len(written)} files written to {out}")


@app.group()
def lab() -> None:
    """The lab: a real control plane, kwok GPU nodes, SSH hosts, Prometheus and Slurm on this machine."""


def _lab(config_path: Path):
    from lab.lab import Lab, LabConfigError

    cfg = load(config_path)
    try:
        return Lab(cfg, progress=lambda msg: click.echo(msg, err=True))
    except LabConfigError as exc:
        fail(f"{config_path}: {exc}")


def _print_endpoints(endpoints: dict[str, str], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(endpoints, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("endpoint", "where", title="gpuforge lab")
    for key, value in endpoints.items():
        table.add_row(key, value)
    Console().print(table)


@lab.command("up")
@config_option
@json_option
def lab_up(config_path: Path, as_json: bool) -> None:
    """Start the lab for this config (idempotent) and print its endpoints."""
    import time

    started = time.monotonic()
    the_lab = _lab(config_path)
    try:
        endpoints = the_lab.up()
    except Exception as exc:  # noqa: BLE001 - any failing component: say which, in its own words
        fail(f"lab up failed: {exc}")
    click.echo(f"lab up in {time.monotonic() - started:.1f}s", err=True)
    _print_endpoints(endpoints, as_json)


@lab.command("down")
@config_option
@click.option(
    "--purge",
    is_flag=True,
    help="Also delete everything the lab kept (etcd, metrics, simulated faults, Slurm state, keys, logs), "
    "for a fresh next `lab up`.",
)
def lab_down(config_path: Path, purge: bool) -> None:
    """Stop every lab process and remove its namespaces and links."""
    _lab(config_path).down(purge=purge)
    click.echo("lab down", err=True)


@lab.command("status")
@config_option
@json_option
def lab_status(config_path: Path, as_json: bool) -> None:
    """What is up, and the endpoint table (with the absolute path of the admin kubeconfig)."""
    the_lab = _lab(config_path)
    status = the_lab.status()
    if as_json:
        click.echo(json.dumps({"status": status, "endpoints": the_lab.endpoints()}, indent=2, default=str))
        return
    cp = status["control_plane"]
    click.echo(f"control plane: {'up' if cp.get('up') else 'down'}")
    for key in ("ssh_hosts", "slurm", "dcgm_simulator", "prometheus", "reconciler"):
        click.echo(f"{key}: {status[key]}")
    _print_endpoints(the_lab.endpoints(), False)
    sys.exit(0 if cp.get("up") else 3)


@app.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A gpuforge config: its health.thresholds apply.",
)
@click.option(
    "--serve",
    "serve_addr",
    metavar="ADDR:PORT",
    help="Serve the readings as Prometheus series with dcgm-exporter names (e.g. 127.0.0.1:9400).",
)
@click.option("--slurm-healthcheck", is_flag=True, help="One line and a non-zero exit when a GPU is unhealthy.")
@click.option(
    "--expected-gpus",
    type=int,
    help="GPUs this node must have (a missing one is unhealthy); default: the --node's gpu_count in --config.",
)
@click.option("--node", help="Node name for the Hostname label (default: this host's name).")
@json_option
def probe(config_path, serve_addr, slurm_healthcheck, expected_gpus, node, as_json) -> None:
    """Read this node's GPUs through NVML and judge them with the gpu-health rules.

    Exit 0 healthy (or only degraded), 1 a GPU is unhealthy or cannot be judged, 2 no NVIDIA driver.
    """
    from gpuforge import health
    from gpuforge_probe import probe as gpu_probe

    # The config's sections as written (only the fields each sets): the probe resolves them as the fleet does.
    thresholds = None
    if config_path:
        from gpuforge import desired

        cfg = load(config_path)
        thresholds = cfg.health.thresholds
        # A node of the config gets the GPU count the config gives it, unless told otherwise.
        if expected_gpus is None and node:
            expected_gpus = desired.expected_gpu_counts(cfg).get(node)
    try:
        if serve_addr:
            host, port = gpu_probe.parse_addr(serve_addr)
            gpu_probe.serve(host, port, config_thresholds=thresholds, node=node)
            return
        if slurm_healthcheck:
            code, reason = gpu_probe.slurm_healthcheck(thresholds, node=node, expected_gpus=expected_gpus)
            click.echo(reason, err=code != 0)
            sys.exit(code)
        verdicts = gpu_probe.probe_table(thresholds, node=node, expected_gpus=expected_gpus)
    except gpu_probe.ProbeError as exc:
        fail(f"gpuforge probe: {exc}", 2)
    click.echo(health.verdicts_json(verdicts) if as_json else health.format_table(verdicts))
    bad = {health.Verdict.UNHEALTHY, health.Verdict.UNKNOWN}
    sys.exit(1 if any(v.verdict in bad for v in verdicts) else 0)


PHASE_CHOICE = click.Choice(PHASE_NAMES)


@app.command()
@config_option
@click.option("--only", multiple=True, type=PHASE_CHOICE, help="Run only this phase (repeatable).")
@click.option("--from", "from_phase", type=PHASE_CHOICE, help="Start at this phase.")
@click.option("--force-phase", multiple=True, type=PHASE_CHOICE, help="Re-run this phase even when converged.")
@json_option
def install(config_path: Path, only, from_phase, force_phase, as_json: bool) -> None:
    """Install the cluster: preflight, Kubespray, monitoring, GPU Operator, Slurm, dashboard, validate."""
    load(config_path, connects=True)
    from flows.install import InstallParams
    from flows.install import install as install_flow

    params = InstallParams(
        config=str(config_path), only=list(only), from_phase=from_phase, force_phases=list(force_phase)
    )
    state = run_flow(install_flow, params)
    rows = state.result(raise_on_failure=False)
    rows = rows if isinstance(rows, list) else getattr(state.data, "result", None) or []
    error = state_error(state)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": error is None,
                    "phases": rows if isinstance(rows, list) else [],
                    "error": str(error) if error else None,
                },
                indent=2,
            )
        )
    elif error:
        click.echo(f"install failed: {error}", err=True)
    else:
        for row in rows:
            click.echo(f"{row['phase']:<13} {row['result']:<8} {row['seconds']:>6}s  {row['detail']}")
    sys.exit(1 if error else 0)


@app.command()
@config_option
@click.option("--keep", is_flag=True, help="Keep the smoke pods and their namespace.")
@json_option
def validate(config_path: Path, keep: bool, as_json: bool) -> None:
    """Prove the platform works: nodes, CUDA smoke on every GPU node, DCGM metrics, Slurm GPU jobs.

    Exit 0 all passed, 1 a check failed, 2 the environment prevented checking.
    """
    try:
        load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), 2)
    from flows.validate import ValidateParams, ValidationFailed
    from flows.validate import validate as validate_flow

    state = run_flow(validate_flow, ValidateParams(config=str(config_path), keep=keep))
    report = report_of(state, ValidationFailed, "validate", 2)
    if as_json:
        click.echo(json.dumps({k: report[k] for k in ("ok", "failures", "checks")}, indent=2))
    else:
        for c in report["checks"]:
            click.echo(f"{c['result']:<8} {c['check']:<18} {c['target']:<22} {c['detail']}")
    sys.exit(report["exit_code"])


app.add_command(health)
app.add_command(drift)
app.add_command(fleet)
app.add_command(node)
app.add_command(upgrade)


def main() -> None:
    """Console entry point: one-line usage errors instead of click's multi-line usage block."""
    # Before any command imports Prefect: it reads its settings from the environment once, at import.
    prefect_defaults()
    try:
        app.main(prog_name="gpuforge", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        sys.exit(2)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "gpuforge"
        click.echo(f"{command}: error: {exc.format_message()} (see '{command} --help')", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("gpuforge: aborted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
