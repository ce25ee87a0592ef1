"""Ansible verbs through ansible-runner: run a playbook over SSH, stream its events, summarise per host."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ansible_runner

# A dead link must fail fast (unreachable in ~7 s) instead of hanging until the task timeout.
SSH_ARGS = (
    "-o ControlMaster=auto -o ControlPersist=30s -o ServerAliveInterval=2 -o ServerAliveCountMax=3 -o ConnectTimeout=5"
)
# ssh_host_key_checking -> OpenSSH's StrictHostKeyChecking.
_STRICT = {"accept-new": "accept-new", "strict": "yes", "off": "no"}


def host_key_env(checking: str, known_hosts: Sequence[Path] = ()) -> dict[str, str]:
    """ANSIBLE_* settings for one host-key policy (gpuforge.hostkeys.POLICIES): ssh reads (and, for accept-new,
    writes to the first of) `known_hosts` only, never ~/.ssh/known_hosts or /etc/ssh/ssh_known_hosts."""
    if checking not in _STRICT:
        raise ValueError(f"ssh_host_key_checking {checking!r}: use one of {', '.join(_STRICT)}")
    if checking == "off":
        files = "/dev/null"
    elif not known_hosts:
        raise ValueError(f"ssh_host_key_checking {checking} needs a known_hosts file")
    else:
        files = " ".join(f'"{p}"' for p in known_hosts)  # ssh splits this value at blanks outside quotes
    host_keys = (
        f"-o StrictHostKeyChecking={_STRICT[checking]} -o {shlex.quote('UserKnownHostsFile=' + files)} "
        "-o GlobalKnownHostsFile=/dev/null -o HashKnownHosts=no"
    )
    return {
        "ANSIBLE_HOST_KEY_CHECKING": "False" if checking == "off" else "True",
        "ANSIBLE_SSH_ARGS": f"{SSH_ARGS} {host_keys}",
    }


class AnsibleError(RuntimeError):
    """ansible-playbook could not run at all; the message holds its own output."""


EventHandler = Callable[[dict[str, Any]], None]


@dataclass
class HostTask:
    task: str
    status: str  # ok, changed, failed, skipped, unreachable
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlaybookRun:
    status: str  # successful, failed, timeout, canceled
    rc: int
    stats: dict[str, dict[str, int]]
    hosts: dict[str, list[HostTask]]
    # Files of the tasks that ran on some host ("/x/roles/validate_inventory/tasks/main.yml"): which roles ran.
    task_files: set[str] = field(default_factory=set)
    # What the playbook reported with `set_stats` (Ansible's custom stats).
    custom_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def unreachable(self) -> list[str]:
        return sorted(self.stats.get("dark", {}))

    def recap(self) -> list[dict[str, Any]]:
        """Ansible's PLAY RECAP as table rows, one per host."""
        names = sorted({h for counts in self.stats.values() if isinstance(counts, dict) for h in counts})
        keys = ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored")
        return [
            {"host": h, **{k if k != "dark" else "unreachable": self.stats.get(k, {}).get(h, 0) for k in keys}}
            for h in names
        ]


_STATUS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_skipped": "skipped",
    "runner_on_unreachable": "unreachable",
}


def _host_task(event: dict[str, Any]) -> tuple[str, HostTask] | None:
    status = _STATUS.get(event.get("event", ""))
    if status is None:
        return None
    data = event.get("event_data", {})
    res = data.get("res") or {}
    if status == "ok" and res.get("changed"):
        status = "changed"
    if status == "failed" and data.get("ignore_errors"):
        status = "ok"
    message = str(res.get("msg", "")) if isinstance(res, dict) else ""
    return data.get("host", "?"), HostTask(data.get("task", ""), status, message, res if isinstance(res, dict) else {})


