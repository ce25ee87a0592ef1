"""Scheduling overhead of the fleet setup (issue 17): short `validate` runs against a lab of its own, spread over
5 cluster deployments (the lab under 5 names) and run by 2 process workers, on a Prefect server backed by
PostgreSQL and, in the same run, on one backed by SQLite (Prefect's default). Side by side: runs completed,
p50/p95 time from scheduled to running (the run's expected start to its start), API errors.

Each deployment allows one run at a time (CANCEL_NEW, as generated), so the bench keeps one run in flight per
cluster and creates the next when it ends: 5 runs at once across 2 workers. Then `gpuforge fleet status` is read
against the PostgreSQL server. Prints numbers; asserts nothing about time.

Run under the lab lock:  flock /tmp/gpuforge-lab.lock .venv/bin/python bench/fleet_sched_bench.py [--runs 50]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

CLUSTERS = 5
# What a server or worker log shows when the API failed a call (a 5xx, SQLite's lock, a lost connection).
API_ERROR = re.compile(
    r"\b50[0-4] (Internal Server Error|Bad Gateway|Service Unavailable|Gateway Timeout)|database is locked"
    r"|PrefectHTTPStatusError|httpx\.(ConnectError|ReadTimeout|RemoteProtocolError|PoolTimeout)"
)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def run_fleet(backend: str, database_url: str, folder: Path, lab_config: Path, runs: int) -> dict:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from gpuforge import fleet
    from tests.conftest import config_variant
    from tests.prefect_pg import prefect_server

    with prefect_server(database_url, folder) as srv:
        srv.env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
        paths = []
        for i in range(1, CLUSTERS + 1):
            (folder / f"c{i}").mkdir()
            paths.append(config_variant(lab_config, folder / f"c{i}", lambda d, i=i: d.update(cluster_name=f"fb-{i}")))
        found = fleet.clusters(paths, REPO)
        prefect_file = folder / "prefect.yaml"
        prefect_file.write_text(fleet.prefect_yaml(found))
        srv.cli("work-pool", "create", fleet.WORK_POOL, "--type", "process")
        srv.cli("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file), timeout=900)
        client_errors = 0
        with temporary_settings({PREFECT_API_URL: srv.api_url}), get_client(sync_client=True) as client:
            for d in client.read_deployments():  # only the bench's runs: no scheduled gpu-health/drift beside them
                for schedule in d.schedules:
                    client.update_deployment_schedule(d.id, schedule.id, active=False)
            deployments = [client.read_deployment_by_name(f"validate/{c.env}") for c in found]
            quota = {d.id: runs // CLUSTERS + (1 if i < runs % CLUSTERS else 0) for i, d in enumerate(deployments)}
            in_flight: dict = {}
            finished = []
            started = time.monotonic()
            with srv.worker("w1"), srv.worker("w2"):
                # Both workers polling before the first run: their start-up is not scheduling overhead.
                while sum(w.status == "ONLINE" for w in client.read_workers_for_work_pool(fleet.WORK_POOL)) < 2:
                    if time.monotonic() - started > 300:
                        raise SystemExit(f"{backend}: the workers did not come online:\n{srv.worker_log('w1')}")
                    time.sleep(1)
                started = time.monotonic()
                while any(quota.values()) or in_flight:
                    for d in deployments:
                        if d.id not in in_flight and quota.get(d.id):
                            quota[d.id] -= 1
                            in_flight[d.id] = client.create_flow_run_from_deployment(d.id).id
                    time.sleep(1)
                    for dep_id, run_id in list(in_flight.items()):
                        try:
                            run = client.read_flow_run(run_id)
                        except Exception:  # noqa: BLE001 - an API error is counted, the run read again
                            client_errors += 1
                            continue
                        if run.state.is_final():
                            finished.append(run)
                            del in_flight[dep_id]
                    if time.monotonic() - started > 3600:
                        raise SystemExit(f"{backend}: not done after an hour: {len(finished)} finished")
            wall = time.monotonic() - started
        logs = [srv.worker_log("w1"), srv.worker_log("w2"), (srv.home / "server.log").read_text(errors="replace")]
        error_lines = [line for text in logs for line in text.splitlines() if API_ERROR.search(line)]
        # scheduled -> picked up: the worker's Pending (its poll and submission); the rest is the flow-run
        # process starting (a new Python importing Prefect and gpuforge) until it reports Running.
        with temporary_settings({PREFECT_API_URL: srv.api_url}), get_client(sync_client=True) as client:
            pickup = []
            for r in finished:
                pending = [s.timestamp for s in client.read_flow_run_states(r.id) if s.type.value == "PENDING"]
                if pending:
                    pickup.append((min(pending) - r.expected_start_time).total_seconds())
        fleet_status = None
        if backend == "postgresql":
            env = {**srv.env, "PREFECT_LOGGING_LEVEL": "WARNING"}
            fleet_status = subprocess.run(
                [sys.executable, "-m", "gpuforge_cli", "fleet", "status", "--root", str(REPO)],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
    delays = [(r.start_time - r.expected_start_time).total_seconds() for r in finished if r.start_time]
    return {
        "backend": backend,
        "runs": len(finished),
        "completed": sum(r.state.is_completed() for r in finished),
        "states": sorted({r.state.name for r in finished}),
        "p50": statistics.median(delays) if delays else float("nan"),
        "p95": percentile(delays, 95),
        "wall": wall,
        "pickup_p50": statistics.median(pickup) if pickup else float("nan"),
        "pickup_p95": percentile(pickup, 95),
        "api_errors": len(error_lines),
        "error_lines": error_lines[:5],
        "client_errors": client_errors,
        "fleet_status": fleet_status,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="validate runs per backend (spread over 5 clusters)")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from flows.install import InstallParams, install
    from gpuforge.config import load_config
    from lab.lab import Lab
    from tests.conftest import make_lab_config
    from tests.prefect_pg import postgres

    with tempfile.TemporaryDirectory(prefix="gpuforge-fleet-bench-") as tmp:
        work = Path(tmp)
        os.environ["GPUFORGE_STATE"] = str(work / "state")
        lab_config = make_lab_config(work, prefix="f", ip_base=200, cluster="gpuforge-fleet-bench")
        lab = Lab(load_config(lab_config))
        lab.up()
        try:
            with prefect_test_harness(server_startup_timeout=180):
                state = install(InstallParams(config=str(lab_config)), return_state=True)
            assert state.is_completed(), state.message
            results = []
            with postgres() as pg:
                results.append(run_fleet("postgresql", pg.url, work / "pg", lab_config, args.runs))
            sqlite_url = f"sqlite+aiosqlite:///{work / 'sqlite' / 'prefect.db'}"
            (work / "sqlite").mkdir()
            results.append(run_fleet("sqlite", sqlite_url, work / "sqlite", lab_config, args.runs))
        finally:
            lab.down()

    load = os.getloadavg()
    print(f"\n{args.runs} validate runs per backend over {CLUSTERS} clusters, 2 process workers (load {load[0]:.1f})")
    print("scheduled -> running (p50/p95 s), of it scheduled -> picked up by a worker (Pending)")
    heads = ("runs", "done", "p50", "p95", "pick50", "pick95")
    print(f"{'backend':<11} " + " ".join(f"{h:>6}" for h in heads) + f" {'wall s':>7} errors")
    for r in results:
        print(
            f"{r['backend']:<11} {r['runs']:>6} {r['completed']:>6} {r['p50']:>6.2f} {r['p95']:>6.2f}"
            f" {r['pickup_p50']:>6.2f} {r['pickup_p95']:>6.2f} {r['wall']:>7.1f} {r['api_errors'] + r['client_errors']}"
            f"   states {r['states']}"
        )
        for line in r["error_lines"]:
            print(f"    {line[:200]}")
    pg, lite = results
    print(f"PostgreSQL / SQLite: p50 {pg['p50'] / lite['p50']:.2f}x, p95 {pg['p95'] / lite['p95']:.2f}x")
    status = pg["fleet_status"]
    print(f"\n`gpuforge fleet status` against the PostgreSQL server: exit {status.returncode}")
    print(status.stdout[-4000:] or status.stderr[-2000:])


if __name__ == "__main__":
    main()
