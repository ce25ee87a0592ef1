"""prefect.yaml as a user runs it: deploy, then `prefect deployment run validate/lab` picked up by a
process worker, against the test session's lab. What prefect.yaml declares is checked in tests/test_fleet.py
(it is generated from deployments/*/config.yml), on a PostgreSQL-backed server in tests/test_fleet_postgres.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import get_client

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def prefect(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    # The test server lives in this process's settings context; hand its URL to the CLI explicitly.
    env = {**os.environ, "PREFECT_CLI_PROMPT": "false", "PREFECT_API_URL": PREFECT_API_URL.value() or ""}
    return subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.usefixtures("prefect_server")
def test_deployment_run_through_a_process_worker(lab, lab_config, first_install):
    assert prefect("work-pool", "create", "gpuforge", "--type", "process", "--overwrite").returncode == 0
    deployed = prefect("--no-prompt", "deploy", "--name", "validate/lab", "--name", "install/prod")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    params = json.dumps({"config": str(lab_config)})
    run = prefect("deployment", "run", "validate/lab", "--param", f"params={params}")
    assert run.returncode == 0, run.stdout + run.stderr
    worker = prefect("worker", "start", "--pool", "gpuforge", "--run-once", timeout=600)
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if r.deployment_id and r.name.startswith("validate-")]
        assert runs, "no validate run from the deployment"
        latest = max(runs, key=lambda r: r.created)
        assert latest.state.is_completed(), latest.state.message
        deployment = client.read_deployment_by_name("install/prod")
        assert deployment.parameters == {"params": {"config": "deployments/prod/config.yml"}}