def run_playbook(
    *,
    playbook: Path,
    inventory: Path,
    extravars: dict[str, Any] | None = None,
    project_dir: Path | None = None,
    binary: str | None = None,
    become: bool = False,
    timeout_s: int | None = None,
    forks: int = 16,
    limit: str | None = None,
    skip_tags: list[str] | None = None,
    on_event: EventHandler | None = None,
    cancel: Callable[[], bool] | None = None,
    envvars: dict[str, str] | None = None,
    host_key_checking: str,
    known_hosts: Sequence[Path] = (),
    fact_cache: Path | None = None,
) -> PlaybookRun:
    """Run one playbook; every event goes to `on_event` as it happens. Never raises for a failed play.

    `host_key_checking` (accept-new, strict, off) and `known_hosts`: see host_key_env. `fact_cache`: a folder
    for Ansible's jsonfile fact cache that outlives the run (Kubespray's `--limit` runs read the other hosts'
    facts there); without it the facts die with the run."""
    hosts: dict[str, list[HostTask]] = {}
    task_files: set[str] = set()
    custom_stats: dict[str, Any] = {}
    playbook, inventory = Path(playbook).resolve(), Path(inventory).resolve()

    def handle(event: dict[str, Any]) -> bool:
        parsed = _host_task(event)
        if parsed:
            hosts.setdefault(parsed[0], []).append(parsed[1])
            task_path = event.get("event_data", {}).get("task_path")
            if task_path and parsed[1].status not in ("skipped", "unreachable"):
                task_files.add(task_path.rpartition(":")[0] or task_path)
        if event.get("event") == "playbook_on_stats":
            custom_stats.update(event.get("event_data", {}).get("artifact_data") or {})
        if on_event:
            on_event(event)
        return True

    env = {
        **host_key_env(host_key_checking, known_hosts),
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        **(envvars or {}),
    }
    # With `binary` ansible-runner runs that command as given and leaves the playbook out: it goes on the line.
    args = (["--become"] if become else []) + ([shlex.quote(str(playbook))] if binary else [])
    cmdline = " ".join(args) or None
    with (
        tempfile.TemporaryDirectory(prefix="gpuforge-ansible-") as data_dir,
        tempfile.TemporaryDirectory(prefix="gfcp-", dir="/tmp") as control_dir,
    ):
        # A private control-path dir: persistent SSH connections die with this run, never leak into the next.
        # Always a short one under /tmp: a socket path is limited to 108 bytes, and one under a long $TMPDIR made
        # ssh fail on every host ("unix_listener: path too long"), which read as "unreachable".
        env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = control_dir
        # The venv that owns ansible-playbook must be first on PATH or its helpers are not found (rc 127):
        # Kubespray's own venv via `binary`, else the venv gpuforge runs in.
        bin_dir = Path(binary).parent if binary else Path(sys.executable).parent
        env["PATH"] = f"{bin_dir}:{os.environ.get('PATH', '')}"
        runner = ansible_runner.run(
            private_data_dir=data_dir,
            project_dir=str(project_dir or playbook.parent),
            playbook=str(playbook),
            inventory=str(inventory),
            extravars=extravars or {},
            cmdline=cmdline,
            binary=binary,
            forks=forks,
            limit=limit,
            # ansible-runner joins this under its artifacts folder; an absolute path stays as it is.
            fact_cache=str(Path(fact_cache).resolve()) if fact_cache else None,
            skip_tags=",".join(skip_tags) if skip_tags else None,
            timeout=timeout_s,
            envvars=env,
            quiet=True,
            event_handler=handle,
            cancel_callback=cancel,
            settings={"suppress_ansible_output": True},
        )
        if runner.status == "failed" and not hosts:
            # ansible-playbook itself failed (not found, syntax error, bad inventory): no host was tried.
            output = runner.stdout.read() if runner.stdout else ""
            raise AnsibleError(f"ansible-playbook {playbook.name} failed (rc {runner.rc}): {output.strip()[-2000:]}")
        return PlaybookRun(runner.status, runner.rc, dict(runner.stats or {}), hosts, task_files, custom_stats)


def describe_event(event: dict[str, Any]) -> str | None:
    """One log line for the events a person follows: plays, tasks, per-host results. None for the rest."""
    kind = event.get("event", "")
    data = event.get("event_data", {})
    if kind == "playbook_on_play_start":
        return f"PLAY [{data.get('play', '')}]"
    if kind == "playbook_on_task_start":
        return f"TASK [{data.get('task', '')}]"
    parsed = _host_task(event)
    if parsed:
        host, ht = parsed
        return f"{host}: {ht.status}" + (f" - {ht.message}" if ht.message and ht.status != "ok" else "")
    return None
