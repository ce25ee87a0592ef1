"""What the Prefect server knows about the fleet's runs, as the plain data gpuforge.fleet_status takes.

Five API calls whatever the fleet size: the newest `per_flow` started runs of each of the four flows (newest
first), then one read of the table artifacts of the latest run per cluster and flow.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import get_client, task
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort

from gpuforge.fleet_status import ARTIFACT_KEYS, COLUMNS, latest_runs

# Scheduled and pending runs have not run yet: the last run of a flow is one that started.
STARTED = [t for t in StateType if t not in (StateType.SCHEDULED, StateType.PENDING)]


def _run(flow: str, run) -> dict[str, Any]:
    return {
        "id": str(run.id),
        "flow": flow,
        "name": run.name,
        "tags": list(run.tags),
        "state": run.state.name if run.state else "unknown",
        "when": run.start_time.isoformat() if run.start_time else None,
    }


def _rows(data: Any) -> list[dict[str, Any]]:
    rows = json.loads(data) if isinstance(data, str) else data
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


@task(name="read-fleet-runs")
def read_fleet_runs(per_flow: int = 200) -> tuple[list[dict[str, Any]], dict[str, dict[str, list]]]:
    """(runs newest first, {run id: {artifact key: table rows}}) of install, validate, gpu-health and drift."""
    runs: list[dict[str, Any]] = []
    with get_client(sync_client=True) as client:
        for flow in COLUMNS:
            found = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=STARTED))),
                sort=FlowRunSort.START_TIME_DESC,
                limit=per_flow,
            )
            runs += [_run(flow, r) for r in found]
        runs.sort(key=lambda r: r["when"] or "", reverse=True)
        wanted = [r["id"] for r in latest_runs(runs).values()]
        artifacts: dict[str, dict[str, list]] = {}
        if wanted:
            for artifact in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=wanted), key=ArtifactFilterKey(any_=list(ARTIFACT_KEYS))
                ),
                limit=len(wanted) * len(ARTIFACT_KEYS),
            ):
                artifacts.setdefault(str(artifact.flow_run_id), {})[artifact.key] = _rows(artifact.data)
    return runs, artifacts
