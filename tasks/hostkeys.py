"""Host-key verbs: fetch the keys the nodes offer (ssh-keyscan), judge them against the cluster's known_hosts
(gpuforge.hostkeys), pin new ones under accept-new."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gpuforge.config import Config
from gpuforge.hostkeys import (
    SCAN_TYPES,
    HostKey,
    HostKeyVerdict,
    judge_host_key,
    known_hosts_line,
    parse_keyscan,
    parse_known_hosts,
)
from gpuforge.state import known_hosts_path

SCAN_TIMEOUT_S = 5


def known_hosts_files(config: Config) -> list[Path]:
    """The files ssh reads host keys from: the cluster's own (first: accept-new writes there), then the config's."""
    files = [known_hosts_path(config.cluster_name)]
    if config.ssh_known_hosts:
        files.append(config.path(config.ssh_known_hosts))
    return files


def scan_host_keys(addresses: list[str], timeout_s: int = SCAN_TIMEOUT_S) -> dict[str, list[HostKey]]:
    """address -> the host keys it offers on port 22 (empty: no answer). Only the config's node addresses."""
    if not addresses:
        return {}
    try:
        proc = subprocess.run(
            ["ssh-keyscan", "-T", str(timeout_s), "-t", SCAN_TYPES, *addresses],
            capture_output=True,
            text=True,
            timeout=4 * timeout_s + 5,
        )
        scanned = parse_keyscan(proc.stdout)
    except subprocess.TimeoutExpired:
        scanned = {}
    return {a: scanned.get(a, []) for a in addresses}


def check_host_keys(config: Config) -> dict[str, HostKeyVerdict]:
    """Node name -> verdict on the key it offers now; under accept-new, new keys are pinned in the cluster's
    known_hosts (what ssh's accept-new would write, before anything runs there)."""
    policy = config.ssh_host_key_checking
    if policy == "off":
        return {n.name: judge_host_key(n.name, n.spec.ip, [], [], policy) for n in config.nodes}
    files = known_hosts_files(config)
    known = [e for f in files if f.is_file() for e in parse_known_hosts(f.read_text(errors="replace"), str(f))]
    offered = scan_host_keys([n.spec.ip for n in config.nodes])
    verdicts = {n.name: judge_host_key(n.name, n.spec.ip, offered[n.spec.ip], known, policy) for n in config.nodes}
    new = [v for v in verdicts.values() if v.status == "new"]
    if new:
        pin(files[0], [(v.address, k) for v in new for k in v.offered])
    return verdicts


def pin(path: Path, keys: list[tuple[str, HostKey]]) -> None:
    """Append `address type key` lines (unhashed, so a person can read which host is which) to `path`, 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write("".join(known_hosts_line(address, key) for address, key in keys))
