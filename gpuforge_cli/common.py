"""What every `gpuforge` command shares: the --config and --json options, loading the config, one-line
failures, and running a flow in this process."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from gpuforge.config import Config, ConfigError, load_config, node_access_problems

config_option = click.option(
    "--config",
    "-c",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The cluster's config.yml (DeepOps format plus gpuforge keys).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")


def drain_timeout_option(default: float, waits_for: str):
    """`--drain-timeout SECONDS` (parameter `drain_timeout`): how long a drained node's work may hold it."""
    return click.option(
        "--drain-timeout",
        "drain_timeout",
        type=click.FloatRange(min=0),
        default=default,
        show_default=True,
        help=f"Seconds to wait for {waits_for}.",
    )


def fail(message: str, code: int = 1) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def load(path: Path, *, connects: bool = False) -> Config:
    """Load and validate the config; `connects` also checks what reaching the nodes needs (the SSH key)."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        fail(str(exc))
    if connects and (problems := node_access_problems(config)):
        fail("\n".join(str(p) for p in problems))
    return config


def prefect_defaults() -> None:
    """Quiet, offline-friendly Prefect defaults; an explicit environment always wins. Prefect reads them when it is
    first imported, so the console entry point sets them before any command runs."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pyhelm3")
    # The temporary server shares the terminal: its tracebacks (SQLAlchemy's, for a full disk) would bury the one
    # line gpuforge prints for the same failure, which its client sees as an HTTP 500. ERROR shows them again.
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    # Each CLI run starts its own temporary server on the shared database. Leases kept in memory would die
    # with a killed run while its cluster-lock slot stays taken forever; on disk, the next run expires them.
    os.environ.setdefault(
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem"
    )


# A run records its states, logs and artifacts in the Prefect database: a few MB for an install.
PREFECT_DB_MIN_FREE = 16 * 2**20


def local_prefect_database() -> Path | None:
    """The SQLite file of the temporary server CLI runs use; None when PREFECT_API_URL names a server."""
    from prefect.settings import get_current_settings
    from sqlalchemy.engine import make_url

    settings = get_current_settings()
    if settings.api.url:
        return None
    url = make_url(settings.server.database.connection_url.get_secret_value())
    return Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None


def database_disk_full(database: Path | None) -> str | None:
    """One line for a Prefect database whose disk has (nearly) no room left, else None."""
    if database is None:
        return None
    folder = next((p for p in (database.parent, *database.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free
    if free >= PREFECT_DB_MIN_FREE:
        return None
    return (
        f"{database}: the Prefect database's disk is full ({free // 2**20} MiB free in {folder}, a run needs"
        f" {PREFECT_DB_MIN_FREE // 2**20} MiB): free space there (or set PREFECT_HOME to a folder on a disk with"
        " room) and run again; runs already recorded are kept"
    )


def run_flow(flow, params):
    """Run a flow in this process (an ephemeral Prefect server when no PREFECT_API_URL is set). A full disk under
    the local Prefect database stops the command before the run (the temporary server could not even start) or
    after it (the run could not record its state): one line, exit 2."""
    prefect_defaults()  # for callers that bypass the entry point (click's test runner)
    database = local_prefect_database()
    if problem := database_disk_full(database):
        fail(problem, 2)
    try:
        state = flow(params, return_state=True)
    except Exception:
        if problem := database_disk_full(database):
            _fail_last(problem)
        raise
    if not state.is_completed() and (problem := database_disk_full(database)):
        _fail_last(problem)
    return state


def _fail_last(message: str) -> None:
    """fail(), after the run's queued log records were sent (or not, on a full disk: Prefect prints that it could
    not), so that gpuforge's line is the last one."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    fail("\n" + message, 2)  # Prefect's "Error logging to API" report ends without a newline


def state_error(state) -> BaseException | None:
    if state.is_completed():
        return None
    result = state.result(raise_on_failure=False)
    return result if isinstance(result, BaseException) else RuntimeError(state.message or state.name)


def report_of(state, finding: type[BaseException], what: str, error_code: int) -> dict:
    """The report a checking flow returned, or carried by its `finding` exception (checks that found
    something fail their run); any other failure means the check could not run: exit `error_code`."""
    error = state_error(state)
    if isinstance(error, finding):
        return error.report
    if error is not None:
        fail(f"{what} could not run: {error}", error_code)
    return state.result()
