"""Helm verbs (through pyhelm3 and the real `helm` binary): converge one release, read releases back."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pyhelm3 import Client, Command, errors
from pyhelm3 import Release as HelmRelease

from gpuforge.desired import DesiredState
from gpuforge.render import Release, chart_archive, chart_mirror, mirror_file
from tasks import kube
from tasks.retry import transient_within

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


def helm_command(kubeconfig: Path) -> Command:
    return Command(executable=helm_executable(), kubeconfig=kubeconfig, history_max_revisions=10)


def helm_client(kubeconfig: Path) -> Client:
    return Client(helm_command(kubeconfig), executable=helm_executable())


@dataclass(frozen=True)
class ReleaseOutcome:
    release: str
    namespace: str
    action: str  # "installed", "upgraded", "unchanged"
    revision: int
    chart_version: str


async def _converge(
    release: Release, kubeconfig: Path, timeout_s: int, exists: bool, archive: Path | None
) -> ReleaseOutcome:
    client = helm_client(kubeconfig)
    if archive:
        # A packaged chart is installed as is: `helm upgrade --install NAME FILE.tgz`, no repository involved.
        chart = await client.get_chart(archive)
    else:
        chart = await client.get_chart(release.chart_ref, repo=_repo_arg(release), version=release.version)
    # A release left pending-install/-upgrade by a killed run is rolled back or removed first; the cluster
    # lock guarantees no live run owns it. One with no record at all is new: asking Helm for its status would
    # only fail (and pyhelm3 would log that as a warning).
    current = await client.get_proceedable_revision(release.name, namespace=release.namespace) if exists else None
    if not await client.should_install_or_upgrade_release(current, chart, release.values):
        return ReleaseOutcome(release.name, release.namespace, "unchanged", current.revision, chart.metadata.version)
    revision = await client.install_or_upgrade_release(
        release.name,
        chart,
        release.values,
        namespace=release.namespace,
        atomic=True,  # a release that does not become ready is rolled back
        reset_values=True,  # the rendered values are the whole truth: Helm reuses the old ones when given none
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


@task(name="helm-converge", task_run_name="helm-{release.name}", cache_policy=NO_CACHE)
def converge_release(
    release: Release, kubeconfig: Path, timeout_s: int, exists: bool = True, mirror: Path | None = None
) -> ReleaseOutcome:
    """Install or upgrade one release atomically; nothing happens when chart version and values match.

    The chart comes from the release's local path, else the chart mirror's file, else its repository."""
    logger = get_run_logger()
    archive = chart_archive(release, mirror)
    if mirror is not None and release.repo is not None and archive is None:
        logger.warning(
            "chart mirror %s has no %s; pulling %s %s from %s",
            mirror,
            mirror_file(release, mirror).name,
            release.chart,
            release.version,
            release.repo,
        )
    try:
        outcome = asyncio.run(_converge(release, kubeconfig, timeout_s, exists, archive))
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


@dataclass(frozen=True)
class ReleaseRecord:
    """The latest revision of a release as Helm stored it (its `sh.helm.release.v1.*` Secret)."""

    name: str
    namespace: str
    revision: int
    status: str
    chart: str
    chart_version: str
    values: dict[str, Any]


def release_records(kubeconfig: Path) -> dict[tuple[str, str], ReleaseRecord]:
    """Every release's latest revision, read from Helm's own storage in one API call, keyed (namespace, name).

    Helm 3 keeps each revision in a Secret labelled owner=helm whose `release` field is base64 + gzip + JSON;
    superseded revisions are never the latest, so they are not fetched."""
    with kube.api_client(kubeconfig) as api:
        secrets = client.CoreV1Api(api).list_secret_for_all_namespaces(label_selector="owner=helm,status!=superseded")
    latest: dict[tuple[str, str], ReleaseRecord] = {}
    for secret in secrets.items:
        labels = secret.metadata.labels or {}
        key = (secret.metadata.namespace, labels.get("name", ""))
        revision = int(labels.get("version", "0"))
        if key in latest and latest[key].revision >= revision:
            continue
        raw = json.loads(gzip.decompress(base64.b64decode(base64.b64decode(secret.data["release"]))))
        meta = (raw.get("chart") or {}).get("metadata") or {}
        latest[key] = ReleaseRecord(
            name=key[1],
            namespace=key[0],
            revision=revision,
            status=(raw.get("info") or {}).get("status", labels.get("status", "")),
            chart=meta.get("name", ""),
            chart_version=meta.get("version", ""),
            values=raw.get("config") or {},
        )
    return latest


def read_releases(kubeconfig: Path) -> dict[str, dict[str, Any]]:
    """Every release in the cluster by name: namespace, revision, status, chart, version and user-supplied values
    (from release_records: one API call, however many releases)."""
    return {
        r.name: {
            "namespace": r.namespace,
            "revision": r.revision,
            "status": r.status,
            "chart": r.chart,
            "version": r.chart_version,
            "values": r.values,
        }
        for r in release_records(kubeconfig).values()
    }


def chart_name(release: Release) -> str:
    """The chart's own name as Helm records it (a local chart's Chart.yaml says it)."""
    local = Path(release.chart)
    if release.repo is None and (local / "Chart.yaml").is_file():
        return yaml.safe_load((local / "Chart.yaml").read_text())["name"]
    return release.chart.rsplit("/", 1)[-1]


def unchanged(release: Release, record: ReleaseRecord | None) -> bool:
    """pyhelm3's should_install_or_upgrade_release, answered from the record: deployed, same chart and version,
    same user-supplied values (compared as JSON, as Helm stores them)."""
    return (
        record is not None
        and record.status == "deployed"
        and (record.chart, record.chart_version) == (chart_name(release), release.version)
        and record.values == json.loads(json.dumps(release.values))
    )


def converge_service(state: DesiredState, service: str, kubeconfig: Path, timeout_s: int) -> list[ReleaseOutcome]:
    """Converge every release of one service as the desired state has it, in order (CRDs before what uses them).

    A release whose stored record already matches is reported unchanged without running helm (one API call for
    the whole service instead of several helm processes per release); any other goes through pyhelm3, whose own
    check (`should_install_or_upgrade_release`) is the same rule asked again after a release a killed run left
    pending has been recovered (rolled back to a revision that may already match)."""
    releases = state.service_releases(service)
    mirror = chart_mirror(state.config, os.environ)
    records = release_records(kubeconfig)
    # A release's transient failures are retried within its timeout, not past it: an API server whose etcd was
    # gone answers every request only after its own 60 s timeout, so each try can take minutes.
    converge = converge_release.with_options(
        retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=transient_within(timeout_s)
    )
    outcomes = []
    for r in releases:
        record = records.get((r.namespace, r.name))
        if unchanged(r, record):
            get_run_logger().info(
                "helm %s/%s: unchanged (revision %s, chart %s)", r.namespace, r.name, record.revision, r.version
            )
            outcomes.append(ReleaseOutcome(r.name, r.namespace, "unchanged", record.revision, r.version))
        else:
            outcomes.append(converge(r, kubeconfig, timeout_s, exists=record is not None, mirror=mirror))
    return outcomes


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


# --- upgrade: a release's history and the way back ---


def release_history(kubeconfig: Path, name: str, namespace: str) -> list[dict[str, Any]]:
    """`helm history`: each revision's number, status, chart and description (e.g. "Rollback to 3")."""
    command = helm_command(kubeconfig)
    try:
        return list(asyncio.run(command.history(name, namespace=namespace)))
    except errors.Error as exc:
        raise HelmError(f"helm history {namespace}/{name}: {str(exc).strip()}") from None


