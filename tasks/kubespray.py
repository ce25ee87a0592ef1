"""Kubespray on disk: its checkout (a folder, a release tarball or a clone of the pinned tag) and its own venv.

Both are built once into gpuforge's cache (`$GPUFORGE_CACHE`, else ~/.cache/gpuforge) and reused:
- `kubespray/<first 16 hex of the tarball's sha256>/` for a tarball, `kubespray/<version>/` for a clone;
- `kubespray-venv/<first 16 hex of requirements.txt's sha256>/`, the venv Kubespray's pinned ansible runs in.
A cache entry appears complete or not at all (built under a temporary name, then renamed), and two runs that
need the same entry at once build it once (the second waits on a file lock, then finds it).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from gpuforge.config import Config
from tasks.ansible import PlaybookRun, run_playbook
from tasks.secrets import ssh_key_extravars

KUBESPRAY_GIT = "https://github.com/kubernetes-sigs/kubespray"
_GALAXY_VERSION = re.compile(r"^version:\s*['\"]?([0-9][^'\"\s]*)", re.MULTILINE)


class KubesprayError(RuntimeError):
    """The Kubespray checkout or its venv cannot be had; the message says what to change."""


def cache_root() -> Path:
    return Path(os.environ.get("GPUFORGE_CACHE", "~/.cache/gpuforge")).expanduser()


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def _build_once(final: Path, build: Callable[[Path], Path], *, link: bool = False) -> Path:
    """`final`, built by `build(tmp)` unless it exists. `build` fills a fresh folder and returns what to publish.

    A tree is renamed into place. A venv cannot move (pip writes its absolute path into every script), so with
    `link` it stays where it was built and a symlink to it is renamed into place instead.
    """
    if final.exists():
        return final
    with _lock(final.parent / f"{final.name}.lock"):
        if final.exists():  # built by the run we waited for
            return final
        for stale in final.parent.glob(f".{final.name}.*"):  # left by a run that died while building
            if stale.is_symlink():
                stale.unlink()
            else:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache entry is as readable as any other folder
        try:
            built = build(tmp)
            if link:
                tmp_link = final.parent / f".{final.name}.link"
                tmp_link.symlink_to(built)
                os.replace(tmp_link, final)
            else:
                os.rename(built, final)
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkout_version(checkout: Path) -> str | None:
    """The Kubespray version a tree says it is ("v2.31.0"), from the `version:` of its galaxy.yml."""
    try:
        found = _GALAXY_VERSION.search((checkout / "galaxy.yml").read_text())
    except OSError:
        return None
    return f"v{found.group(1)}" if found else None


def _extract(tarball: Path) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        with tarfile.open(tarball) as tar:
            tops = {Path(m.name).parts[0] for m in tar.getmembers() if Path(m.name).parts}
            if len(tops) != 1:
                raise KubesprayError(f"{tarball} is not a Kubespray release tarball (one top folder expected)")
            tar.extractall(tmp, filter="data")  # "data": no absolute paths, links or devices out of tmp
        return tmp / tops.pop()

    return build


def _clone(version: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        argv = ["git", "clone", "-q", "--depth", "1", "--branch", version, KUBESPRAY_GIT, str(tmp / "kubespray")]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            proc = subprocess.CompletedProcess(argv, 1, "", str(exc))
        if proc.returncode != 0:
            raise KubesprayError(
                f"could not clone Kubespray {version} from {KUBESPRAY_GIT} ({proc.stderr.strip()[-500:]}). "
                "Without access to GitHub, set kubespray.checkout to a Kubespray tree or its release tarball "
                f"(.tar.gz) at {version}"
            )
        return tmp / "kubespray"

    return build


def resolve_checkout(source: Path | None, version: str) -> Path:
    """The Kubespray tree to run, checked to be `version`: `source` as a folder, `source` as a tarball extracted
    into the cache, or (no source) the `version` tag cloned into the cache."""
    if source is None:
        checkout = _build_once(cache_root() / "kubespray" / version, _clone(version))
    elif source.is_dir():
        if not (source / "cluster.yml").is_file():
            raise KubesprayError(f"kubespray.checkout {source} is not a Kubespray tree (no cluster.yml in it)")
        checkout = source
    elif source.is_file() and source.name.endswith((".tar.gz", ".tgz")):
        checkout = _build_once(cache_root() / "kubespray" / _sha256(source)[:16], _extract(source))
    else:
        raise KubesprayError(
            f"kubespray.checkout {source} is neither a Kubespray tree (a folder holding cluster.yml) nor its "
            "release tarball (.tar.gz)"
        )
    found = checkout_version(checkout)
    if found != version:
        what = f"is Kubespray {found}" if found else "does not say which Kubespray it is (no version in galaxy.yml)"
        raise KubesprayError(
            f"{source or checkout} {what}, but kubespray.version is {version}: point kubespray.checkout at "
            f"Kubespray {version}, or change kubespray.version"
        )
    return checkout


def _venv(requirements: Path) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        venv = tmp / "venv"
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "-r", str(requirements)],
        ]  # fmt: skip
        for argv in steps:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise KubesprayError(
                    f"could not build Kubespray's venv from {requirements} ({' '.join(argv[2:4])} failed: "
                    f"{(proc.stderr or proc.stdout).strip()[-800:]}). It installs from the package index: "
                    "without one, set PIP_INDEX_URL or PIP_FIND_LINKS to a mirror, or kubespray.venv to a venv "
                    "that has these requirements"
                )
        return venv

    return build


def kubespray_venv(checkout: Path) -> Path:
    """Kubespray's own venv for `checkout`, built from its requirements.txt once per distinct file."""
    requirements = checkout / "requirements.txt"
    if not requirements.is_file():
        raise KubesprayError(f"{checkout} has no requirements.txt to build Kubespray's venv from")
    final = cache_root() / "kubespray-venv" / _sha256(requirements)[:16]
    return _build_once(final, _venv(requirements), link=True).resolve()


