"""Two clusters on one PostgreSQL-backed Prefect server with two process workers, against the session's lab:
install + validate on the lab and, at the same time, gpu-health + drift on a second cluster config that points
at the same lab under another name. Both sets complete, the lab's installs never overlap (deployment limit
CANCEL_NEW + the cluster lock), and every run's artifacts land under its own deployment."""

from __future__ import annotations

import time

import pytest

from gpuforge import fleet
from tests.conftest import config_variant
from tests.prefect_pg import REPO, postgres, prefect_server


@pytest.fixture(scope="module")
def server(lab_config, tmp_path_factory):
    # lab_config first: it sets GPUFORGE_STATE, which the server's environment (and so the workers') carries
    folder = tmp_path_factory.mktemp("fleet-lab")
    with postgres() as pg:
        with prefect_server(pg.url, folder) as srv:
            srv.env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
            srv.folder = folder
            yield srv


@pytest.fixture(scope="module")
def client(server):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}):
        with get_client(sync_client=True) as c:
            yield c


def test_two_clusters_at_once_through_two_workers(lab, lab_config, first_install, server, client):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    assert first_install.is_completed(), first_install.message
    second_folder = server.folder / "lab-b"
    second_folder.mkdir()
    second = config_variant(lab_config, second_folder, lambda d: d.update(cluster_name="gpuforge-test-b"))
    lab_c, b_c = fleet.clusters([lab_config, second], REPO)
    prefect_file = server.folder / "prefect.yaml"
    prefect_file.write_text(fleet.prefect_yaml([lab_c, b_c]))
    server.cli("work-pool", "create", "gpuforge", "--type", "process")
    server.cli("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file), timeout=600)

    # only the runs below: a scheduled drift run beside ours would be cancelled or cancel ours (CANCEL_NEW)
    for d in client.read_deployments():
        for schedule in d.schedules:
            client.update_deployment_schedule(d.id, schedule.id, active=False)
    wanted = [
        f"install/{lab_c.env}",
        f"install/{lab_c.env}",  # a second install of the same cluster at once: never runs beside the first
        f"validate/{lab_c.env}",
        f"gpu-health/{b_c.env}",
        f"drift/{b_c.env}",
    ]
    runs = []
    with server.worker("w1"), server.worker("w2"):
        for name in wanted:
            deployment = client.read_deployment_by_name(name)
            runs.append((name, client.create_flow_run_from_deployment(deployment.id).id))
        deadline = time.monotonic() + 900
        while True:
            states = {run_id: client.read_flow_run(run_id) for _, run_id in runs}
            if all(r.state.is_final() for r in states.values()):
                break
            assert time.monotonic() < deadline, {n: states[i].state.name for n, i in runs}
            time.sleep(2)
    report = {f"{n}#{i}": (states[i].state.name, states[i].state.message) for n, i in runs}

    installs = [states[i] for n, i in runs if n.startswith("install/")]
    done = [r for r in installs if r.state.is_completed()]
    assert len(done) >= 1, report
    assert all(r.state.is_completed() or r.state.is_cancelled() for r in installs), report
    if len(done) == 2:  # both ran: one after the other, never side by side
        a, b = sorted(done, key=lambda r: r.start_time)
        assert a.end_time <= b.start_time, report
    # The second cluster is the same lab under another name, so its desired state differs (the Slurm cluster name
    # in its Helm values, its own node labels): drift reports exactly that, which fails its run by design.
    drift = next(states[i] for n, i in runs if n.startswith("drift/"))
    assert drift.state.is_failed() and "DriftFound: gpuforge-test-b" in drift.state.message, report
    assert "/helm/slurm/values/clusterName" in drift.state.message, report
    # gpu-health judges every GPU of the lab under the second name; an earlier test's fault injection may still
    # be inside the health window on this shared lab, so its verdict may fail the run, but it must be a verdict.
    health = next(states[i] for n, i in runs if n.startswith("gpu-health/"))
    assert health.state.is_completed() or "HealthCheckFailed: gpuforge-test-b: 12 GPUs:" in health.state.message, report
    for n, i in runs:
        if not n.startswith(("install/", "drift/", "gpu-health/")):
            assert states[i].state.is_completed(), report

    # every run carries its cluster's tags and name, and its artifacts belong to it
    expected_keys = {"install": "install-summary", "validate": "validation-report", "gpu-health": "gpu-health"}
    for n, i in runs:
        run = states[i]
        if run.state.is_cancelled():
            continue
        flow, env = n.split("/")
        cluster = lab_c if env == lab_c.env else b_c
        assert run.name == f"{flow}-{cluster.name}", n
        assert {env, f"cluster:{cluster.name}"} <= set(run.tags), n
        keys = {
            a.key
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[i]))
            )
        }
        assert expected_keys.get(flow, "drift-summary") in keys, (n, keys)

    # the cluster lock of the lab is free again, and the second cluster's name never took the lab's
    limit = client.read_global_concurrency_limit_by_name(f"cluster-{lab_c.name}")
    assert limit.limit == 1 and limit.active_slots == 0
