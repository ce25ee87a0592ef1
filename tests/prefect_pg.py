"""Production-shaped Prefect for tests: a private PostgreSQL (Debian's package), a Prefect server on it and
process workers, each a context manager that always tears down what it started.

Everything listens on 127.0.0.1 only (PostgreSQL also on a Unix socket in its temporary folder); data lives
in temporary folders removed afterwards. As root, PostgreSQL runs as the `postgres` user (initdb refuses root).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def listeners(port: int) -> list[str]:
    """Local addresses listening on TCP `port` (from `ss`)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()]


@dataclass
class Postgres:
    folder: Path
    port: int
    password: str
    user: str = "prefect"
    database: str = "prefect"
    started_s: float = 0.0

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def psql(self, sql: str) -> str:
        env = {**os.environ, "PGPASSWORD": self.password}
        cmd = ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", self.database]
        done = subprocess.run([*cmd, "-Atc", sql], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


@contextmanager
def postgres():
    """A throw-away PostgreSQL cluster: initdb into a temporary folder, pg_ctl start on a free loopback port."""
    bindir = pg_bindir()
    if bindir is None:
        import pytest

        pytest.skip("PostgreSQL is not installed (scripts/setup.sh installs Debian's postgresql)")
    as_root = os.geteuid() == 0
    run_as = {"user": "postgres", "group": "postgres"} if as_root else {}
    folder = Path(tempfile.mkdtemp(prefix="gpuforge-pg-"))
    if as_root:
        pw = pwd.getpwnam("postgres")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
    pg = Postgres(folder, free_port(), secrets.token_hex(16))
    data, sock, log = folder / "data", folder / "sock", folder / "postgres.log"
    t0 = time.monotonic()

    def run(*cmd: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=folder, **run_as, **kw)

    started = False
    try:
        pwfile = folder / "pwfile"
        pwfile.write_text(pg.password + "\n")
        sock.mkdir()
        if as_root:
            for p in (pwfile, sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        init = run(
            str(bindir / "initdb"), "-D", str(data), "-U", pg.user, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        assert init.returncode == 0, init.stdout + init.stderr
        pwfile.unlink()
        # Test-only durability settings (fsync off); the listen address and port are what production sets too.
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {sock} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        start = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", opts, "start")
        started = True
        assert start.returncode == 0, start.stdout + start.stderr + _tail(log)
        env = {**os.environ, "PGPASSWORD": pg.password}
        made = subprocess.run(
            ["createdb", "-h", "127.0.0.1", "-p", str(pg.port), "-U", pg.user, pg.database],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        pg.started_s = time.monotonic() - t0
        yield pg
    finally:
        if started:
            stop = run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop")
            if stop.returncode != 0 and (pidfile := data / "postmaster.pid").exists():
                _kill_pid(int(pidfile.read_text().split()[0]))
        shutil.rmtree(folder, ignore_errors=True)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop_group(proc: subprocess.Popen, first: int = signal.SIGINT, grace: float = 15) -> None:
    """Stop a process started with start_new_session=True, and its children (flow runs, uvicorn)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, first)
            proc.wait(grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in the group (a flow run it started)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class PrefectServer:
    port: int
    home: Path
    env: dict[str, str]
    started_s: float = 0.0
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, f"prefect {' '.join(args)}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done

    @contextmanager
    def worker(self, name: str, pool: str = "gpuforge", limit: int = 4):
        """A process worker, as on a worker host: started from the repository root, stopped with SIGINT."""
        log = self.home / f"worker-{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", pool, "--name", name, "--limit", str(limit)],
                cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            yield proc
        finally:
            _stop_group(proc)

    def worker_log(self, name: str) -> str:
        return _tail(self.home / f"worker-{name}.log", 6000)


@contextmanager
def prefect_server(database_url: str, folder: Path):
    """`prefect server start` on 127.0.0.1 with its database at `database_url`; PREFECT_HOME in `folder`."""
    port = free_port()
    home = folder / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
        PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="prefect.server.concurrency.lease_storage.filesystem",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_CLI_PROMPT="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PYTHONPATH=str(REPO),  # the flow-run processes a worker starts import flows/, gpuforge/ from here
    )
    log = home / "server.log"
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = PrefectServer(port, home, env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"prefect server exited {proc.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(f"{server.api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prefect server not healthy after 180 s:\n{_tail(log)}")
            time.sleep(0.5)
        server.started_s = time.monotonic() - t0
        yield server
    finally:
        _stop_group(proc)
