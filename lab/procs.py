"""Background daemons of the lab: start detached, remember by pid file, stop for good.

Every lab process (etcd, kube-apiserver, sshd, slurmctld, prometheus, ...) outlives the `gpuforge lab up`
command that started it, so each one is started in its own session with its output in a log file and its
pid in `<workdir>/run/<name>.pid`. `stop` kills the whole process group, so nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def pid_file(workdir: Path, name: str) -> Path:
    return workdir / "run" / f"{name}.pid"


def log_file(workdir: Path, name: str) -> Path:
    return workdir / "log" / f"{name}.log"


def read_pid(workdir: Path, name: str) -> int | None:
    try:
        return int(pid_file(workdir, name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def is_running(workdir: Path, name: str) -> bool:
    pid = read_pid(workdir, name)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def start_daemon(
    workdir: Path,
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    netns: str | None = None,
) -> int:
    """Start `argv` detached (new session), logging to log/<name>.log; returns its pid.

    With `netns`, the process runs inside that network namespace (`ip netns exec`).
    Does nothing and returns the existing pid when the daemon already runs (idempotent `lab up`).
    """
    if is_running(workdir, name):
        return read_pid(workdir, name)  # type: ignore[return-value]
    (workdir / "run").mkdir(parents=True, exist_ok=True)
    (workdir / "log").mkdir(parents=True, exist_ok=True)
    cmd = list(argv)
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with open(log_file(workdir, name), "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd or workdir,
            start_new_session=True,
        )
    pid_file(workdir, name).write_text(str(proc.pid))
    return proc.pid


def stop_daemon(workdir: Path, name: str, timeout: float = 10.0) -> None:
    """SIGTERM the daemon's process group, SIGKILL what is left after `timeout`, forget its pid."""
    pid = read_pid(workdir, name)
    if pid is not None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and is_running(workdir, name):
                time.sleep(0.05)
            if not is_running(workdir, name):
                break
        _reap(pid)
    pid_file(workdir, name).unlink(missing_ok=True)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_for_log(workdir: Path, name: str, needle: str, timeout: float) -> str:
    """Wait until the daemon's log contains `needle`; returns the matching line.

    Raises RuntimeError with the log's tail when the daemon dies or the time runs out.
    """
    deadline = time.monotonic() + timeout
    path = log_file(workdir, name)
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
        if not is_running(workdir, name):
            break
        time.sleep(0.1)
    tail = path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"
    state = "exited" if not is_running(workdir, name) else f"did not log {needle!r} within {timeout:.0f}s"
    raise RuntimeError(f"lab daemon {name} {state}; last log lines:\n{tail}")
