"""`gpuforge fleet status` end to end on a Prefect test server: the real install, validate, gpu-health and drift
flows run against clusters whose API server and Prometheus do not answer (each ends in its could-not-check
outcome, with its artifacts), then the command's rows are checked against what those runs reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML

from tests.conftest import REPO, free_port


def cluster_config(path: Path, name: str) -> Path:
    """prod's example config renamed, with an API server and a Prometheus nobody answers and no SSH key."""
    closed = free_port()  # bound once and released: nothing listens there
    path.parent.mkdir(parents=True)
    kubeconfig = path.parent / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": name, "cluster": {"server": f"https://127.0.0.1:{closed}"}}],
                "users": [{"name": name, "user": {"token": "none"}}],
                "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
                "current-context": name,
            }
        )
    )
    yaml = YAML()
    data = yaml.load((REPO / "deployments" / "prod" / "config.yml").read_text())
    data.update(
        cluster_name=name,
        kubeconfig=str(kubeconfig),
        prometheus_url=f"http://127.0.0.1:{closed}",
        ansible_ssh_private_key_file=str(path.parent / "no-such-key"),
    )
    with path.open("w") as f:
        yaml.dump(data, f)
    return path


@pytest.fixture(scope="module")
def fleet_runs(prefect_server, tmp_path_factory):
    """A fleet folder with `edge` (every flow run, validate twice) and `idle` (never run), and `stray`, a
    cluster with a validate run but no folder. Returns (root, {what: final state})."""
    from flows.common import ClusterParams
    from flows.drift import drift
    from flows.gpu_health import HealthParams, gpu_health
    from flows.install import InstallParams, install
    from flows.validate import ValidateParams, validate

    root = tmp_path_factory.mktemp("fleet")
    edge = cluster_config(root / "deployments" / "edge" / "config.yml", "fs-edge")
    cluster_config(root / "deployments" / "idle" / "config.yml", "fs-idle")
    stray = cluster_config(root / "elsewhere" / "config.yml", "fs-stray")
    states = {
        "install": install(InstallParams(config=str(edge)), return_state=True),
        "validate-first": validate(ValidateParams(config=str(edge)), return_state=True),
        "validate": validate(ValidateParams(config=str(edge)), return_state=True),
        "gpu-health": gpu_health(HealthParams(config=str(edge)), return_state=True),
        "drift": drift(ClusterParams(config=str(edge)), return_state=True),
        "stray": validate(ValidateParams(config=str(stray)), return_state=True),
    }
    return root, states


def flow_run(state):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def report(state) -> dict:
    """The report a could-not-check run carries on its exception."""
    assert state.is_failed(), state
    return state.result(raise_on_failure=False).report


def fleet_status_cli(root: Path, *args: str):
    from gpuforge_cli.app import app

    return CliRunner().invoke(app, ["fleet", "status", "--root", str(root), *args])


def test_rows_say_what_the_runs_reported(fleet_runs):
    root, states = fleet_runs
    done = fleet_status_cli(root, "--json")
    assert done.exit_code == 0, done.output
    rows = {r["cluster"]: r for r in json.loads(done.output)}
    edge, idle, stray = rows["fs-edge"], rows["fs-idle"], rows["fs-stray"]
    assert (edge["folder"], idle["folder"], stray["folder"]) == ("edge", "idle", "-")

    # install failed before any phase (no SSH key): its state, no counts
    assert states["install"].is_failed()
    assert edge["install"] == {
        "state": "Failed",
        "when": flow_run(states["install"]).start_time.isoformat(),
        "run": "install-fs-edge",
    }
    # the newer of the two validations, counted from its validation-report artifact
    newest = flow_run(states["validate"])
    assert edge["validation"]["when"] == newest.start_time.isoformat()
    assert newest.start_time > flow_run(states["validate-first"]).start_time
    checks = report(states["validate"])["checks"]
    assert edge["validation"]["counts"] == {
        k: sum(c["result"] == k for c in checks) for k in ("pass", "fail", "skipped", "error")
    }
    assert edge["validation"]["counts"]["error"] == 1 and edge["validation"]["state"] == "Failed"
    # gpu-health: every GPU unknown (Prometheus unreachable), the same counts as the run's own report
    health = report(states["gpu-health"])
    assert edge["health"]["counts"] == health["counts"]
    assert edge["health"]["counts"]["unknown"] == len(health["gpus"]) > 0
    # drift could not read the cluster: exit 1, its items (none) counted from drift-report
    drift = report(states["drift"])
    assert drift["exit_code"] == 1
    assert edge["drift"]["open_items"] == len(drift["items"])
    assert edge["drift"]["state"] == "Failed" and edge["drift"]["run"] == "drift-fs-edge"

    assert all(idle[c] == {"state": None, "when": None, "run": None} for c in ("install", "validation"))
    assert idle["health"]["state"] is None and idle["drift"]["state"] is None
    assert stray["validation"]["counts"]["error"] == 1 and stray["install"]["state"] is None


def test_the_table_and_the_markdown_artifact(fleet_runs):
    from prefect import get_client

    root, states = fleet_runs
    done = fleet_status_cli(root)
    assert done.exit_code == 0, done.output
    print(done.output)
    assert "gpuforge fleet" in done.output and "fs-stray" in done.output
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        (published,) = [a for a in artifact if a.key == "fleet-status"]
    lines = published.data.splitlines()
    assert lines[0] == "# Fleet status"
    (edge,) = [line for line in lines if line.startswith("| fs-edge | edge |")]
    unknown, items = report(states["gpu-health"])["counts"]["unknown"], len(report(states["drift"])["items"])
    assert "| Failed, 1 error, " in edge and f"| Failed, {unknown} unknown, " in edge, edge
    assert f"| Failed, {items} open, " in edge, edge
    assert "| fs-idle | idle | never | never | never | never |" in lines


def test_a_broken_cluster_folder_exits_2(tmp_path):
    (tmp_path / "deployments" / "bad").mkdir(parents=True)
    (tmp_path / "deployments" / "bad" / "config.yml").write_text("cluster_name: [\n")
    done = fleet_status_cli(tmp_path)
    assert done.exit_code == 2, done.output
    assert "bad/config.yml" in done.output, done.output
