"""The upgrade's Kubernetes steps (gpuforge.upgrade_steps.kubernetes_steps), carried out for flows/upgrade.py.

Before any step: Kubespray at each release the plan names (its checkout and venv), the playbook beside the
cluster playbook (Kubespray's upgrade-cluster.yml, or the site's `<prefix>upgrade-cluster.yml`), the inventory
written, every host's SSH key checked, the fact cache holding every host (`--limit` runs need the others' facts).

A step: upgrade-cluster.yml `-e kube_version=<step> --limit <hosts>` through that Kubespray's venv, then its hosts
Ready at the new kubelet version. A node step takes its node out of service first: a GPU node the Slurm way (its
Slurm node drained with the reason, its running jobs waited for; the jobs that hold it are named), then cordoned
(one mechanism with remediation: flows.common.act_on_both_sides), then its pods evicted through the Eviction API so
PodDisruptionBudgets are respected (DaemonSet and NodeSet pods stay, gpuforge.drain_room) -- one drain timeout per
node bounds the Slurm wait and the evictions. Kubespray then neither drains nor uncordons it (it does both only for
a node that was schedulable); the control-plane step leaves the drain of its hosts to Kubespray. After the playbook
a GPU node is re-validated (flows.node.validate_node: DCGM series, a Slurm GPU job on it or a CUDA smoke pod); only
then is a node resumed and uncordoned. A node whose step fails stays cordoned (and drained), with the reason on
both sides. Whether the cluster has room for every drain was judged in the pre-check (gpuforge.drain_room).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prefect import get_run_logger

from flows.common import act_on_both_sides, change_node, publish_table, state_dir
from flows.kubespray import beside_cluster_playbook, run_failure, warm_fact_cache, what_ran
from flows.node import slurm_name, validate_node
from gpuforge import remediation
from gpuforge import upgrade_steps as steps
from gpuforge.config import Config
from gpuforge.desired import DesiredState
from gpuforge.node_lifecycle import KUBESPRAY_UPGRADE
from gpuforge.plan import write_plan
from gpuforge.remediation import CORDON, DRAIN_SLURM, RESUME_SLURM, UNCORDON, Action
from tasks import kube
from tasks import slurm as slurm_tasks
from tasks.ansible_tasks import log_events, prepare_kubespray, ssh_host_keys, verify_host_keys
from tasks.kubespray import run_node_playbook


@dataclass
class Kubespray:
    """What every Kubernetes step runs with, made ready before the first step."""

    inventory: Path
    fact_cache: Path
    releases: dict[str, tuple[Config, Path, Path, str]] = field(default_factory=dict)  # config, checkout, playbook, bin


def prepare(state: DesiredState, kube_steps: list[steps.Step]) -> Kubespray:
    """Kubespray for every release the steps name, the inventory, host keys and fact cache; raises
    (PreconditionFailed, RuntimeError) before anything changed."""
    config = state.config
    inventory = state_dir(config) / "inventory"
    write_plan(state, inventory)
    if refused := [v.message for v in verify_host_keys(config).values() if v.refused]:
        raise RuntimeError("; ".join(refused))
    releases = {}
    for version in dict.fromkeys(s.kube.kubespray for s in kube_steps if s.kube):
        at = _kubespray_at(config, version)
        checkout, _, binary = prepare_kubespray(at)
        releases[version] = (at, checkout, beside_cluster_playbook(at, checkout, KUBESPRAY_UPGRADE), binary)
    at, checkout, _, binary = next(iter(releases.values()))
    hosts = [n.name for n in state.nodes]
    fact_cache = warm_fact_cache(at, checkout, inventory / "hosts.yaml", binary, hosts)
    return Kubespray(inventory / "hosts.yaml", fact_cache, releases)


def _kubespray_at(config: Config, version: str) -> Config:
    """The config with Kubespray at `version`: the configured checkout and venv for the configured release, else
    that release's tag (cloned once into the cache) with a venv built from its own requirements.txt."""
    ks = config.kubespray
    if version == ks.version:
        return config
    moved = ks.model_copy(update={"version": version, "checkout": None, "venv": None})
    return config.model_copy(update={"kubespray": moved})


