"""What every `gpuforge` command shares: the --config and --json options, loading the config, one-line
failures, and running a flow in this process."""

from __future__ import annotations

import os
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
    # Each CLI run starts its own temporary server on the shared database. Leases kept in memory would die
    # with a killed run while its cluster-lock slot stays taken forever; on disk, the next run expires them.
    os.environ.setdefault(
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem"
    )


def run_flow(flow, params):
    """Run a flow in this process (an ephemeral Prefect server when no PREFECT_API_URL is set)."""
    prefect_defaults()  # for callers that bypass the entry point (click's test runner)
    return flow(params, return_state=True)


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