# What the summary says Kubespray did when one of these of its own task files ran (relative to the checkout).
_DID = {
    "roles/validate_inventory": "validated",
    "roles/network_facts": "facts gathered",
    "playbooks/internal_facts.yml": "facts gathered",
}


def what_kubespray_did(run: PlaybookRun, checkout: Path, version: str) -> str:
    """One line for a playbook that is not Kubespray's own: what Kubespray's own tasks did in `run` (judged by
    the checkout's files whose tasks ran), then what the playbook reports it did itself, as a list of sentences
    in `set_stats` key `gpuforge_notes` (e.g. "node provisioning simulated by the lab")."""
    root = checkout.resolve()
    ran = set()
    for name in run.task_files:
        try:
            rel = Path(name).resolve().relative_to(root)
        except ValueError:  # a task of the playbook itself, not of Kubespray
            continue
        ran.add("/".join(rel.parts[:2]))
    words = list(dict.fromkeys(word for part, word in _DID.items() if part in ran))
    others = sorted(ran - set(_DID) - {"roles/dynamic_groups", "playbooks/ansible_version.yml"})
    did = " and ".join(words) if words else "nothing"
    parts = [f"{did} by Kubespray {version}" + (f" (also ran: {', '.join(others)})" if others else "")]
    notes = run.custom_stats.get("gpuforge_notes") or []
    return "; ".join(parts + [str(n) for n in (notes if isinstance(notes, list) else [notes])])


# ----------------------------------------------------------------------------- node add / remove (scale.yml)

# Kubespray's ansible.cfg keeps cached facts for a day (fact_caching_timeout); older ones count as missing.
FACT_CACHE_TIMEOUT_S = 86400


def cached_fact_hosts(fact_cache: Path, now: float) -> set[str]:
    """Hosts whose facts Ansible's jsonfile cache holds, younger than Kubespray's cache timeout (a file per host,
    named after it)."""
    if not fact_cache.is_dir():
        return set()
    return {p.name for p in fact_cache.iterdir() if p.is_file() and now - p.stat().st_mtime < FACT_CACHE_TIMEOUT_S}


@task(name="kubespray-nodes", cache_policy=NO_CACHE)
def run_node_playbook(
    config: Config,
    checkout: Path,
    playbook: Path,
    inventory: Path,
    binary: str,
    *,
    fact_cache: Path,
    on_event: Callable[[dict[str, Any]], None],
    host_keys: dict[str, Any],
    limit: str | None = None,
    extravars: dict[str, Any] | None = None,
) -> PlaybookRun:
    """A Kubespray playbook that changes some nodes (facts.yml, scale.yml, remove-node.yml or the site's own),
    from the checkout with Kubespray's venv, become, every event logged, facts read from and written to the
    cluster's persistent `fact_cache`, limited to `limit`. `on_event` and `host_keys` as for run_kubespray
    (tasks.ansible_tasks.log_events and ssh_host_keys)."""
    fact_cache.mkdir(parents=True, exist_ok=True)
    base = {"gpuforge_kubespray_dir": str(checkout), "gpuforge_kubeconfig": str(config.kubeconfig_path())}
    with ssh_key_extravars(config) as key_vars:
        return run_playbook(
            playbook=playbook,
            inventory=inventory,
            project_dir=checkout,
            binary=binary,
            become=True,
            extravars={**base, **(extravars or {}), **key_vars},
            limit=limit,
            skip_tags=config.kubespray.skip_tags,
            timeout_s=config.timeouts.kubespray,
            on_event=on_event,
            fact_cache=fact_cache,
            **host_keys,
        )
