"""Secrets gpuforge hands to other tools: read from a Prefect Secret block, kept in 0600 temp files only."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gpuforge.config import Config


@contextmanager
def ssh_key_extravars(config: Config) -> Iterator[dict[str, str]]:
    """Extra vars that point Ansible at the SSH key; a Secret-block key lives in a 0600 file for the run only.

    Only the file's path ever reaches Ansible's command line and artifacts, never the key.
    """
    if not config.ansible_ssh_private_key_secret:
        yield {}
        return
    from prefect.blocks.system import Secret

    key = Secret.load(config.ansible_ssh_private_key_secret).get()
    with tempfile.TemporaryDirectory(prefix="gpuforge-key-") as tmp:
        path = Path(tmp) / "id"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key if key.endswith("\n") else key + "\n")
        yield {"ansible_ssh_private_key_file": str(path)}
