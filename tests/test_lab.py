"""The lab as a whole: `gpuforge lab up/status/down` on its own small config, and nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.controlplane import ControlPlane
from tests.conftest import make_lab_config

GPUFORGE = str(Path(sys.executable).parent / "gpuforge")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GPUFORGE, *args], capture_output=True, text=True, timeout=600)


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "pytest" not in line]


def test_lab_refuses_addresses_outside_its_subnet(tmp_path):
    config = make_lab_config(tmp_path, prefix="x", ip_base=60, cluster="gpuforge-outside")
    config.write_text(config.read_text().replace("198.51.100.60", "192.168.1.60"))
    result = run("lab", "up", "--config", str(config))
    assert result.returncode == 1
    assert "node xcp-1 has address 192.168.1.60 outside the lab subnet 198.51.100.0/24" in result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was created


def test_lab_up_status_down_leaves_nothing_behind(tmp_path):
    config = make_lab_config(tmp_path, prefix="d", ip_base=70, cluster="gpuforge-downtest")
    up = run("lab", "up", "--config", str(config), "--json")
    try:
        assert up.returncode == 0, up.stderr
        check_running_lab(config, json.loads(up.stdout))
    finally:
        down = run("lab", "down", "--config", str(config), "--purge")
    assert down.returncode == 0, down.stderr
    assert not {"gf-dcp-1", "gf-dgpu-1", "gf-dgpu-2", "gf-dcpu-1"} & netns_list()
    assert processes_mentioning(str(tmp_path)) == []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "gf-dgpu" not in links
    assert ControlPlane(tmp_path / "state", Path("/nonexistent")).namespace not in netns_list()
    assert run("lab", "status", "--config", str(config)).returncode == 3


def check_running_lab(config: Path, endpoints: dict) -> None:
    tmp_path = config.parent
    assert endpoints["kubeconfig"] == str(tmp_path / "state" / "kubeconfig")
    assert endpoints["api server"].startswith("https://198.51.100.")  # the control plane's own lab namespace
    assert {"gf-dcp-1", "gf-dgpu-1", "gf-dgpu-2", "gf-dcpu-1"} <= netns_list()

    again = run("lab", "up", "--config", str(config), "--json")  # idempotent
    assert again.returncode == 0 and json.loads(again.stdout)["api server"] == endpoints["api server"]

    status = run("lab", "status", "--config", str(config), "--json")
    assert status.returncode == 0
    state = json.loads(status.stdout)["status"]
    assert state["control_plane"]["up"] and state["prometheus"] and state["reconciler"]
    assert state["slurm"]["nodes"] == {"dgpu-1": "idle"}  # dgpu-2 stays out of Slurm
    # The API server listens in its namespace only; nothing of it in the root namespace.
    local = [
        line.split()[3] for line in subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout.splitlines()
    ]
    assert not [addr for addr in local if addr.endswith(":6443")], local


@pytest.mark.parametrize("bad", ["prometheus_url: http://10.0.0.5:9090"])
def test_lab_refuses_prometheus_off_loopback(tmp_path, bad):
    config = make_lab_config(tmp_path, prefix="p", ip_base=80, cluster="gpuforge-prom")
    text = "\n".join(line for line in config.read_text().splitlines() if not line.startswith("prometheus_url"))
    config.write_text(text + f"\n{bad}\n")
    result = run("lab", "up", "--config", str(config))
    assert result.returncode == 1 and "must be http://127.0.0.1:<port> in the lab" in result.stderr
