"""Issue 18's last fault: the disk holding the Prefect database fills up during a run.

The CLI's own Prefect database (a temporary server on SQLite under PREFECT_HOME) on a 48 MiB tmpfs of its own
(the tests run as root), filled by a filler file the moment a `gpuforge fleet status` run has begun: a real flow
(it reads the runs of every cluster, then publishes the `fleet-status` artifact) that needs no lab. What the user
sees is written to $GPUFORGE_FAULTS_SEEN (a folder) when that is set.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(600)

DISK_FULL = re.compile(
    r"prefect\.db: the Prefect database's disk is full \(\d+ MiB free in \S+, a run needs \d+ MiB\): free space"
    r" there \(or set PREFECT_HOME to a folder on a disk with room\) and run again; runs already recorded are kept$"
)

# Prefect's own log records ("13:17:55.375 | INFO    | prefect - Stopping temporary server ..." comes at exit)
PREFECT_LOG_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d+ \| ")


def seen(name: str, text: str) -> None:
    if folder := os.environ.get("GPUFORGE_FAULTS_SEEN"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, f"{name}.txt").write_text(text)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "prefect-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(folder: Path) -> Path:
    """Write zeros into `folder` until its disk has not one byte left."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (2**20, 512):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC
    return filler


def fleet_status(env: dict, *, fill_when_running: Path | None = None) -> tuple[int, str, bool]:
    """`gpuforge fleet status` in a process of its own: (exit code, stderr, whether the disk was filled while the
    run was on). With `fill_when_running`, that disk is filled the moment the flow run has begun."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuforge_cli", "fleet", "status", "--root", str(REPO)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines, filled_while_running = [], False
    for line in proc.stderr:
        lines.append(line)
        if fill_when_running and "Beginning flow run" in line:
            fill(fill_when_running)
            filled_while_running = proc.poll() is None and not any("Finished in state" in x for x in lines)
    return proc.wait(timeout=300), "".join(lines), filled_while_running


def recorded_runs(database: Path) -> dict[str, str]:
    """{flow run id: state type} of an intact database (SQLite's own integrity check)."""
    db = sqlite3.connect(database)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return dict(db.execute("SELECT id, state_type FROM flow_run"))
    finally:
        db.close()  # the last connection: SQLite checkpoints its WAL into the file and removes it


def test_prefect_database_disk_full_before_and_during_a_run(small_disk):
    home = small_disk / "prefect"
    database = home / "prefect.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "PREFECT_SERVER_DATABASE"))}
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # what a user sees, "Beginning flow run" included

    code, err, _ = fleet_status(env)
    assert code == 0, err
    # Prefect's temporary server leaves its 4 MB WAL behind, which the next run reuses before it needs new space;
    # a cleanly closed database has none (and a run that writes more, an install's Kubespray events, reaches the
    # full disk just the same).
    before = recorded_runs(database)
    assert list(before.values()) == ["COMPLETED"]

    # Full before the run: refused at once, before the temporary server starts (it could not: SQLite cannot
    # create its WAL; Prefect would wait out its start timeout, then print a traceback per try).
    filler = fill(small_disk)
    mtime = database.stat().st_mtime_ns
    code, err, _ = fleet_status(env)
    seen("prefect-disk-full-before", err)
    assert code == 2 and DISK_FULL.search(err.strip()), err
    assert "Starting temporary server" not in err and database.stat().st_mtime_ns == mtime
    filler.unlink()

    # Full during the run: the run cannot record its state; the last line says so, where, and what to do, and
    # the temporary server's SQLAlchemy tracebacks are not shown.
    code, err, filled_while_running = fleet_status(env, fill_when_running=small_disk)
    seen("prefect-disk-full-during", err)
    assert filled_while_running, err
    last = [line for line in err.splitlines() if line and not PREFECT_LOG_LINE.match(line)][-1]
    assert code == 2 and DISK_FULL.search(last) and last.startswith(str(database)), err
    assert "sqlalchemy" not in err.lower() and "database or disk is full" not in err, err

    # Nothing lost: the file is intact and holds the earlier run; the interrupted run stays as far as it was
    # recorded (Running: its final state could not be written). Space freed, the next run completes.
    (small_disk / "filler").unlink()
    during = recorded_runs(database)
    assert during.items() >= before.items() and len(during) == 2, during
    code, err, _ = fleet_status(env)
    assert code == 0, err
    after = recorded_runs(database)
    assert len(after) == 3 and list(after.values()).count("COMPLETED") == 2, after