def run_step(step: steps.Step, state: DesiredState, kubespray: Kubespray, drain_timeout_s: float) -> dict:
    """One Kubernetes step; the row for the recap (result "done" or "failed", a timeline of what happened when)."""
    logger = get_run_logger()
    config, kubeconfig = state.config, state.config.kubeconfig_path()
    started, timeline = time.monotonic(), {}
    gpu = [n for n in step.hosts if (node := state.node(n)) is not None and node.is_gpu]
    # The nodes gpuforge drains: a node step's host; on the control-plane step only GPU nodes (the Slurm side),
    # Kubespray drains the control plane itself.
    out = list(step.hosts) if step.name == steps.KUBE_NODE_STEP else gpu
    slurm = slurm_tasks.Slurm(config, kubeconfig)
    snames = {n: slurm_name(config, kubeconfig, n) if n in gpu else None for n in out}
    reason = steps.out_of_service_reason(step)

    def row(result: str, detail: str) -> dict:
        return {"step": step.title, "result": result, "seconds": round(time.monotonic() - started, 1),
                "revisions": "", "gate": "", "detail": detail[:3000], "timeline": timeline}  # fmt: skip

    def fail(name: str, why: str) -> dict:
        note = steps.kept_out_reason(step, why)
        for node in out:  # every node the step took out stays out, the reason on both sides
            _keep_out(kubeconfig, slurm, node, snames[node], note, logger.warning)
        sides = "cordoned, Slurm drained" if any(snames.values()) else "cordoned"
        kept = f"; {', '.join(out)} kept out of service ({sides}): {note}" if out else ""
        return row("failed", f"{name}: {why}{kept}")

    # 1. Out of service: Slurm drained and its jobs waited for (GPU nodes), cordoned, then its pods evicted
    #    (PodDisruptionBudgets respected); one drain timeout per node bounds the wait and the evictions.
    if lost := [n for n in gpu if state.node(n).in_slurm and snames[n] is None]:
        return row("failed", f"Slurm has no node for {', '.join(lost)} (is its NodeSet pod running?): not touched")
    for node in out:
        deadline = time.monotonic() + drain_timeout_s
        if error := _take_out(kubeconfig, slurm, node, snames[node], reason, logger.info):
            return fail(node, f"could not take it out of service: {error}")
        timeline[f"{node} out of service"] = _now()
        if snames[node]:
            try:
                waited = slurm_tasks.wait_for_jobs(slurm, snames[node], drain_timeout_s)
            except RuntimeError as exc:
                return fail(node, f"its Slurm jobs could not be read: {exc}")
            timeline[f"{node} jobs done"] = _now()
            logger.info("%s: %s", node, waited.detail)
            if not waited.proceed:
                return fail(node, waited.detail.split(";")[0])
        if step.name == steps.KUBE_NODE_STEP:
            if blocked := kube.evict_pods(kubeconfig, node, max(deadline - time.monotonic(), 0.0), logger.info):
                why = f"PodDisruptionBudgets keep {', '.join(blocked)} at the end of the {drain_timeout_s:.0f}s drain"
                return fail(node, why)
            timeline[f"{node} drained"] = _now()

    # 2. upgrade-cluster.yml on the step's hosts, then Ready at the new version.
    at, checkout, playbook, binary = kubespray.releases[step.kube.kubespray]
    timeline["kubespray started"] = _now()
    run = run_node_playbook(
        at, checkout, playbook, kubespray.inventory, binary,
        fact_cache=kubespray.fact_cache, limit=",".join([*step.hosts, "localhost"]),
        on_event=log_events(logger), host_keys=ssh_host_keys(at), extravars={"kube_version": step.kube.to},
    )  # fmt: skip
    did = what_ran(at, run, checkout, playbook)
    publish_table("kubespray-recap", run.recap(), f"Kubespray {playbook.name} --limit {','.join(step.hosts)} ({did})")
    if why := run_failure(run, playbook.name):
        return fail(",".join(step.hosts), why)
    timeline["kubespray done"] = _now()
    try:
        kube.wait_for(
            f"{', '.join(step.hosts)} Ready at {step.kube.to}",
            kube.nodes_ready_probe(kubeconfig, list(step.hosts), step.kube.to),
            config.timeouts.kubespray,
            log=logger.info,
        )
    except kube.WaitTimeout as exc:
        return fail(",".join(step.hosts), str(exc))
    timeline["ready at the new version"] = _now()

    # 3. GPU nodes re-validated, then every node taken out back into service (Slurm resumed, uncordoned).
    checked = []
    for node in out:
        if node in gpu:
            ok, how, detail = validate_node(state, kubeconfig, node)
            checked.append(f"{node} {how}: {detail}")
            if not ok:
                return fail(node, f"re-validation failed ({how}): {detail}")
        undo = steps.kept_out_reason(step, "returning it to service failed half-way")
        if error := _put_back(kubeconfig, slurm, node, snames[node], undo, logger.info):
            return fail(node, f"could not return it to service: {error}")
        timeline[f"{node} in service"] = _now()
    return row("done", f"{step.detail}: {did}; Ready at {step.kube.to}" + "".join(f"; {c}" for c in checked))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _both_sides(kubeconfig: Path, slurm, actions: list[Action], log: Callable[[str], None], **undo) -> str | None:
    """The actions through the one cordon/drain mechanism (Slurm first, a failure undone); None or the error."""
    node = actions[0].node
    if act_on_both_sides(remediation.steps_per_node(actions, **undo)[node], change_node(kubeconfig, slurm), log):
        return None
    return "; ".join(a.detail for a in actions if a.status == "failed")


def _take_out(kubeconfig: Path, slurm, node: str, sname: str | None, reason: str, log) -> str | None:
    actions = [Action(node, CORDON, reason, annotation=reason)]
    if sname:
        actions.append(Action(node, DRAIN_SLURM, reason, sname, slurm_reason=reason))
    return _both_sides(kubeconfig, slurm, actions, log)


def _put_back(kubeconfig: Path, slurm, node: str, sname: str | None, reason: str, log) -> str | None:
    """Resume (unless the validation job already did, inside its reservation) and uncordon."""
    actions = [Action(node, UNCORDON, "back in service")]
    if sname and slurm.nodes()[sname].out_of_service:
        actions.append(Action(node, RESUME_SLURM, "back in service", sname))
    return _both_sides(kubeconfig, slurm, actions, log, cordon_note=reason, drain_reason=reason)


def _keep_out(kubeconfig: Path, slurm, node: str, sname: str | None, reason: str, log) -> None:
    """Cordoned and Slurm-drained with `reason`, whatever the node's state was (a validation job may have resumed
    it); a side that cannot be set is logged, the step has failed anyway."""
    for change in [remediation.Change(CORDON, node, reason)] + (
        [remediation.Change(DRAIN_SLURM, sname, reason)] if sname else []
    ):
        try:
            change_node(kubeconfig, slurm)(change)
            log(str(change))
        except Exception as exc:  # noqa: BLE001 - the step's failure is reported; this one is added to the log
            log(f"could not keep {node} out ({change.kind}): {exc}: fix by hand")
