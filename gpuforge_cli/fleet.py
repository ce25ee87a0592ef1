"""`gpuforge fleet status` (registered on gpuforge_cli.app.app): one row per cluster from the Prefect server
that PREFECT_API_URL names (without one, the local database CLI runs record into). Exit 0 whatever the rows
say; 2 when a cluster folder's config is broken."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gpuforge_cli.common import fail, json_option, run_flow, state_error


@click.group("fleet")
def fleet() -> None:
    """The fleet: every cluster folder under deployments/ and every cluster with runs."""


@fleet.command("status")
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=Path("."),
    show_default=True,
    help="Repository root: its deployments/<env>/config.yml are the declared clusters.",
)
@click.option(
    "--runs-per-flow",
    type=click.IntRange(1, 200),
    default=200,
    show_default=True,
    help="Newest started runs read per flow (a cluster whose last run is older shows 'never').",
)
@json_option
def status(root: Path, runs_per_flow: int, as_json: bool) -> None:
    """Last install, validation, GPU health and drift of every cluster, and when each ran."""
    from flows.fleet_status import FleetStatusParams, fleet_status
    from gpuforge.fleet_status import HEADERS, cells

    state = run_flow(fleet_status, FleetStatusParams(root=str(root), per_flow=runs_per_flow))
    if error := state_error(state):
        fail(f"fleet status could not run: {error}", 2)
    rows = state.result()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*HEADERS, title="gpuforge fleet")
    for row in rows:
        table.add_row(*cells(row))
    Console().print(table)