@task(name="helm-rollback", task_run_name="helm-rollback-{name}", cache_policy=NO_CACHE)
def rollback_release(kubeconfig: Path, name: str, namespace: str, revision: int, timeout_s: int) -> int:
    """`helm rollback NAME REVISION --wait`; returns the revision the rollback made."""
    release = HelmRelease(helm_command(kubeconfig), name=name, namespace=namespace)
    try:
        made = asyncio.run(release.rollback(revision, wait=True, timeout=f"{timeout_s}s", cleanup_on_fail=True))
    except errors.Error as exc:
        raise HelmError(f"helm rollback {namespace}/{name} {revision}: {str(exc).strip()}") from None
    get_run_logger().info(
        "helm %s/%s: rolled back to revision %s (revision %s)", namespace, name, revision, made.revision
    )
    return made.revision


# --- upgrade plan: what each release deployed, beyond its version (read-only) ---


def release_details(kubeconfig: Path) -> dict[str, dict[str, Any]]:
    """Every release's deployed revision by name, from Helm's storage in one API call: namespace, chart, version,
    status, the chart's own values.yaml as Helm stored it with the release (defaults the user did not override,
    such as the GPU Operator's driver and dcgm-exporter versions), the user-supplied values, and the
    (apiVersion, kind, name) of every object of its manifest."""
    with kube.api_client(kubeconfig) as api:
        secrets = client.CoreV1Api(api).list_secret_for_all_namespaces(label_selector="owner=helm,status=deployed")
    out: dict[str, dict[str, Any]] = {}
    for secret in secrets.items:
        raw = json.loads(gzip.decompress(base64.b64decode(base64.b64decode(secret.data["release"]))))
        chart = raw.get("chart") or {}
        objects = [
            (doc.get("apiVersion", ""), doc.get("kind", ""), (doc.get("metadata") or {}).get("name", ""))
            for doc in yaml.safe_load_all(raw.get("manifest") or "")
            if isinstance(doc, dict)
        ]
        out[raw["name"]] = {
            "namespace": raw.get("namespace", secret.metadata.namespace),
            "chart": (chart.get("metadata") or {}).get("name", ""),
            "version": (chart.get("metadata") or {}).get("version", ""),
            "status": (raw.get("info") or {}).get("status", ""),
            "chart_values": chart.get("values") or {},
            "values": raw.get("config") or {},
            "objects": objects,
        }
    return out
