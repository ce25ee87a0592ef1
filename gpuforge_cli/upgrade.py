"""`gpuforge upgrade plan|apply`: what moving the live cluster to the pins would change (read-only), then doing it.

Like Terraform: `plan` shows, `apply` does. Exit codes of `plan` as `gpuforge drift` (helm-diff / Terraform
convention): 0 nothing to do, 2 changes, 1 error (a bad config, an unreachable cluster, or something the plan
cannot be made past). `apply`: 0 upgraded (or nothing to do), 1 a step failed and was rolled back, 2 refused
before any change (what the plan holds cannot be carried out, a pre-check failed, or the cluster cannot be read).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gpuforge.config import ConfigError, load_config
from gpuforge_cli.common import config_option, drain_timeout_option, fail, json_option, report_of, run_flow


@click.group("upgrade")
def upgrade() -> None:
    """Upgrade the cluster between pins: Kubernetes, GPU Operator, monitoring, Slurm operator."""


@upgrade.command("plan")
@config_option
@json_option
def plan(config_path: Path, as_json: bool) -> None:
    """Compare the live cluster with the pins, read-only: versions, the Kubernetes path, CRDs, removed APIs,
    the dcgm-exporter metric contract and the risks. Exit 0 nothing to do, 2 changes, 1 error."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), 1)
    from flows.common import read_upgrade_plan
    from gpuforge import upgrade as core
    from gpuforge.render import render_releases

    try:
        result, _, _ = read_upgrade_plan(config, render_releases(config))
    except core.PlanError as exc:
        fail(f"upgrade plan: {exc}", 1)
    except Exception as exc:  # noqa: BLE001 - any failing read: say which cluster, in the client's words
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        fail(f"upgrade plan: cannot read the cluster ({config.kubeconfig_path()}): {first}", 1)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        for line in core.plan_lines(result):
            click.echo(line, err=line.startswith("error: "))
    sys.exit(result.exit_code)


@upgrade.command("apply")
@config_option
@json_option
@drain_timeout_option(3600, "each node's drain (a GPU node's Slurm jobs, then its pod evictions)")
def apply(config_path: Path, as_json: bool, drain_timeout: float) -> None:
    """Upgrade to the pins, one gated step at a time: pre-checks (etcd, nodes, a green validation, room to drain
    every node the Kubernetes steps take out), the charts' crds/ CRDs, then monitoring, GPU Operator, Slurm,
    dashboard, each followed by a validation; a failed step is rolled back (Helm history) and stops the run. Then
    Kubernetes through Kubespray's upgrade-cluster.yml: the control plane, then node by node, each drained first (a
    GPU node the Slurm way, its jobs waited for; then its pods evicted within PodDisruptionBudgets) and a GPU node
    re-validated before it is back in service; a failed node stays cordoned and drained with the reason and stops
    the run. Exit 0 done or nothing to do, 1 a step failed, 2 refused."""
    try:
        load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), 2)
    from flows.upgrade import UpgradeFailed, UpgradeParams
    from flows.upgrade import upgrade as upgrade_flow

    params = UpgradeParams(config=str(config_path), drain_timeout_s=drain_timeout)
    report = report_of(run_flow(upgrade_flow, params), UpgradeFailed, "upgrade", 2)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for row in report["steps"]:
            click.echo(
                f"{row['step']:<24} {row['result']:<12} {row['seconds']:>6}s  {row['revisions']}  {row['detail']}"
            )
            if row["gate"]:
                click.echo(f"{'':<24} gate: {row['gate']}")
        click.echo(report["outcome"], err=bool(report["exit_code"]))
    sys.exit(report["exit_code"])
