"""Preflight rules: judge the facts `playbooks/preflight.yml` collected on each node.

Pure domain code. Each check is blocking (the install cannot go on) or a warning (it can, but someone
should look). A row per node, a column per check; an unreachable node says so and hides nobody else.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from gpuforge.config import Config
from gpuforge.hostkeys import HostKeyVerdict

MIN_MEMORY_MB = 2048  # Kubespray's minimal control-plane memory is 1500 MB; kubelet + pods need headroom
MIN_DISK_FREE_GB = 20  # container images of the GPU Operator alone take ~10 GB
SUPPORTED_OS = ("Ubuntu", "Debian", "RedHat", "Rocky", "AlmaLinux", "CentOS")
CONTROL_PLANE_PORTS = (6443, 2379, 2380, 10250, 10257, 10259)
WORKER_PORTS = (10250,)

CHECKS = ("host_key", "reachable", "sudo", "os", "disk", "memory", "swap", "time_sync", "ports", "hostname")
CHECKS += ("gpu_pci", "nouveau")
BLOCKING = {"host_key", "reachable", "sudo", "disk", "memory", "swap", "ports", "hostname", "gpu_pci", "nouveau"}


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str
    blocking: bool

    def cell(self) -> str:
        if self.ok:
            return f"ok ({self.detail})" if self.detail else "ok"
        return f"{'FAIL' if self.blocking else 'WARN'}: {self.detail}"


def judge_node(
    config: Config,
    name: str,
    facts: dict[str, Any] | None,
    hostnames: Counter,
    host_key: HostKeyVerdict | None = None,
    why_unreachable: str = "",
) -> dict[str, Check]:
    node = next(n for n in config.nodes if n.name == name).spec
    key = {"host_key": Check(not host_key.refused, host_key.detail, True)} if host_key else {}
    if host_key and host_key.refused:
        return key  # nothing ran on this host
    if facts is None:
        detail = f"unreachable over SSH ({why_unreachable})" if why_unreachable else "unreachable over SSH"
        return {**key, "reachable": Check(False, detail, True)}

    def check(key: str, ok: bool, detail: str) -> Check:
        return Check(ok, detail, key in BLOCKING)

    free_gb = int(facts.get("containerd_disk_free_bytes") or 0) / 2**30
    mem = int(facts.get("memtotal_mb") or 0)
    swap = int(facts.get("swaptotal_mb") or 0)
    ports = set(facts.get("listening_ports") or [])
    wanted = CONTROL_PLANE_PORTS if node.is_control_plane else WORKER_PORTS
    busy = sorted(p for p in wanted if p in ports)
    gpus = int(facts.get("nvidia_pci_devices") or 0)
    hostname = facts.get("hostname", "")
    if node.is_gpu:
        want = node.gpu_count
        gpu_ok = gpus >= 1 if want is None else gpus == want
        gpu_detail = f"{gpus} NVIDIA devices" + ("" if want is None else f", expected {want}")
        gpu_check = check("gpu_pci", gpu_ok, gpu_detail)
    else:
        # A GPU in a node not declared gpu-worker is wasted, not fatal.
        gpu_check = Check(gpus == 0, f"{gpus} NVIDIA devices on a node without the gpu-worker role", False)
    return {
        **key,
        "reachable": check("reachable", True, ""),
        "sudo": check("sudo", bool(facts.get("sudo")), "" if facts.get("sudo") else "sudo to root fails"),
        "os": check(
            "os",
            str(facts.get("distribution", "")).startswith(SUPPORTED_OS),
            f"{facts.get('distribution')} / kernel {facts.get('kernel')}",
        ),
        "disk": check(
            "disk", free_gb >= MIN_DISK_FREE_GB, f"{free_gb:.0f} GB free for images (min {MIN_DISK_FREE_GB})"
        ),
        "memory": check("memory", mem >= MIN_MEMORY_MB, f"{mem} MB (min {MIN_MEMORY_MB})"),
        "swap": check("swap", swap == 0, "off" if swap == 0 else f"{swap} MB swap on; kubelet needs it off"),
        "time_sync": check(
            "time_sync", bool(facts.get("time_synced")), "" if facts.get("time_synced") else "clock not synchronised"
        ),
        "ports": check("ports", not busy, "" if not busy else f"ports already in use: {', '.join(map(str, busy))}"),
        "hostname": check(
            "hostname",
            hostnames[hostname] == 1,
            hostname if hostnames[hostname] == 1 else f"hostname {hostname!r} is used by {hostnames[hostname]} nodes",
        ),
        "gpu_pci": gpu_check,
        "nouveau": check(
            "nouveau",
            not (node.is_gpu and facts.get("nouveau_loaded")),
            "nouveau is loaded; blacklist it before the NVIDIA driver"
            if node.is_gpu and facts.get("nouveau_loaded")
            else "",
        ),
    }


def judge_preflight(
    config: Config,
    facts: dict[str, dict[str, Any] | None],
    host_keys: dict[str, HostKeyVerdict] | None = None,
    unreachable: dict[str, str] | None = None,
) -> dict[str, dict[str, Check]]:
    """Node name -> check -> result. `facts[name]` is None for a node that could not be reached (or was not tried:
    its host key was refused); `unreachable[name]` is what SSH said about it (unreachable_reason)."""
    hostnames = Counter(f.get("hostname", "") for f in facts.values() if f)
    keys = host_keys or {}
    why = unreachable or {}
    return {
        n.name: judge_node(config, n.name, facts.get(n.name), hostnames, keys.get(n.name), why.get(n.name, ""))
        for n in config.nodes
    }


def unreachable_reason(message: str) -> str:
    """Ansible's unreachable message in a few words: "Task failed: Failed to connect to the host via ssh:
    Connection timed out during banner exchange" -> "Connection timed out during banner exchange"."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    for prefix in ("Task failed:", "Failed to connect to the host via ssh:"):
        text = text.removeprefix(prefix).strip()
    return text[:200]


def table_rows(results: dict[str, dict[str, Check]]) -> list[dict[str, str]]:
    return [
        {"node": name, **{c: (checks[c].cell() if c in checks else "-") for c in CHECKS}}
        for name, checks in results.items()
    ]


def blocking_failures(results: dict[str, dict[str, Check]]) -> list[str]:
    return [
        f"{name}: {key}: {check.detail}"
        for name, checks in results.items()
        for key, check in checks.items()
        if not check.ok and check.blocking
    ]
