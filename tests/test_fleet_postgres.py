"""Production-shaped Prefect, without the lab: a real PostgreSQL (Debian's package, loopback only, data in a
temporary folder), a Prefect server on it, `prefect deploy --all` of the generated prefect.yaml (the repository's
clusters plus one added folder), and one real flow run through a process worker: `validate` of a cluster whose
API server does not answer ends with its "could not check" outcome and artifacts under that deployment."""

from __future__ import annotations

import json
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from ruamel.yaml import YAML

from gpuforge import fleet
from tests.prefect_pg import REPO, free_port, listeners, postgres, prefect_server

TIMINGS: dict[str, float] = {}
FLOWS = ["install", "validate", "upgrade", "gpu-health", "drift"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fleet-pg")
    with postgres() as pg:
        TIMINGS["postgres start (initdb, pg_ctl start, createdb)"] = pg.started_s
        with prefect_server(pg.url, folder) as srv:
            TIMINGS["prefect server start on PostgreSQL (healthy)"] = srv.started_s
            srv.pg, srv.folder = pg, folder
            yield srv
    print("\n" + "\n".join(f"  {k}: {v:.1f} s" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def client(server):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}):
        with get_client(sync_client=True) as c:
            yield c


def unreachable_cluster(folder: Path) -> Path:
    """deployments-like folder `edge/`: prod's example renamed, in Tokyo, with an API server nobody answers."""
    closed = free_port()  # bound once and released: nothing listens there
    kubeconfig = folder / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "edge", "cluster": {"server": f"https://127.0.0.1:{closed}"}}],
                "users": [{"name": "edge", "user": {"token": "none"}}],
                "contexts": [{"name": "edge", "context": {"cluster": "edge", "user": "edge"}}],
                "current-context": "edge",
            }
        )
    )
    yaml = YAML()
    data = yaml.load((REPO / "deployments" / "prod" / "config.yml").read_text())
    data.update(
        cluster_name="edge-tokyo",
        timezone="Asia/Tokyo",
        kubeconfig=str(kubeconfig),
        prometheus_url=f"http://127.0.0.1:{closed}",
    )
    path = folder / "edge" / "config.yml"
    path.parent.mkdir()
    with path.open("w") as f:
        yaml.dump(data, f)
    return path


@pytest.fixture(scope="module")
def deployed(server):
    """The generated prefect.yaml of this repository's clusters plus one more folder, deployed with --all."""
    edge = unreachable_cluster(server.folder)
    found = fleet.clusters([*fleet.discover(REPO), edge], REPO)
    prefect_file = server.folder / "prefect.yaml"
    prefect_file.write_text(fleet.prefect_yaml(found))
    server.cli("work-pool", "create", "gpuforge", "--type", "process")
    t0 = time.monotonic()
    server.cli("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file), timeout=600)
    TIMINGS[f"prefect deploy --all ({len(found) * len(FLOWS)} deployments)"] = time.monotonic() - t0
    return found


def test_everything_listens_on_loopback_only(server):
    assert listeners(server.pg.port) == ["127.0.0.1"]
    assert listeners(server.port) == ["127.0.0.1"]
    # the server really is on PostgreSQL: its schema is there
    assert server.pg.psql("select count(*) from alembic_version") == "1"


def test_deploy_all_registers_one_set_per_cluster(server, deployed, client):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    envs = {c.env: c for c in deployed}
    assert set(envs) == {"lab", "prod", "edge"}
    for env, cluster in envs.items():
        for flow in FLOWS:
            d = client.read_deployment_by_name(f"{flow}/{env}")
            assert d.tags == [fleet_tag(flow), env, f"cluster:{cluster.name}"], (flow, env)
            assert d.work_pool_name == "gpuforge"
            assert d.parameters == {"params": {"config": cluster.config}}
            assert d.global_concurrency_limit.limit == 1
            assert d.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
            crons = [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules]
            expected = {"gpu-health": "0 2 * * *", "drift": "0 * * * *"}.get(flow)
            assert crons == ([(expected, cluster.timezone, True)] if expected else []), (flow, env)
    assert envs["edge"].timezone == "Asia/Tokyo" and envs["prod"].config == "deployments/prod/config.yml"
    # the server's scheduler turns the schedule into runs at 02:00 Tokyo time (17:00 UTC)
    health = client.read_deployment_by_name("gpu-health/edge")
    deadline = time.monotonic() + 90
    while not (scheduled := client.read_flow_runs(deployment_filter=by_id(health.id))):
        assert time.monotonic() < deadline, "no scheduled gpu-health/edge run after 90 s"
        time.sleep(1)
    starts = {r.expected_start_time.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%H:%M") for r in scheduled}
    assert starts == {"02:00"}, starts
    # stored in PostgreSQL, one per workflow and cluster
    assert server.pg.psql("select count(*) from deployment") == str(len(FLOWS) * len(envs))


def by_id(deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))


def fleet_tag(flow: str) -> str:
    return next(w.tag for w in fleet.WORKFLOWS if w.flow == flow)


def test_a_run_through_a_process_worker(server, deployed, client):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    # No scheduled run may reach the worker (drift/lab would read the developer's lab): pausing a schedule
    # also deletes its future runs.
    for d in client.read_deployments():
        for schedule in d.schedules:
            client.update_deployment_schedule(d.id, schedule.id, active=False)
    deployment = client.read_deployment_by_name("validate/edge")
    t0 = time.monotonic()
    server.cli("deployment", "run", "validate/edge")
    (run,) = client.read_flow_runs(deployment_filter=by_id(deployment.id))
    with server.worker("w1"):
        deadline = time.monotonic() + 300
        while not (run := client.read_flow_run(run.id)).state.is_final():
            assert time.monotonic() < deadline, f"run still {run.state.name}:\n{server.worker_log('w1')}"
            time.sleep(1)
    TIMINGS["one validate run: `deployment run` to final state, worker start included"] = time.monotonic() - t0
    if run.start_time and run.expected_start_time:
        TIMINGS["  of which scheduled -> running"] = (run.start_time - run.expected_start_time).total_seconds()
    if run.total_run_time:
        TIMINGS["  of which running (flow run process)"] = run.total_run_time.total_seconds()
    # validate's "could not check" (exit code 2): the run fails with the report, not a crash
    assert run.state.is_failed(), (run.state.name, run.state.message, server.worker_log("w1"))
    assert "ValidationFailed" in (run.state.message or ""), run.state.message
    assert run.name == "validate-edge-tokyo"
    assert {"validate", "edge", "cluster:edge-tokyo"} <= set(run.tags)
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
    )
    by_key = {a.key: a for a in artifacts}
    assert {"validation-report", "validation-summary"} <= set(by_key)
    assert "Kubernetes API unreachable" in by_key["validation-report"].data
    assert "# Validation of `edge-tokyo`" in by_key["validation-summary"].data
