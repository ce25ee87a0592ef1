"""Prefect tasks around tasks.ansible: every Ansible event streamed into the run log as it happens."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from gpuforge.config import Config
from gpuforge.hostkeys import HostKeyVerdict
from gpuforge.preflight import unreachable_reason
from tasks.ansible import PlaybookRun, describe_event, run_playbook
from tasks.hostkeys import check_host_keys, known_hosts_files
from tasks.kubespray import kubespray_venv, resolve_checkout
from tasks.secrets import ssh_key_extravars

PLAYBOOKS = Path(__file__).resolve().parents[1] / "playbooks"


def log_events(logger):
    def on_event(event: dict[str, Any]) -> None:
        if line := describe_event(event):
            (logger.warning if ": failed" in line or ": unreachable" in line else logger.info)(line)

    return on_event


@task(name="host-keys", cache_policy=NO_CACHE)
def verify_host_keys(config: Config) -> dict[str, HostKeyVerdict]:
    """Node name -> verdict on the SSH host key it offers now (ssh_host_key_checking); new keys are pinned under
    accept-new. A refused node is named with both fingerprints; nothing may run there."""
    logger = get_run_logger()
    verdicts = check_host_keys(config)
    for verdict in verdicts.values():
        if verdict.refused:
            logger.error("%s", verdict.message)
        elif verdict.status == "new":
            logger.warning("%s; pinned in %s", verdict.message, known_hosts_files(config)[0])
    return verdicts


def ssh_host_keys(config: Config) -> dict[str, Any]:
    """run_playbook's host-key arguments for this cluster."""
    return {"host_key_checking": config.ssh_host_key_checking, "known_hosts": known_hosts_files(config)}


@task(name="preflight-facts", cache_policy=NO_CACHE)
def collect_preflight_facts(
    config: Config, inventory: Path, skip: list[str] | None = None
) -> tuple[dict[str, dict[str, Any] | None], dict[str, str]]:
    """(node name -> facts the preflight playbook reported, None for a node it could not reach or was told to
    `skip` (nothing runs there); node name -> why SSH could not reach it)."""
    logger = get_run_logger()
    facts: dict[str, dict[str, Any] | None] = {n.name: None for n in config.nodes}
    unreachable: dict[str, str] = {}
    if skip and set(skip) >= set(facts):
        return facts, unreachable
    with ssh_key_extravars(config) as key_vars:
        run = run_playbook(
            playbook=PLAYBOOKS / "preflight.yml",
            inventory=inventory,
            extravars=key_vars,
            timeout_s=config.timeouts.preflight,
            on_event=log_events(logger),
            limit=":".join(["all", *(f"!{name}" for name in skip)]) if skip else None,
            **ssh_host_keys(config),
        )
    for host, results in run.hosts.items():
        for result in results:
            if result.task == "Report preflight facts" and "gpuforge_preflight" in result.result:
                facts[host] = result.result["gpuforge_preflight"]
            if result.status == "unreachable":
                unreachable.setdefault(host, unreachable_reason(result.message))
    logger.info(
        "preflight playbook %s (rc %s); facts from %d/%d nodes",
        run.status,
        run.rc,
        sum(f is not None for f in facts.values()),
        len(facts),
    )
    return facts, unreachable


def count_plays(playbook: Path, variables: dict[str, str] | None = None) -> int:
    """Plays in a playbook, following import_playbook (whose path may name `variables`), so progress can
    advance by play."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        doc = YAML(typ="safe").load(playbook.read_text()) or []
    except (OSError, ValueError, YAMLError):  # ansible-playbook will report a broken playbook itself
        return 0
    total = 0
    for entry in doc if isinstance(doc, list) else []:
        imported = entry.get("import_playbook") or entry.get("ansible.builtin.import_playbook")
        if imported:
            imported = re.sub(r"{{\s*(\w+)\s*}}", lambda m: (variables or {}).get(m[1], m[0]), str(imported))
        if imported and "{{" not in imported:
            total += count_plays((playbook.parent / imported).resolve(), variables)
        elif "hosts" in entry:
            total += 1
    return total


@task(name="kubespray-prepare", cache_policy=NO_CACHE)
def prepare_kubespray(config: Config) -> tuple[Path, Path, str]:
    """Kubespray's checkout (checked to be kubespray.version), the playbook to run, and the ansible-playbook of
    Kubespray's own venv; checkout and venv are built into the cache the first time."""
    logger = get_run_logger()
    ks = config.kubespray
    checkout = resolve_checkout(config.path(ks.checkout) if ks.checkout else None, ks.version)
    logger.info("Kubespray %s (galaxy.yml) at %s", ks.version, checkout)
    if ks.venv:
        venv = config.path(ks.venv)
    else:
        started = time.monotonic()
        logger.info("Kubespray's venv from %s (built once per requirements.txt) ...", checkout / "requirements.txt")
        venv = kubespray_venv(checkout)
        logger.info("Kubespray's venv %s ready in %.1fs", venv, time.monotonic() - started)
    playbook = config.path(ks.playbook) if ks.own_playbook() else checkout / ks.playbook
    if not playbook.is_file():
        raise FileNotFoundError(f"kubespray.playbook {ks.playbook}: no such playbook ({playbook})")
    return checkout, playbook, str(venv / "bin" / "ansible-playbook")


@task(name="kubespray-cluster", cache_policy=NO_CACHE)
def run_kubespray(config: Config, checkout: Path, playbook: Path, inventory: Path, binary: str) -> PlaybookRun:
    """The Kubespray playbook with become, from the checkout (its ansible.cfg and roles apply); every event
    logged; progress advances by play."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    # Playbooks of the operator's own (kubespray.playbook) find the checkout, and gpuforge's kubeconfig, here.
    extravars = {"gpuforge_kubespray_dir": str(checkout), "gpuforge_kubeconfig": str(config.kubeconfig_path())}
    plays = max(count_plays(playbook, extravars), 1)
    progress_id = create_progress_artifact(0.0, key="kubespray-progress", description=f"{playbook}: plays done")
    seen = {"plays": 0}
    log = log_events(logger)

    def on_event(event: dict[str, Any]) -> None:
        log(event)
        if event.get("event") == "playbook_on_play_start":
            seen["plays"] += 1
            update_progress_artifact(progress_id, min(99.0, 100.0 * (seen["plays"] - 1) / plays))

    with ssh_key_extravars(config) as key_vars:
        run = run_playbook(
            playbook=playbook,
            inventory=inventory,
            project_dir=checkout,
            binary=binary,
            become=True,
            extravars={**extravars, **key_vars},
            skip_tags=config.kubespray.skip_tags,
            timeout_s=config.timeouts.kubespray,
            on_event=on_event,
            **ssh_host_keys(config),
        )
    if run.status == "successful":
        update_progress_artifact(progress_id, 100.0)
    return run
