"""Prefect tasks around tasks.ansible: every Ansible event streamed into the run log as it happens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from gpuforge.config import Config
from tasks.ansible import describe_event, run_playbook
from tasks.secrets import ssh_key_extravars

PLAYBOOKS = Path(__file__).resolve().parents[1] / "playbooks"


def log_events(logger):
    def on_event(event: dict[str, Any]) -> None:
        if line := describe_event(event):
            (logger.warning if ": failed" in line or ": unreachable" in line else logger.info)(line)

    return on_event


@task(name="preflight-facts", cache_policy=NO_CACHE)
def collect_preflight_facts(config: Config, inventory: Path) -> dict[str, dict[str, Any] | None]:
    """Node name -> facts the preflight playbook reported, None for a node it could not reach."""
    logger = get_run_logger()
    with ssh_key_extravars(config) as key_vars:
        run = run_playbook(
            playbook=PLAYBOOKS / "preflight.yml",
            inventory=inventory,
            extravars=key_vars,
            timeout_s=config.timeouts.preflight,
            on_event=log_events(logger),
        )
    facts: dict[str, dict[str, Any] | None] = {n.name: None for n in config.nodes}
    for host, results in run.hosts.items():
        for result in results:
            if result.task == "Report preflight facts" and "gpuforge_preflight" in result.result:
                facts[host] = result.result["gpuforge_preflight"]
    logger.info(
        "preflight playbook %s (rc %s); facts from %d/%d nodes",
        run.status,
        run.rc,
        sum(f is not None for f in facts.values()),
        len(facts),
    )
    return facts
