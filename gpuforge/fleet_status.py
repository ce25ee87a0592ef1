"""The fleet at a glance: one row per cluster from its latest runs and their artifacts, as plain data.

Input is what a Prefect server holds, already turned into plain dicts (tasks/prefect_runs.py reads it):

    runs       newest first: {"id", "flow", "name", "tags", "state", "when"}  (when: ISO-8601 or None)
    artifacts  {run id: {artifact key: table rows (list of dicts)}}

A run's cluster is its `cluster:<name>` tag (deployment runs) or else its run name `<flow>-<cluster>` (every
gpuforge flow names its runs so, CLI runs included). The declared fleet is the cluster folders; a cluster with
runs but no folder still gets a row (folder "-"), so runs of a removed or ad-hoc cluster stay visible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gpuforge.health import Verdict
from gpuforge.validation import ERROR, FAIL, PASS, SKIP

# The flows a row summarises, the row's column for each, and the table artifact that column counts.
COLUMNS: dict[str, tuple[str, str | None]] = {
    "install": ("install", None),
    "validate": ("validation", "validation-report"),
    "gpu-health": ("health", "gpu-health"),
    "drift": ("drift", "drift-report"),
}
ARTIFACT_KEYS = tuple(key for _, key in COLUMNS.values() if key)
UNNAMED = "bad-config"  # the run name's cluster part when its config could not be read (flows.common.run_name)
NO_FOLDER = "-"


def run_cluster(run: Mapping[str, Any]) -> str | None:
    """The cluster a run is about, or None when its config could not be read."""
    for tag in run.get("tags") or ():
        if tag.startswith("cluster:"):
            return tag.removeprefix("cluster:")
    prefix = f"{run['flow']}-"
    name = run.get("name") or ""
    cluster = name.removeprefix(prefix) if name.startswith(prefix) else None
    return None if cluster in (None, "", UNNAMED) else cluster


def latest_runs(runs: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """The newest run of each (cluster, flow); `runs` come newest first."""
    latest: dict[tuple[str, str], Mapping[str, Any]] = {}
    for run in runs:
        if run["flow"] in COLUMNS and (cluster := run_cluster(run)):
            latest.setdefault((cluster, run["flow"]), run)
    return latest


def validation_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    checks = [r for r in rows if "check" in r]
    return {k: sum(r.get("result") == k for r in checks) for k in (PASS, FAIL, SKIP, ERROR)}


def health_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    gpus = [r for r in rows if "verdict" in r]
    return {v.value: sum(r["verdict"] == v.value for r in gpus) for v in Verdict}


def drift_items(rows: list[dict[str, Any]]) -> int:
    return sum("path" in r for r in rows)  # an empty report publishes one "nothing to report" row


# What each table artifact gives its column: (field, count of its rows).
FINDINGS = {
    "validation-report": ("counts", validation_counts),
    "gpu-health": ("counts", health_counts),
    "drift-report": ("open_items", drift_items),
}


def cell(run: Mapping[str, Any] | None, artifacts: Mapping[str, Mapping[str, list]], key: str | None) -> dict:
    """One column of a row: the run's state and time, and what its table artifact counts (None: no artifact)."""
    if run is None:
        return {"state": None, "when": None, "run": None}
    out: dict[str, Any] = {"state": run["state"], "when": run["when"], "run": run["name"]}
    if key:
        field, count = FINDINGS[key]
        rows = (artifacts.get(run["id"]) or {}).get(key)
        out[field] = None if rows is None else count(rows)
    return out


def status_rows(
    declared: Iterable[tuple[str, str]],
    runs: Iterable[Mapping[str, Any]],
    artifacts: Mapping[str, Mapping[str, list]],
) -> list[dict[str, Any]]:
    """One row per cluster: the declared ones (cluster name, folder) in their order, then clusters that only
    have runs, by name."""
    latest = latest_runs(runs)
    folders = dict(declared)
    extra = sorted({cluster for cluster, _ in latest} - set(folders))
    rows = []
    for cluster in [*folders, *extra]:
        row: dict[str, Any] = {"cluster": cluster, "folder": folders.get(cluster, NO_FOLDER)}
        for flow, (column, key) in COLUMNS.items():
            row[column] = cell(latest.get((cluster, flow)), artifacts, key)
        rows.append(row)
    return rows


HEADERS = ("cluster", "folder", "install", "validation", "health", "drift")


def _when(c: dict[str, Any]) -> str:
    return (c["when"] or "")[:16].replace("T", " ")


def _counts(counts: dict[str, int] | None, names: dict[str, str]) -> str:
    if counts is None:
        return "no report"
    return " ".join(f"{n}{short}" for name, short in names.items() if (n := counts.get(name)))


def cells(row: dict[str, Any]) -> list[str]:
    """A row as the short strings of the table (CLI and markdown artifact): state, findings, time."""
    out = [row["cluster"], row["folder"]]
    short = {
        "validation": lambda c: _counts(c["counts"], {PASS: " pass", FAIL: " fail", SKIP: " skip", ERROR: " error"}),
        "health": lambda c: _counts(c["counts"], {v.value: f" {v.value}" for v in Verdict}),
        "drift": lambda c: "no report" if c["open_items"] is None else f"{c['open_items']} open",
    }
    for column in HEADERS[2:]:
        c = row[column]
        if c["state"] is None:
            out.append("never")
            continue
        parts = [c["state"]]
        if column in short:
            parts.append(short[column](c) or "-")
        parts.append(_when(c))
        out.append(", ".join(parts))
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Fleet status",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
        *("| " + " | ".join(cells(r)) + " |" for r in rows),
    ]
    return "\n".join(lines) + "\n"
