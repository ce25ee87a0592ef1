"""What every flow shares: its one parameter model, loading the config, and publishing artifacts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from gpuforge.config import Config, ConfigError, load_config, node_access_problems


class ClusterParams(BaseModel):
    """Which cluster a run is about: the path of its config.yml (relative paths from the repository root)."""

    config: str = "deployments/prod/config.yml"


class PreconditionFailed(RuntimeError):
    """The run could not start: bad config, missing key, lock held. Exit code 2 on the CLI for checks."""


def load(params: ClusterParams, *, connects: bool = False) -> Config:
    try:
        config = load_config(params.config)
    except ConfigError as exc:
        raise PreconditionFailed(str(exc)) from None
    if connects and (problems := node_access_problems(config)):
        raise PreconditionFailed("\n".join(str(p) for p in problems))
    return config


def run_name(prefix: str) -> Any:
    """flow_run_name callable: `<prefix>-<cluster name>`, read from the run's config."""

    def name() -> str:
        params = flow_run.parameters.get("params") or {}
        path = params.get("config") if isinstance(params, dict) else getattr(params, "config", None)
        try:
            cluster = load_config(path or ClusterParams().config).cluster_name
        except ConfigError:
            cluster = "bad-config"
        return f"{prefix}-{cluster}"

    return name


def state_dir(config: Config) -> Path:
    """Where gpuforge keeps a cluster's run files (inventory, Kubespray artifacts)."""
    root = Path(os.environ.get("GPUFORGE_STATE", "~/.local/state/gpuforge")).expanduser()
    path = root / config.cluster_name
    path.mkdir(parents=True, exist_ok=True)
    return path


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    create_table_artifact(table=rows or [{"result": "nothing to report"}], key=key, description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=key, description=description)
