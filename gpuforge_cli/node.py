"""`gpuforge node add|remove|replace` (registered on gpuforge_cli.app.app): the node lifecycle flows of
flows/node.py, run in this process. The config is loaded first (a bad config: one line per problem, exit 1).

Exit 0 done; 1 the operation failed or was refused (the message says why; a node that failed validation stays
cordoned and Slurm-drained with the reason); `--json` prints the report on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gpuforge_cli.common import config_option, drain_timeout_option, json_option, load, run_flow, state_error

force_option = click.option(
    "--force", is_flag=True, help="Go on when Slurm jobs or PodDisruptionBudgets still hold the node at the timeout."
)
timeout_option = drain_timeout_option(600, "the node's Slurm jobs and pod evictions")


@click.group()
def node() -> None:
    """Add, remove or replace a node: GPU- and Slurm-aware, validated before it takes work."""


def _finish(state, what: str, as_json: bool) -> None:
    error = state_error(state)
    result = None if error else state.result()
    if as_json:
        click.echo(
            json.dumps({"ok": error is None, "result": result, "error": str(error) if error else None}, indent=2)
        )
    elif error:
        click.echo(f"node {what} failed: {error}", err=True)
    else:
        rows = result if isinstance(result, list) else result.get("steps") or result.get("added") or []
        for row in rows:
            click.echo("  ".join(str(v) for v in row.values()))
    sys.exit(1 if error else 0)


@node.command("add")
@config_option
@click.argument("names", nargs=-1)
@json_option
def add(config_path: Path, names: tuple[str, ...], as_json: bool) -> None:
    """Add NAMES (default: every config node the cluster lacks): preflight, Kubespray scale.yml on them only,
    Ready, GPUs, Slurm NodeSets, validation; cordoned and Slurm-drained until validated."""
    load(config_path, connects=True)
    from flows.node import NodeAddParams, node_add

    _finish(run_flow(node_add, NodeAddParams(config=str(config_path), nodes=list(names))), "add", as_json)


@node.command("remove")
@config_option
@click.argument("name")
@force_option
@timeout_option
@click.option("--dead", is_flag=True, help="The host no longer answers: Kubespray resets nothing there.")
@json_option
def remove(config_path: Path, name: str, force: bool, drain_timeout: float, dead: bool, as_json: bool) -> None:
    """Remove NAME (taken out of the config first): cordon, Slurm drain and wait for its jobs, evict respecting
    PodDisruptionBudgets, Kubespray remove-node.yml, delete the Node, NodeSets updated."""
    load(config_path, connects=True)
    from flows.node import NodeRemoveParams, node_remove

    params = NodeRemoveParams(config=str(config_path), node=name, force=force, drain_timeout_s=drain_timeout, dead=dead)
    _finish(run_flow(node_remove, params), "remove", as_json)


@node.command("replace")
@config_option
@click.argument("name")
@force_option
@timeout_option
@json_option
def replace(config_path: Path, name: str, force: bool, drain_timeout: float, as_json: bool) -> None:
    """Replace NAME's machine with the one whose address the config now gives NAME: the old one is removed, the
    new one added under the same name and labels, validated before it takes work."""
    load(config_path, connects=True)
    from flows.node import NodeReplaceParams, node_replace

    params = NodeReplaceParams(config=str(config_path), node=name, force=force, drain_timeout_s=drain_timeout)
    _finish(run_flow(node_replace, params), "replace", as_json)
