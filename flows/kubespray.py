"""Phase 2, kubespray: converge Kubernetes with Kubespray's cluster.yml (or kubespray.playbook), then wait for
every node Ready."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from prefect import flow, get_run_logger

from flows.common import (
    ClusterParams,
    PreconditionFailed,
    desired_state,
    publish_markdown,
    publish_table,
    run_name,
    state_dir,
)
from gpuforge import node_lifecycle
from gpuforge.config import Config
from gpuforge.node_lifecycle import NodeRefused
from gpuforge.plan import write_plan
from gpuforge.render import CONTAINERD_IMPORTS
from tasks.ansible import PlaybookRun
from tasks.ansible_tasks import log_events, prepare_kubespray, run_kubespray, ssh_host_keys, verify_host_keys
from tasks.kube import nodes_converged, nodes_ready_probe, wait_for
from tasks.kubespray import cached_fact_hosts, run_node_playbook, what_kubespray_did


class KubesprayParams(ClusterParams):
    force: bool = False


@flow(name="kubespray", flow_run_name=run_name("kubespray"))
def kubespray(params: KubesprayParams) -> str:
    logger = get_run_logger()
    state = desired_state(params, connects=True)
    config = state.config
    names, version = [n.name for n in state.nodes], config.kubespray.kube_version
    kubeconfig = config.kubeconfig_path()
    if not params.force and nodes_converged(kubeconfig, names, version):
        return f"skipped: all {len(names)} nodes Ready at {version} (use --force-phase kubespray to re-run)"

    inventory_dir = state_dir(config) / "inventory"
    write_plan(state, inventory_dir)
    # A host whose SSH key changed gets no CA keys, certificates or kubeconfigs: refuse before Kubespray runs.
    if refused := [v.message for v in verify_host_keys(config).values() if v.refused]:
        raise RuntimeError("; ".join(refused))
    checkout, playbook, binary = prepare_kubespray(config)
    run = run_kubespray(config, checkout, playbook, inventory_dir / "hosts.yaml", binary)
    did = what_ran(config, run, checkout, playbook)
    publish_table("kubespray-recap", run.recap(), f"Kubespray PLAY RECAP, a row per host ({did})")
    raise_unless_ok(run, "Kubespray")

    admin_conf = inventory_dir / "artifacts" / "admin.conf"  # written by kubeconfig_localhost: true
    if admin_conf.exists() and admin_conf.resolve() != kubeconfig.resolve():
        kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(admin_conf, kubeconfig)
    wait_for(
        f"{len(names)} nodes Ready at {version}",
        nodes_ready_probe(kubeconfig, names, version),
        config.timeouts.kubespray,
        log=logger.info,
    )
    publish_markdown(
        "kubespray-summary",
        f"Kubernetes {version} converged on {len(names)} nodes: {did} (playbook `{playbook}`).\n\n"
        f"containerd keeps `{CONTAINERD_IMPORTS}` so a re-run of cluster.yml does not remove the NVIDIA runtime "
        "the GPU Operator's toolkit adds (kubespray#12277).\n",
        "Kubespray phase summary",
    )
    return f"converged {len(names)} nodes at {version}: {did}"


def what_ran(config: Config, run: PlaybookRun, checkout: Path, playbook: Path) -> str:
    """What a Kubespray run did: for an operator's own playbook, from the roles of Kubespray's checkout that ran."""
    ks = config.kubespray
    return (
        what_kubespray_did(run, checkout, ks.version)
        if ks.own_playbook()
        else f"Kubespray {ks.version} {playbook.name}"
    )


def beside_cluster_playbook(config: Config, checkout: Path, kubespray_name: str) -> Path:
    """Kubespray's playbook `kubespray_name` (scale.yml, remove-node.yml, upgrade-cluster.yml) from the checkout,
    or, for an operator's own kubespray.playbook `<prefix>cluster.yml`, its `<prefix><kubespray_name>` beside it."""
    ks = config.kubespray
    try:
        rel = node_lifecycle.node_playbook(ks.playbook, ks.own_playbook(), kubespray_name)
    except NodeRefused as exc:
        raise PreconditionFailed(str(exc)) from None
    playbook = config.path(rel) if ks.own_playbook() else checkout / rel
    if not playbook.is_file():
        raise PreconditionFailed(f"no {kubespray_name} for kubespray.playbook {ks.playbook}: {playbook} is missing")
    return playbook


def warm_fact_cache(config: Config, checkout: Path, inventory: Path, binary: str, hosts: list[str]) -> Path:
    """The cluster's fact cache (Kubespray's `--limit` runs read the facts of the hosts they leave out there),
    filled by Kubespray's facts.yml over every host first when it lacks one of `hosts`."""
    logger = get_run_logger()
    fact_cache = node_lifecycle.fact_cache_dir(config.cluster_name)
    uncached = sorted(set(hosts) - cached_fact_hosts(fact_cache, time.time()))
    if uncached:
        logger.info("fact cache lacks %s: Kubespray's facts.yml over every host first (once)", ", ".join(uncached))
        facts_run = run_node_playbook(
            config, checkout, checkout / "playbooks" / "facts.yml", inventory, binary,
            fact_cache=fact_cache, on_event=log_events(logger), host_keys=ssh_host_keys(config),
        )  # fmt: skip
        raise_unless_ok(facts_run, "Kubespray facts.yml")
    return fact_cache


def run_failure(run: PlaybookRun, what: str) -> str | None:
    """None for a Kubespray run that succeeded, else what went wrong: the hosts unreachable and the tasks failed."""
    if run.status == "successful":
        return None
    failed = [
        f"{h} ({t.task}: {t.message})" for h, tasks in sorted(run.hosts.items()) for t in tasks if t.status == "failed"
    ]
    return (
        f"{what} {run.status} (rc {run.rc}); unreachable: {', '.join(run.unreachable) or 'none'}; "
        f"failed: {', '.join(failed) or 'none'}"
    )


def raise_unless_ok(run: PlaybookRun, what: str) -> None:
    """A Kubespray run that did not succeed fails the flow, naming the hosts unreachable and the tasks failed."""
    if why := run_failure(run, what):
        raise RuntimeError(why)
