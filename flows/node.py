"""Node lifecycle: add, remove and replace a node, GPU- and Slurm-aware, at the cost of that node only.

add (`gpuforge node add`, or `install` finding worker nodes in the config that the running cluster lacks):
  1. preflight and host keys on the new hosts only;
  2. Kubespray's scale.yml limited to them, the other hosts' facts read from the fact cache kept with the
     cluster's state (warmed once with Kubespray's facts.yml when it lacks a host);
  3. each new node Ready at the pin, and cordoned at once: it takes no work before it is validated;
  4. GPU nodes: GPU Operator labels and allocatable GPUs; Slurm members: the NodeSets follow the config
     (Helm) and the Slurm node is drained with the reason;
  5. validation: DCGM series present, then a Slurm GPU job (NodeSet members) or a CUDA smoke pod (others);
  6. validated nodes are resumed and uncordoned; a node that failed stays out, with the reason on both sides.
remove (`gpuforge node remove`): refusals first (last control plane, first control plane/etcd host, etcd quorum),
  then cordon, Slurm drain and wait for its jobs (`--force` goes on after the timeout), evictions that respect
  PodDisruptionBudgets, Kubespray's remove-node.yml for the host (`reset_nodes=false` when it is dead), the Node
  deleted, the NodeSets converged on the config without it.
replace (`gpuforge node replace`): remove the old machine, add the new one under the same name and labels.
Every operation holds the cluster's lock, as install does.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from ruamel.yaml import YAML

from flows.common import (
    ClusterParams,
    PreconditionFailed,
    cluster_lock,
    desired_state,
    publish_markdown,
    publish_table,
    run_name,
    state_dir,
)
from flows.gpu_operator import wait_for_gpus
from flows.kubespray import beside_cluster_playbook, raise_unless_ok, warm_fact_cache, what_ran
from gpuforge import desired, node_lifecycle
from gpuforge import preflight as preflight_rules
from gpuforge.config import Config
from gpuforge.desired import DesiredState
from gpuforge.node_lifecycle import ADD_REASON, REMOVE_REASON, SMOKE_FAILED_REASON, NodeRefused
from gpuforge.plan import dump_yaml, write_plan
from gpuforge.render import render_inventory
from tasks import kube, prometheus
from tasks import slurm as slurm_tasks
from tasks.ansible_tasks import collect_preflight_facts, log_events, prepare_kubespray, ssh_host_keys, verify_host_keys
from tasks.helm import converge_service
from tasks.hostkeys import scan_host_keys
from tasks.kubespray import run_node_playbook


class NodeAddParams(ClusterParams):
    nodes: list[str] = []  # empty: every config node the cluster lacks


class NodeRemoveParams(ClusterParams):
    node: str
    force: bool = False
    drain_timeout_s: float = 600
    dead: bool = False  # the host no longer answers: Kubespray resets nothing there (reset_nodes=false)


class NodeReplaceParams(ClusterParams):
    node: str
    force: bool = False
    drain_timeout_s: float = 600


# ------------------------------------------------------------------------------------------------------ add


@flow(name="node-add", flow_run_name=run_name("node-add"))
def node_add(params: NodeAddParams) -> list[dict]:
    state = desired_state(params, connects=True)
    with cluster_lock(state.cluster, "node operation"):
        return add_nodes(state, params.nodes)


@flow(name="node-add", flow_run_name=run_name("node-add"))
def add_for_install(params: NodeAddParams) -> list[dict]:
    """`install`'s step for the config nodes a running cluster lacks (node_lifecycle.joining_nodes): the add
    runbook under the cluster lock install holds, on the desired state it hands down."""
    return add_nodes(desired_state(params), params.nodes)


def add_nodes(state: DesiredState, names: list[str], replacing: str | None = None) -> list[dict]:
    """The add runbook (the caller holds the cluster lock); a row per new node. `replacing`: the node whose new
    machine this is (its address differs from the installed inventory's on purpose)."""
    logger = get_run_logger()
    config = state.config
    kubeconfig = config.kubeconfig_path()
    registered = set(kube.list_nodes(kubeconfig))
    try:
        new = [node_lifecycle.config_node(state, n) for n in names] or node_lifecycle.missing_nodes(state, registered)
    except NodeRefused as exc:
        raise PreconditionFailed(str(exc)) from None
    if already := [n.name for n in new if n.name in registered]:
        raise PreconditionFailed(
            f"already in the cluster: {', '.join(already)}. A node kept out after a failed validation goes back "
            "into service with `gpuforge health --release NAME` (validated again first)"
        )
    if not new:
        return [{"node": "-", "result": "nothing to add", "detail": "every config node is registered"}]
    if refused := node_lifecycle.scale_refusals(new):
        raise PreconditionFailed("; ".join(refused))
    installed = node_lifecycle.inventory_hosts(_read_yaml(state_dir(config) / "inventory" / "hosts.yaml"))
    if moved := node_lifecycle.address_changes(state, installed, keep=replacing):
        raise PreconditionFailed(
            "refusing to add: the config gives installed nodes new addresses (" + "; ".join(moved) + "); a derived "
            "name follows the file order: give every node its name, or replace a machine with `node replace`"
        )
    new_names = [n.name for n in new]
    only_new = node_lifecycle.only_nodes(config, new_names)
    started = time.monotonic()
    logger.info("adding %s to %s", ", ".join(new_names), config.cluster_name)

    # 1. Preflight on the new hosts only; nothing runs on the others.
    inventory_dir = state_dir(config) / "inventory"
    write_plan(state, inventory_dir)
    host_keys = verify_host_keys(only_new)
    if refused := [v.message for v in host_keys.values() if v.refused]:
        raise PreconditionFailed("; ".join(refused))
    others = [n.name for n in config.nodes if n.name not in new_names]
    facts, unreachable = collect_preflight_facts(config, inventory_dir / "hosts.yaml", skip=others)
    results = preflight_rules.judge_preflight(only_new, facts, host_keys, unreachable)
    publish_table("preflight-report", preflight_rules.table_rows(results), f"Preflight of {', '.join(new_names)}")
    if failures := preflight_rules.blocking_failures(results):
        raise RuntimeError(
            f"preflight of the new nodes found {len(failures)} blocking problem(s): " + "; ".join(failures)
        )

    # 2. Kubespray's scale.yml, limited to the new hosts, on cached facts.
    checkout, _, binary = prepare_kubespray(config)
    fact_cache = warm_fact_cache(config, checkout, inventory_dir / "hosts.yaml", binary, others)
    playbook = beside_cluster_playbook(config, checkout, node_lifecycle.KUBESPRAY_SCALE)
    run = run_node_playbook(
        config, checkout, playbook, inventory_dir / "hosts.yaml", binary,
        fact_cache=fact_cache, limit=",".join([*new_names, "localhost"]),
        on_event=log_events(logger), host_keys=ssh_host_keys(config),
    )  # fmt: skip
    did = what_ran(config, run, checkout, playbook)
    publish_table("kubespray-recap", run.recap(), f"Kubespray {playbook.name} --limit {','.join(new_names)} ({did})")
    raise_unless_ok(run, f"Kubespray {playbook.name}")

    # 3. Ready at the pin, then out of service until validated.
    version = config.kubespray.kube_version
    kube.wait_for(
        f"{', '.join(new_names)} Ready at {version}",
        kube.nodes_ready_probe(kubeconfig, new_names, version),
        config.timeouts.kubespray,
        log=logger.info,
    )
    for name in new_names:
        kube.set_cordon(kubeconfig, name, True, ADD_REASON)

    # 4. GPUs offered (a count the config leaves open recorded, as the gpu-operator phase does); Slurm NodeSets
    #    follow the config, the new Slurm nodes drained with the reason.
    gpu_new = [n.name for n in new if n.is_gpu]
    if gpu_new and config.enabled("gpu-operator"):
        wait_for_gpus(state, kubeconfig, gpu_new, logger.info)
    state = _with_recorded_gpus(state, kubeconfig)
    members = [n.name for n in new if n.in_slurm]
    slurm = slurm_tasks.Slurm(config, kubeconfig)
    if members:
        converge_service(state, "slurm", kubeconfig, config.timeouts.slurm)
        for name in members:
            slurm.update(_member_slurm_name(config, kubeconfig, name), "drain", ADD_REASON)

    # 5. Validation, 6. back into service or kept out with the reason.
    rows = []
    for name in new_names:
        ok, how, detail = validate_node(state, kubeconfig, name)
        if ok:
            if name in members:
                sname = _member_slurm_name(config, kubeconfig, name)
                if slurm.nodes()[sname].out_of_service:  # the validation job may have resumed it already
                    slurm.update(sname, "resume")
            kube.set_cordon(kubeconfig, name, False, None)
        else:
            reason = f"{SMOKE_FAILED_REASON}: {detail}"[:200]
            kube.set_cordon(kubeconfig, name, True, reason)
            if name in members:
                slurm.update(_member_slurm_name(config, kubeconfig, name), "drain", reason)
        rows.append({"node": name, "result": "in service" if ok else "kept out", "validation": how, "detail": detail})
        logger.info("%s: %s (%s: %s)", name, rows[-1]["result"], how, detail)
    publish_table("node-add-report", rows, f"node add on {config.cluster_name}: a row per new node")
    publish_markdown(
        "node-add-summary",
        f"Added {len(rows)} node(s) to `{config.cluster_name}` in {time.monotonic() - started:.1f}s: {did}.\n\n"
        + "\n".join(f"- **{r['node']}** {r['result']}: {r['validation']}: {r['detail']}" for r in rows),
        "node add",
    )
    if kept := [r for r in rows if r["result"] != "in service"]:
        raise RuntimeError(
            "kept out of service (cordoned, Slurm-drained): " + "; ".join(f"{r['node']}: {r['detail']}" for r in kept)
        )
    return rows


def _with_recorded_gpus(state: DesiredState, kubeconfig) -> DesiredState:
    """The desired state with the GPU counts recorded on the nodes for those the config leaves open (what the
    Slurm NodeSets and the checks go by: desired.py)."""
    config = state.config
    return desired.build(config, desired.learned_gpu_counts(config, kube.list_nodes(kubeconfig)))


def validate_node(state: DesiredState, kubeconfig, name: str) -> tuple[bool, str, str]:
    """(passed, how, detail) for one node out of service (a new one, or one just upgraded). A CPU node needs Ready
    only (checked by the caller). A GPU node: its DCGM series first, then a 1-GPU Slurm job pinned to it (a
    NodeSet's slurmd holds its GPUs) or a CUDA smoke pod."""
    config, node = state.config, state.node(name)
    if not node.is_gpu:
        return True, "Ready", "CPU node: Ready at the pin"
    if config.enabled("monitoring_stack"):
        dcgm = prometheus.dcgm_coverage(config, {name: node.expected_gpus or 1}, state.metrics)
        if bad := [r for r in dcgm if r.result != "pass"]:
            return False, "DCGM series", "; ".join(f"{r.target}: {r.detail}" for r in bad)[:400]
    if node.in_slurm:
        sname = _member_slurm_name(config, kubeconfig, name)
        snode = slurm_tasks.Slurm(config, kubeconfig).nodes().get(sname)
        ok, detail = slurm_tasks.revalidate_with_job(config, kubeconfig, sname, snode, [], get_run_logger().info)
        return ok, f"Slurm job on {sname}", detail
    ok, detail = kube.revalidate_with_smoke_pod(config, kubeconfig, name)
    return ok, "CUDA smoke pod", detail


# --------------------------------------------------------------------------------------------------- remove


@flow(name="node-remove", flow_run_name=run_name("node-remove"))
def node_remove(params: NodeRemoveParams) -> dict:
    state = desired_state(params, connects=True)
    with cluster_lock(state.cluster, "node operation"):
        return remove_node(state, params.node, force=params.force, timeout_s=params.drain_timeout_s, dead=params.dead)


def remove_node(
    state: DesiredState, name: str, *, force: bool, timeout_s: float, dead: bool, replacing: bool = False
) -> dict:
    """The remove runbook (the caller holds the cluster lock). `replacing`: the config names `name` on purpose,
    with its new machine's address; the old machine's is in the installed inventory."""
    logger = get_run_logger()
    config = state.config
    kubeconfig = config.kubeconfig_path()
    started = time.monotonic()
    inventory_dir = state_dir(config) / "inventory"
    installed = node_lifecycle.inventory_hosts(_read_yaml(inventory_dir / "hosts.yaml"))
    nodes = kube.list_nodes(kubeconfig)
    still_in_config = state.node(name) is not None and not replacing
    check = node_lifecycle.removal_check(name, installed, {n: s.ready for n, s in nodes.items()}, still_in_config)
    if moved := node_lifecycle.address_changes(state, installed, keep=name if replacing else None):
        check.refusals.append(
            "the config gives other nodes new addresses (" + "; ".join(moved) + "): derived names follow the "
            "file order, so removing a node from the middle renamed the ones after it. Give every node its name"
        )
    if check.refusals:
        raise PreconditionFailed(f"refusing to remove {name}: " + "; ".join(check.refusals))
    for warning in check.warnings:
        logger.warning("%s", warning)
    steps: list[dict] = []

    def step(what: str, detail: str) -> None:
        steps.append({"step": what, "detail": detail})
        logger.info("%s: %s", what, detail)

    # Cordon, then Slurm drain and wait for the jobs on it. One drain timeout bounds the wait and the evictions.
    drain_deadline = time.monotonic() + timeout_s
    if name in nodes:
        kube.set_cordon(kubeconfig, name, True, REMOVE_REASON)
        step("cordon", f"{name} cordoned: {REMOVE_REASON}")
    slurm = slurm_tasks.Slurm(config, kubeconfig)
    sname = slurm_name(config, kubeconfig, name)
    if sname:
        slurm.update(sname, "drain", REMOVE_REASON)
        verdict = slurm_tasks.wait_for_jobs(slurm, sname, timeout_s, force)
        step("slurm drain", f"{sname} drained; {verdict.detail}")
        if not verdict.proceed:
            publish_table("node-remove-report", steps, f"removal of {name} (stopped)")
            raise RuntimeError(f"{name} not removed: {verdict.detail}")
    else:
        step("slurm drain", "not a Slurm node")

    # Evict what runs there, respecting PodDisruptionBudgets; its slurmd too (the node leaves Slurm with it).
    if name in nodes:
        left_s = max(drain_deadline - time.monotonic(), 0.0)
        blocked = kube.evict_pods(kubeconfig, name, left_s, logger.info, staying={"DaemonSet"})
        if blocked and not force:
            publish_table("node-remove-report", steps, f"removal of {name} (stopped)")
            raise RuntimeError(
                f"{name} not removed: PodDisruptionBudgets keep {', '.join(blocked)} at the end of the "
                f"{timeout_s:.0f}s drain timeout; the node stays cordoned. Scale the workloads elsewhere or pass "
                "--force"
            )
        step("evict", f"blocked pods left behind (--force): {', '.join(blocked)}" if blocked else "no pods left")

    # Kubespray's remove-node.yml for the host, with the inventory that still names it.
    host = installed[name]
    remove_inventory = state_dir(config) / f"remove-{name}" / "hosts.yaml"
    write_plan(state, remove_inventory.parent)  # group_vars of the cluster as configured now
    remove_inventory.write_text(dump_yaml(node_lifecycle.with_host(render_inventory(config), host)))
    checkout, _, binary = prepare_kubespray(config)
    playbook = beside_cluster_playbook(config, checkout, node_lifecycle.KUBESPRAY_REMOVE)
    run = run_node_playbook(
        config, checkout, playbook, remove_inventory, binary,
        fact_cache=node_lifecycle.fact_cache_dir(config.cluster_name),
        on_event=log_events(logger), host_keys=ssh_host_keys(config),
        extravars={"node": name, "skip_confirmation": True, "reset_nodes": not dead,
                   "allow_ungraceful_removal": force or dead},
    )  # fmt: skip
    did = what_ran(config, run, checkout, playbook)
    publish_table("kubespray-recap", run.recap(), f"Kubespray {playbook.name} -e node={name} ({did})")
    raise_unless_ok(run, f"Kubespray {playbook.name}")
    step("kubespray", f"{playbook.name} -e node={name} reset_nodes={not dead}: {did}")
    if kube.delete_node(kubeconfig, name):
        step("delete node", f"Node {name} deleted")
    write_plan(state, inventory_dir)  # the installed inventory without it: later rules count what is left
    if sname:
        step("slurm node", slurm_tasks.delete_node(slurm, sname))
    (node_lifecycle.fact_cache_dir(config.cluster_name) / name).unlink(missing_ok=True)

    # The NodeSets follow the config (the node's replica goes) and its Slurm node leaves with its slurmd.
    if sname:
        outcomes = converge_service(_with_recorded_gpus(state, kubeconfig), "slurm", kubeconfig, config.timeouts.slurm)
        step("slurm nodesets", ", ".join(f"{o.release} {o.action}" for o in outcomes))
    report = {"node": name, "removed": True, "warnings": check.warnings, "steps": steps,
              "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    publish_table("node-remove-report", steps, f"removal of {name} from {config.cluster_name}")
    return report


# -------------------------------------------------------------------------------------------------- replace


@flow(name="node-replace", flow_run_name=run_name("node-replace"))
def node_replace(params: NodeReplaceParams) -> dict:
    """The machine of `node` is swapped for the one the config now gives that name (a new address): the old
    one goes as `remove` takes a node (its host is usually dead: reset_nodes=false when it does not answer),
    then the new one is added under the same name and labels, validated before it takes work."""
    state = desired_state(params, connects=True)
    config = state.config
    try:
        new = node_lifecycle.config_node(state, params.node)
    except NodeRefused as exc:
        raise PreconditionFailed(str(exc)) from None
    if refused := node_lifecycle.scale_refusals([new]):  # before anything goes: the new machine must be able to join
        raise PreconditionFailed("; ".join(refused))
    installed = node_lifecycle.inventory_hosts(_read_yaml(state_dir(config) / "inventory" / "hosts.yaml"))
    old = installed.get(params.node)
    if old is None or old.vars.get("ansible_host") == new.ip:
        raise PreconditionFailed(
            f"{params.node} keeps its address {new.ip} in the config: to replace its machine, set the new "
            "machine's address as its ip in k8s_cluster_nodes (same name, labels and roles), then run replace"
        )
    with cluster_lock(state.cluster, "node operation"):
        old_address = old.vars.get("ansible_host", "")
        dead = not scan_host_keys([old_address]).get(old_address)  # its sshd offers no key: the machine is gone
        removed = remove_node(
            state, params.node, force=params.force, timeout_s=params.drain_timeout_s, dead=dead, replacing=True
        )
        added = add_nodes(state, [params.node], replacing=params.node)
    return {"node": params.node, "old_address": old.vars.get("ansible_host"), "new_address": new.ip,
            "removed": removed, "added": added}  # fmt: skip


# ------------------------------------------------------------------------------------------------- helpers


def slurm_name(config: Config, kubeconfig, name: str) -> str | None:
    """Kubernetes node -> its Slurm node (same name, or the slurmd pod on it); None: Slurm has none (or is off)."""
    _, names, error = slurm_tasks.slurm_state(config, kubeconfig, [name])
    if error:
        raise RuntimeError(error)
    return names.get(name)


def _member_slurm_name(config: Config, kubeconfig, name: str) -> str:
    found = slurm_name(config, kubeconfig, name)
    if found is None:
        raise RuntimeError(
            f"Slurm has no node for {name} (neither that name nor a slurmd pod on it): is its NodeSet pod running?"
        )
    return found


def _read_yaml(path) -> dict:
    if not path.is_file():
        return {}
    return YAML(typ="safe").load(path.read_text()) or {}
