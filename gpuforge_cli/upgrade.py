"""`gpuforge upgrade plan`: what moving the live cluster to the pins would change, read-only.

Exit codes as `gpuforge drift` (helm-diff / Terraform convention): 0 nothing to do, 2 changes, 1 error (a bad
config, an unreachable cluster, or something the plan cannot be made past).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from gpuforge.config import ConfigError, load_config
from gpuforge_cli.common import config_option, fail, json_option


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
    from gpuforge import upgrade as core
    from gpuforge.render import chart_mirror, render_releases
    from tasks import helm, kube

    kubeconfig = config.kubeconfig_path()
    try:
        live = core.live_state(
            kube.server_version(kubeconfig),
            {name: node.kubelet_version for name, node in kube.list_nodes(kubeconfig).items()},
            helm.release_details(kubeconfig),
            kube.list_crds(kubeconfig),
        )
    except Exception as exc:  # noqa: BLE001 - any failing read: say which cluster, in the client's words
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        fail(f"upgrade plan: cannot read the cluster ({kubeconfig}): {first}", 1)
    try:
        wanted = core.targets(render_releases(config), chart_mirror(config, os.environ))
    except core.PlanError as exc:
        fail(f"upgrade plan: {exc}", 1)
    result = core.plan(live, wanted, config.kubespray.kube_version, config.kubespray.version)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        for line in core.plan_lines(result):
            click.echo(line, err=line.startswith("error: "))
    sys.exit(result.exit_code)
