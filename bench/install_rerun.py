"""A converged re-run of `install` on a fresh lab vs the first run, in one process.

Goal: the re-run takes <= 10 % of the first run's wall time and adds zero Helm revisions.
Prints both times, the ratio and the revision counts; asserts nothing about time.
Run: .venv/bin/python bench/install_rerun.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def main() -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.install import InstallParams, install
    from gpuforge.config import load_config
    from lab.lab import Lab
    from tasks.helm import read_releases
    from tests.conftest import make_lab_config

    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
        work = Path(tmp)
        os.environ["GPUFORGE_STATE"] = str(work / "state-runs")
        cfg_path = make_lab_config(work, prefix="b", ip_base=230, cluster="gpuforge-bench")
        config = load_config(cfg_path)
        lab = Lab(config)
        lab.up()
        try:
            with prefect_test_harness(server_startup_timeout=180):
                params = InstallParams(config=str(cfg_path))
                started = time.perf_counter()
                first = install(params, return_state=True)
                t_first = time.perf_counter() - started
                assert first.is_completed(), first.message
                revisions = {n: r["revision"] for n, r in read_releases(config.kubeconfig_path()).items()}
                started = time.perf_counter()
                second = install(params, return_state=True)
                t_second = time.perf_counter() - started
                assert second.is_completed(), second.message
                after = {n: r["revision"] for n, r in read_releases(config.kubeconfig_path()).items()}
            new_revisions = sum(after[n] - revisions[n] for n in revisions)
            skipped = [r["phase"] for r in second.result() if r["result"] == "skipped"]
            print(
                f"install on a fresh lab: first run {t_first:.1f}s, converged re-run {t_second:.1f}s "
                f"-> {100 * t_second / t_first:.0f}% of the first (goal <= 10%); "
                f"new Helm revisions: {new_revisions}; phases skipped on re-run: {', '.join(skipped)}"
            )
            print("re-run per phase: " + ", ".join(f"{r['phase']} {r['seconds']}s" for r in second.result()))
        finally:
            lab.down(purge=True)


if __name__ == "__main__":
    main()
