"""What every flow shares: its one parameter model, loading the config, publishing artifacts, the cluster lock,
acting on both sides of a node (Kubernetes and Slurm) at once, and reading the upgrade plan (Kubernetes and Helm)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from gpuforge import desired
from gpuforge import upgrade as upgrade_plan
from gpuforge.config import Config, ConfigError, load_config, node_access_problems
from gpuforge.desired import DesiredState
from gpuforge.remediation import CORDON, DRAIN_SLURM, UNCORDON, Change, Step
from gpuforge.render import Release, chart_mirror
from gpuforge.state import cluster_state_dir
from tasks import helm, kube
from tasks.slurm import Slurm


class ClusterParams(BaseModel):
    """Which cluster a run is about: the path of its config.yml (relative paths from the repository root)."""

    config: str = "deployments/prod/config.yml"


class PreconditionFailed(RuntimeError):
    """The run could not start: bad config, missing key, lock held. Exit code 2 on the CLI for checks."""


# The desired state a run built, handed down to the phase flows it runs as subflows in its own process: the
# config is parsed once per run. Not a flow parameter: Prefect stores a flow's parameters with the run, and
# Helm values in the desired state may hold secrets.
_HANDED_DOWN: ContextVar[tuple[str, DesiredState] | None] = ContextVar("gpuforge_desired_state", default=None)


def _parse(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise PreconditionFailed(str(exc)) from None


def _handed_down(params: ClusterParams) -> DesiredState | None:
    handed = _HANDED_DOWN.get()
    return handed[1] if handed and handed[0] == params.config else None


def _build(config: Config) -> DesiredState:
    try:
        return desired.build(config)
    except ConfigError as exc:  # a values_file that is not YAML
        raise PreconditionFailed(str(exc)) from None
    except OSError as exc:  # a values_file that cannot be read
        raise PreconditionFailed(f"{config.source}: a file the config names cannot be read: {exc}") from None


def desired_state(params: ClusterParams, *, connects: bool = False) -> DesiredState:
    """The run's desired state: the one handed down by the run this flow is a phase of, else built from the
    config file (GPU counts learned at install are added by the phases that read the nodes)."""
    state = _handed_down(params) or _build(_parse(params.config))
    if connects and (problems := node_access_problems(state.config)):
        raise PreconditionFailed("\n".join(str(p) for p in problems))
    return state


@contextmanager
def handing_down(params: ClusterParams, state: DesiredState) -> Iterator[None]:
    """Phase flows run inside this block read `state` instead of parsing the config again."""
    token = _HANDED_DOWN.set((params.config, state))
    try:
        yield
    finally:
        _HANDED_DOWN.reset(token)


def run_name(prefix: str) -> Any:
    """flow_run_name callable: `<prefix>-<cluster name>`, read from the run's config."""

    def name() -> str:
        params = flow_run.parameters.get("params") or {}
        path = params.get("config") if isinstance(params, dict) else getattr(params, "config", None)
        cluster_params = ClusterParams(config=path or ClusterParams().config)
        try:
            handed = _handed_down(cluster_params)
            cluster = handed.cluster if handed else _parse(cluster_params.config).cluster_name
        except PreconditionFailed:
            cluster = "bad-config"
        return f"{prefix}-{cluster}"

    return name


