"""`lab down --purge` leaves nothing of the old lab: no metrics, no injected faults, no state files.

The DCGM simulator and Prometheus run for real (the Lab's own objects, started on their own); the control
plane, Slurm and the SSH hosts are stood in for, as they need root and share the lab bridge with any lab
running on this machine (their own tests cover their down).
"""

from __future__ import annotations

import shutil
import time

import pytest

from gpuforge.config import parse_config
from lab.lab import Lab

pytestmark = pytest.mark.skipif(not shutil.which("prometheus"), reason="needs the prometheus package")

XID_IN_WINDOW = "max(max_over_time(DCGM_FI_DEV_XID_ERRORS[1h]))"


def wait_for(fn, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := fn():
            return value
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout}s")


def xid_seen(lab: Lab) -> float | None:
    result = lab.prometheus.query(XID_IN_WINDOW)
    return float(result[0]["value"][1]) if result else None


def metrics_up(lab: Lab) -> None:
    lab.dcgm.up({"pg-1": (1, "NVIDIA H100 80GB HBM3")})
    lab.prometheus.up(targets=lab.dcgm.targets(), scrape_interval="1s")


def test_purge_forgets_metrics_faults_and_state_files(tmp_path, monkeypatch):
    state = tmp_path / "state"
    config = parse_config(
        'k8s_cluster_nodes: [{ip: "198.51.100.240", name: pg-1, role: [control-plane, etcd, gpu-worker]}]\n'
        f"kubeconfig: {state / 'kubeconfig'}\n"
    )
    lab = Lab(config)
    purged = []
    for part in (lab.cp, lab.slurm, lab.hosts):
        monkeypatch.setattr(part, "down", lambda purge=False, part=part: purged.append((type(part).__name__, purge)))
    state.mkdir()
    # What a real `lab up` leaves beside the kubeconfig, apart from the stood-in parts' own folders.
    for name in ("hosts/pg-1", "ssh", "pod-logs", "run", "log", "slurm/spool"):
        (state / name).mkdir(parents=True)
    for name in ("kubeconfig", "gpu-inventory.json", "slurm-env.json", "kubespray-lab.json", "ssh/id_ed25519"):
        (state / name).write_text("{}")
    (state / "notes.txt").write_text("the user's own file, beside the kubeconfig")
    try:
        metrics_up(lab)
        lab.dcgm.set_value("pg-1", 0, "XID_ERRORS", 79)
        assert wait_for(lambda: xid_seen(lab) == 79, 30)
        lab.down(purge=True)
        assert purged == [("ControlPlane", True), ("SlurmLab", False), ("SshHosts", False)]
        assert sorted(p.name for p in state.iterdir()) == ["notes.txt"]

        metrics_up(lab)  # the next `lab up`: a fresh simulator and an empty TSDB
        wait_for(lambda: xid_seen(lab) is not None, 30)
        assert xid_seen(lab) == 0
    finally:
        lab.prometheus.down(purge=True)
        lab.dcgm.down(purge=True)
