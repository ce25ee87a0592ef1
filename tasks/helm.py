"""Helm verbs (through pyhelm3 and the real `helm` binary): converge one release, read releases back."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pyhelm3 import Client, errors

from gpuforge.render import Release
from tasks.retry import is_transient

HELM_BIN_ENV = "GPUFORGE_HELM"


class HelmError(RuntimeError):
    """A Helm command failed; the message carries Helm's own words."""


def helm_executable() -> str:
    """The helm binary: $GPUFORGE_HELM, `helm` on PATH, or the one the project's setup built."""
    if explicit := os.environ.get(HELM_BIN_ENV):
        return explicit
    if found := shutil.which("helm"):
        return found
    cached = sorted(Path("~/.cache/gpuforge/bin").expanduser().glob("helm-v3*"))
    if cached:
        return str(cached[-1])
    raise HelmError("no helm binary: run `make setup` or put helm on PATH")


def helm_client(kubeconfig: Path) -> Client:
    return Client(executable=helm_executable(), kubeconfig=kubeconfig, history_max_revisions=10)


@dataclass(frozen=True)
class ReleaseOutcome:
    release: str
    namespace: str
    action: str  # "installed", "upgraded", "unchanged"
    revision: int
    chart_version: str


async def _converge(release: Release, kubeconfig: Path, timeout_s: int) -> ReleaseOutcome:
    client = helm_client(kubeconfig)
    chart = await client.get_chart(release.chart_ref, repo=_repo_arg(release), version=release.version)
    # A release left pending-install/-upgrade by a killed run is rolled back or removed first; the cluster
    # lock guarantees no live run owns it.
    current = await client.get_proceedable_revision(release.name, namespace=release.namespace)
    if not await client.should_install_or_upgrade_release(current, chart, release.values):
        return ReleaseOutcome(release.name, release.namespace, "unchanged", current.revision, chart.metadata.version)
    revision = await client.install_or_upgrade_release(
        release.name,
        chart,
        release.values,
        namespace=release.namespace,
        atomic=True,  # a release that does not become ready is rolled back
        wait=True,
        timeout=f"{timeout_s}s",
        create_namespace=True,
    )
    return ReleaseOutcome(
        release.name,
        release.namespace,
        "installed" if current is None else "upgraded",
        revision.revision,
        chart.metadata.version,
    )


def _repo_arg(release: Release) -> str | None:
    # OCI charts are addressed by their full reference; `--repo` is for classic repositories only.
    return None if release.repo is None or release.repo.startswith("oci://") else release.repo


def _helm_error(release: Release, exc: errors.Error) -> HelmError:
    text = str(exc).strip()
    return HelmError(f"helm release {release.namespace}/{release.name} ({release.chart} {release.version}): {text}")


@task(
    name="helm-converge",
    task_run_name="helm-{release.name}",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=lambda task, run, state: is_transient(state),
    cache_policy=NO_CACHE,
)
def converge_release(release: Release, kubeconfig: Path, timeout_s: int) -> ReleaseOutcome:
    """Install or upgrade one release atomically; nothing happens when chart version and values match."""
    logger = get_run_logger()
    try:
        outcome = asyncio.run(_converge(release, kubeconfig, timeout_s))
    except errors.Error as exc:
        raise _helm_error(release, exc) from None
    logger.info(
        "helm %s/%s: %s (revision %s, chart %s)",
        release.namespace,
        release.name,
        outcome.action,
        outcome.revision,
        outcome.chart_version,
    )
    return outcome


async def _read_releases(kubeconfig: Path) -> dict[str, dict[str, Any]]:
    client = helm_client(kubeconfig)
    out: dict[str, dict[str, Any]] = {}
    for rel in await client.list_releases(all_namespaces=True, all=True):
        rev = await rel.current_revision()
        meta = await rev.chart_metadata()
        out[rel.name] = {
            "namespace": rel.namespace,
            "revision": rev.revision,
            "status": rev.status.value,
            "chart": meta.name,
            "version": meta.version,
            "values": await rev.values(),
        }
    return out


def read_releases(kubeconfig: Path) -> dict[str, dict[str, Any]]:
    """Every release in the cluster: status, chart, version and user-supplied values."""
    try:
        return asyncio.run(_read_releases(kubeconfig))
    except errors.Error as exc:
        raise HelmError(f"helm list: {str(exc).strip()}") from None


def converge_service(config, service: str, kubeconfig: Path, timeout_s: int, learned=None) -> list[ReleaseOutcome]:
    """Converge every release of one service, in order (CRDs before what uses them)."""
    from gpuforge.render import render_releases

    releases = [r for r in render_releases(config, learned) if r.service == service]
    return [converge_release(r, kubeconfig, timeout_s) for r in releases]


def outcome_rows(outcomes: list[ReleaseOutcome]) -> list[dict[str, Any]]:
    return [
        {
            "release": o.release,
            "namespace": o.namespace,
            "action": o.action,
            "revision": o.revision,
            "chart version": o.chart_version,
        }
        for o in outcomes
    ]


def phase_summary(outcomes: list[ReleaseOutcome], extra: str = "") -> str:
    """A phase's one-line result; it starts with "skipped" when no release needed a change (converged)."""
    changed = [f"{o.release} {o.action} (revision {o.revision})" for o in outcomes if o.action != "unchanged"]
    head = ", ".join(changed) if changed else f"skipped: {len(outcomes)} release(s) unchanged"
    return f"{head}; {extra}" if extra else head
