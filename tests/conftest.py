"""Shared fixtures: a Prefect test server, one lab per test session, and the day-2 configs of that lab.

The lab of the tests is a copy of deployments/lab/config.yml with its own cluster name, node names,
addresses and ports, kept in a temporary folder, so it never collides with a developer's running lab.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
LAB_CONFIG = REPO / "deployments" / "lab" / "config.yml"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_lab_config(folder: Path, prefix: str = "t", ip_base: int = 100, cluster: str = "gpuforge-test") -> Path:
    """Write a lab config into `folder`: same nodes as the lab's, renamed and readdressed, paths absolute."""
    yaml = YAML()
    data = yaml.load(LAB_CONFIG.read_text())
    state = folder / "state"
    data["cluster_name"] = cluster
    data["kubeconfig"] = str(state / "kubeconfig")
    data["ansible_ssh_private_key_file"] = str(state / "ssh" / "id_ed25519")
    data["prometheus_url"] = f"http://127.0.0.1:{free_port()}"
    for key in ("checkout", "playbook"):
        data["kubespray"][key] = str((LAB_CONFIG.parent / data["kubespray"][key]).resolve())
    for i, node in enumerate(data["k8s_cluster_nodes"]):
        node["name"] = f"{prefix}{node['name']}"
        node["ip"] = f"198.51.100.{ip_base + i}"
    data["chart_mirror"] = str((LAB_CONFIG.parent / data["chart_mirror"]).resolve())
    for service in data["deepops_services"].values():
        for pin in (service.get("releases") or {}).values():
            if "path" in pin:
                pin["path"] = str((LAB_CONFIG.parent / pin["path"]).resolve())
    path = folder / "config.yml"
    with path.open("w") as f:
        yaml.dump(data, f)
    return path


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def lab_config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lab")
    os.environ["GPUFORGE_STATE"] = str(folder / "gpuforge-state")
    return make_lab_config(folder)


@pytest.fixture(scope="session")
def lab(lab_config):
    """The test session's lab, up once; torn down at the end (a test checks nothing is left behind)."""
    from gpuforge.config import load_config
    from lab.lab import Lab

    the_lab = Lab(load_config(lab_config))
    the_lab.up()
    yield the_lab
    the_lab.down()


def config_variant(config: Path, folder: Path, change) -> Path:
    """A copy of `config` in `folder` after `change(data)` edited its YAML data in place."""
    yaml = YAML()
    data = yaml.load(config.read_text())
    change(data)
    path = folder / "config.yml"
    with path.open("w") as f:
        yaml.dump(data, f)
    return path


@pytest.fixture(scope="session")
def first_install(lab, lab_config, prefect_server):
    """The session's first `install` of its lab (all phases), run once whichever test module needs it first."""
    from flows.install import InstallParams, install

    state = install(InstallParams(config=str(lab_config)), return_state=True)
    return state


# The day-2 configs (gpu-health, remediation, faults): the lab config plus a 20 s XID window (the default 2 h would
# keep an injected XID 79 in the verdicts for two hours).
XID_WINDOW = "20s"


def day2_variant(base: Path, name: str, **keys) -> Path:
    yaml = YAML()
    data = yaml.load(base.read_text())
    data["health"] = {"thresholds": {"default": {"xid_window": XID_WINDOW}}}
    data.update(keys)
    path = base.parent / f"{name}.yml"
    with path.open("w") as f:
        yaml.dump(data, f)
    return path


@pytest.fixture(scope="module")
def installed(lab, first_install):
    assert first_install.is_completed(), first_install.message
    return lab


@pytest.fixture(scope="module")
def configs(lab_config):
    """Remediation off and on (cordon + Slurm drain, at most half the GPU nodes)."""
    return {
        "off": day2_variant(lab_config, "day2-off", remediate="off"),
        "on": day2_variant(lab_config, "day2-on", remediate="cordon+drain-slurm", remediation_max_fraction=0.5),
    }


@pytest.fixture(scope="module")
def cfg(configs):
    from gpuforge.config import load_config

    return load_config(configs["off"])