def state_dir(config: Config) -> Path:
    """Where gpuforge keeps a cluster's run files (inventory, Kubespray artifacts)."""
    path = cluster_state_dir(config.cluster_name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    create_table_artifact(table=rows or [{"result": "nothing to report"}], key=key, description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=key, description=description)


# A run killed with kill -9 holds its slot until the lease expires; a live run renews it. So a re-run after
# a crash waits at most LEASE_S, and a second concurrent run gives up after LOCK_WAIT_S.
LEASE_S = 60  # the server's minimum lease
LOCK_WAIT_S = 75


@contextmanager
def cluster_lock(cluster: str, what: str) -> Iterator[None]:
    """One install (or other changing run) per cluster at a time, across processes, via a Prefect limit.

    A Prefect server expires the lease of a run that died; a CLI run's temporary server does not run that
    service. So the holder also records its host and pid, and a slot whose holder process is gone from this
    host is given back before waiting.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.concurrency._asyncio import AcquireConcurrencySlotTimeoutError
    from prefect.concurrency.sync import concurrency
    from prefect.variables import Variable

    name = f"cluster-{cluster}"
    holder_var = f"{name}-holder"
    with get_client(sync_client=True) as prefect_client:
        prefect_client.upsert_global_concurrency_limit_by_name(name, 1)
        holder = Variable.get(holder_var, default=None)
        if _holder_dead(holder) and prefect_client.read_global_concurrency_limit_by_name(name).active_slots:
            prefect_client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    with ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(name, occupy=1, strict=True, timeout_seconds=LOCK_WAIT_S, lease_duration=LEASE_S)
            )
        except AcquireConcurrencySlotTimeoutError:
            raise PreconditionFailed(
                f"another {what} of cluster {cluster} is running (Prefect concurrency limit {name!r}); "
                "wait for it to finish or cancel it in the Prefect UI"
            ) from None
        Variable.set(holder_var, {"host": socket.gethostname(), "pid": os.getpid()}, overwrite=True)
        try:
            yield
        finally:
            Variable.unset(holder_var)


def _holder_dead(holder) -> bool:
    """The recorded lock holder ran on this host and its process is gone."""
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


def change_node(kubeconfig: Path, slurm: Slurm) -> Callable[[Change], None]:
    """Carries out one Change on its side of the node: the Kubernetes cordon, or the Slurm node's state."""

    def apply(change: Change) -> None:
        if change.kind in (CORDON, UNCORDON):
            kube.set_cordon(kubeconfig, change.target, change.kind == CORDON, change.note)
        else:
            slurm.update(change.target, "drain" if change.kind == DRAIN_SLURM else "resume", change.note)

    return apply


def act_on_both_sides(steps: Sequence[Step], apply: Callable[[Change], None], log: Callable[[str], None]) -> bool:
    """Carry out one node's steps in order, so that both sides end in the same state: when a step fails, the
    later ones are skipped and the ones done are undone, last first. Returns whether every step was done.

    Every step's Action says what happened: done; failed, with the error; skipped; undone. An undo that fails
    too leaves its Action done, with both errors and "fix by hand": the original error stays on its own Action.
    """
    done: list[Step] = []
    for index, step in enumerate(steps):
        try:
            apply(step.change)
        except Exception as exc:  # noqa: BLE001 - recorded on the Action, and the steps done are undone
            step.action.status, step.action.detail = "failed", f"{step.action.detail}; {exc}"
            why = f"{step.change.kind} failed"
            for later in steps[index + 1 :]:
                later.action.status, later.action.detail = "skipped", f"{later.action.detail}; not done: {why}"
            for earlier in reversed(done):
                try:
                    apply(earlier.undo)
                except Exception as undo_exc:  # noqa: BLE001 - recorded next to the original error
                    earlier.action.detail += f"; {why} and undoing this failed too ({undo_exc}): fix by hand"
                    log(f"could not undo '{earlier.change}' after {why}: {undo_exc}")
                else:
                    earlier.action.status, earlier.action.detail = "undone", f"{earlier.action.detail}; undone: {why}"
                    log(f"{earlier.undo} (undone: {why})")
            return False
        step.action.status = "done"
        done.append(step)
        log(str(step.change))
    return True


def read_upgrade_plan(
    config: Config, releases: Sequence[Release]
) -> tuple[upgrade_plan.UpgradePlan, upgrade_plan.LiveState, list[upgrade_plan.TargetRelease]]:
    """The upgrade plan from the live cluster (API server and kubelet versions, Helm's release records, the CRDs)
    to `releases` (their chart archives from the chart mirror) and the config's Kubernetes pin. Raises the client's
    error when the cluster cannot be read, upgrade.PlanError when a chart archive cannot."""
    kubeconfig = config.kubeconfig_path()
    live = upgrade_plan.live_state(
        kube.server_version(kubeconfig),
        {name: node.kubelet_version for name, node in kube.list_nodes(kubeconfig).items()},
        helm.release_details(kubeconfig),
        kube.list_crds(kubeconfig),
    )
    wanted = upgrade_plan.targets(releases, chart_mirror(config, os.environ))
    return upgrade_plan.plan(live, wanted, config.kubespray.kube_version, config.kubespray.version), live, wanted
