"""fleet-status: one row per cluster (last install, validation, GPU health and drift, and when each ran),
published as the markdown artifact `fleet-status` and returned as rows (`gpuforge fleet status`).

Not one of fleet.WORKFLOWS: those run once per cluster (`<flow>/<env>`), this reads the whole fleet, so it
runs on demand: `gpuforge fleet status` runs it in its own process.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from flows.common import PreconditionFailed, publish_markdown
from gpuforge import fleet
from gpuforge import fleet_status as core
from tasks.prefect_runs import read_fleet_runs


class FleetStatusParams(BaseModel):
    root: str = "."  # the repository root: its deployments/<env>/config.yml are the declared fleet
    per_flow: int = 200  # newest started runs read per flow


@flow(name="fleet-status")
def fleet_status(params: FleetStatusParams) -> list[dict]:
    root = Path(params.root)
    try:
        declared = [(c.name, c.env) for c in fleet.clusters(fleet.discover(root), root)]
    except fleet.FleetError as exc:
        raise PreconditionFailed(str(exc)) from None
    runs, artifacts = read_fleet_runs(params.per_flow)
    rows = core.status_rows(declared, runs, artifacts)
    publish_markdown("fleet-status", core.markdown(rows), f"{len(rows)} clusters: last run of each flow")
    return rows
