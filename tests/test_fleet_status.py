"""The fleet-status rows from plain runs and artifacts (gpuforge.fleet_status): no Prefect."""

from __future__ import annotations

from gpuforge.fleet_status import cells, markdown, run_cluster, status_rows


def run(id, flow, cluster, state="Completed", when="2026-12-05T10:00:00+00:00", tagged=True):
    return {
        "id": id,
        "flow": flow,
        "name": f"{flow}-{cluster}",
        "tags": [flow, f"cluster:{cluster}"] if tagged else [],
        "state": state,
        "when": when,
    }


def test_a_runs_cluster_is_its_tag_else_its_run_name():
    assert run_cluster({"flow": "drift", "name": "drift-x", "tags": ["drift", "cluster:edge"]}) == "edge"
    assert run_cluster({"flow": "gpu-health", "name": "gpu-health-edge-tokyo", "tags": []}) == "edge-tokyo"
    assert run_cluster({"flow": "drift", "name": "drift-bad-config", "tags": []}) is None
    assert run_cluster({"flow": "drift", "name": "sly-fox", "tags": []}) is None


def test_one_row_per_declared_cluster_then_clusters_with_runs_only():
    runs = [
        run("v2", "validate", "prod", "Failed", "2026-12-05T11:00:00+00:00"),
        run("v1", "validate", "prod", "Completed", "2026-12-05T09:00:00+00:00"),
        run("d1", "drift", "stray", "Completed", tagged=False),
        run("i1", "install", "prod", "Failed"),
        run("h1", "gpu-health", "prod", "Failed"),
        run("x1", "notify", "prod"),  # not a flow of the table
    ]
    artifacts = {
        "v2": {"validation-report": [{"check": "nodes", "result": "pass"}, {"check": "api", "result": "error"}]},
        "v1": {"validation-report": [{"check": "nodes", "result": "fail"}]},
        "h1": {"gpu-health": [{"verdict": "healthy"}] * 3 + [{"verdict": "unhealthy"}]},
        "d1": {"drift-report": [{"result": "nothing to report"}]},
    }
    rows = status_rows([("prod", "prod"), ("idle", "lab")], runs, artifacts)
    assert [(r["cluster"], r["folder"]) for r in rows] == [("prod", "prod"), ("idle", "lab"), ("stray", "-")]
    prod, idle, stray = rows
    # the newest validation, with its own report's counts
    assert prod["validation"] == {
        "state": "Failed",
        "when": "2026-12-05T11:00:00+00:00",
        "run": "validate-prod",
        "counts": {"pass": 1, "fail": 0, "skipped": 0, "error": 1},
    }
    assert prod["install"] == {"state": "Failed", "when": "2026-12-05T10:00:00+00:00", "run": "install-prod"}
    assert prod["health"]["counts"] == {"healthy": 3, "degraded": 0, "unhealthy": 1, "unknown": 0}
    assert prod["drift"] == {"state": None, "when": None, "run": None}
    assert all(idle[c]["state"] is None for c in ("install", "validation", "health", "drift"))
    assert stray["drift"]["open_items"] == 0  # the "nothing to report" row is no item


def test_a_run_without_its_artifact_says_no_report():
    (row,) = status_rows([("prod", "prod")], [run("d", "drift", "prod", "Crashed")], {})
    assert row["drift"]["open_items"] is None
    assert cells(row)[5] == "Crashed, no report, 2026-12-05 10:00"


def test_cells_and_markdown():
    runs = [run("d", "drift", "prod", "Failed"), run("h", "gpu-health", "prod")]
    artifacts = {
        "d": {"drift-report": [{"path": "a"}, {"path": "b"}]},
        "h": {"gpu-health": [{"verdict": "degraded"}, {"verdict": "unknown"}]},
    }
    (row,) = status_rows([("prod", "prod")], runs, artifacts)
    assert cells(row) == [
        "prod",
        "prod",
        "never",
        "never",
        "Completed, 1 degraded 1 unknown, 2026-12-05 10:00",
        "Failed, 2 open, 2026-12-05 10:00",
    ]
    text = markdown([row])
    assert "| cluster | folder | install | validation | health | drift |" in text
    assert "| prod | prod | never | never | Completed, 1 degraded 1 unknown, 2026-12-05 10:00 |" in text
