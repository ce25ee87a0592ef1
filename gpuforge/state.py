"""Where gpuforge keeps a cluster's run files (inventory, Kubespray artifacts, known_hosts). Pure: no mkdir."""

from __future__ import annotations

import os
from pathlib import Path


def cluster_state_dir(cluster_name: str) -> Path:
    """$GPUFORGE_STATE/<cluster> (default ~/.local/state/gpuforge/<cluster>)."""
    return Path(os.environ.get("GPUFORGE_STATE", "~/.local/state/gpuforge")).expanduser() / cluster_name


def known_hosts_path(cluster_name: str) -> Path:
    """The cluster's own known_hosts: the host keys pinned for it (ssh_host_key_checking)."""
    return cluster_state_dir(cluster_name) / "known_hosts"
