"""The real Kubespray v2.31.0 against lab SSH hosts, through the kubespray phase's own tasks: its checkout from
the release tarball, its own venv, its inventory validation and fact gathering over SSH, then the lab's node
registration (here with a stand-in for `python -m lab.nodes register`: these hosts have no lab API server).

Only Kubespray's validate_inventory and fact gathering ever run against the hosts: they share this machine's
filesystem, so bootstrap_os (packages, hostname) is skipped, and the run that forgets to skip it is refused
before any Kubespray play starts (proved with a tripwire checkout, not with the real one).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from prefect import flow
from ruamel.yaml import YAML

from gpuforge import desired
from gpuforge.config import load_config
from gpuforge.plan import write_plan
from lab.sshhosts import HostSpec, SshHosts, free_lab_ips
from tasks.ansible import run_playbook
from tasks.ansible_tasks import prepare_kubespray, run_kubespray
from tasks.kubespray import what_kubespray_did
from tests.conftest import LAB_CONFIG, config_variant, make_lab_config

TARBALL = (LAB_CONFIG.parent / "../../../shared/upstream/kubespray-v2.31.0.tar.gz").resolve()
pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("sshd") or not shutil.which("ip"), reason="needs root, sshd, iproute2"
    ),
    pytest.mark.skipif(not TARBALL.exists(), reason=f"no Kubespray release tarball at {TARBALL}"),
    pytest.mark.usefixtures("prefect_server"),
]

RUN = f"tks{os.getpid() % 100000}"
# From .150 up: clear of the addresses the session's lab and developers' labs use.
IPS = free_lab_ips(4, first=150 + os.getpid() % 60)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Four lab SSH hosts and a lab config for them (the lab's kubespray section, as `lab up` would use it)."""
    folder = tmp_path_factory.mktemp("kubespray")

    def readdress(data):
        for node, ip in zip(data["k8s_cluster_nodes"], IPS, strict=True):
            node["ip"] = ip

    config_path = config_variant(make_lab_config(folder, prefix=f"{RUN}-"), folder, readdress)
    config = load_config(config_path)
    state = config.kubeconfig_path().parent
    hosts = SshHosts(state)
    env = pytest.MonkeyPatch()
    # These hosts have new host keys: a known_hosts of their own (accept-new pins them), not the session's.
    env.setenv("GPUFORGE_STATE", str(folder / "gpuforge-state"))
    try:
        hosts.up([HostSpec(n.name, n.spec.ip, n.spec.gpu_count or 0) for n in config.nodes])
        # What `lab up` writes for the lab playbook, with a stand-in for the lab's Python that records each
        # registration instead of creating a Node in an API server.
        fake_python = state / "fake-python"
        fake_python.write_text(f'#!/bin/sh\necho "$@" >> {state / "registered"}\necho \'{{"changed": true}}\'\n')
        fake_python.chmod(0o755)
        config.kubeconfig_path().write_text("lab admin kubeconfig\n")
        (state / "kubespray-lab.json").write_text(
            json.dumps(
                {"lab_python": str(fake_python), "lab_pythonpath": "", "lab_kubeconfig": str(config.kubeconfig_path())}
            )
        )
        yield config_path, hosts
    finally:
        hosts.down()
        env.undo()


@flow(name="test-kubespray-phase")
def kubespray_tasks(config_path: str, inventory: str):
    """The kubespray phase's tasks, as flows.kubespray calls them (without its wait for Ready nodes)."""
    config = load_config(config_path)
    checkout, playbook, binary = prepare_kubespray(config)
    return checkout, run_kubespray(config, checkout, playbook, Path(inventory), binary)


def test_real_kubespray_validates_gathers_facts_then_the_lab_registers_nodes(site, tmp_path):
    config_path, _hosts = site
    config = load_config(config_path)
    write_plan(desired.build(config), tmp_path)
    started = time.monotonic()
    checkout, run = kubespray_tasks(str(config_path), str(tmp_path / "hosts.yaml"))
    print(f"lab playbook (Kubespray facts.yml + registration) on 4 hosts: {time.monotonic() - started:.1f}s")
    assert run.status == "successful", run.recap()
    names = sorted(n.name for n in config.nodes)
    assert [r["host"] for r in run.recap() if r["host"] != "localhost"] == names
    # Kubespray's own roles ran, from the checkout the tarball became, with its pinned ansible.
    roles = {Path(f).relative_to(checkout).parts[:2] for f in run.task_files if f.startswith(str(checkout))}
    assert {("roles", "validate_inventory"), ("roles", "network_facts"), ("roles", "dynamic_groups")} <= roles
    assert not any("bootstrap" in part for _, part in roles)
    ran = {(t.task, t.status) for tasks in run.hosts.values() for t in tasks}  # run_once tasks: on one host
    assert {
        ("Check 2.18.0 <= Ansible version < 2.19.0", "ok"),
        ("Stop if kube_control_plane group is empty", "ok"),
        ("Stop if even number of etcd hosts", "ok"),
        ("Stop if unsupported version of Kubernetes", "ok"),
        ("Check that kube_pods_subnet does not collide with kube_service_addresses", "ok"),
    } <= ran
    for name in names:
        done = {t.task: t.status for t in run.hosts[name]}
        assert done["Gather minimal facts"] == "ok" and done["Join node to the cluster"] == "changed"
    # The lab's registration got each host's name, kube_version and labels.
    calls = (config.kubeconfig_path().parent / "registered").read_text().splitlines()
    registered = [line for line in calls if " lab.nodes register " in line]
    # ... and, with the local-path addon enabled in group_vars, the addon's StorageClass.
    assert [line for line in calls if " lab.nodes local-path-storage-class " in line], calls
    assert sorted(line.split("--name ")[1].split()[0] for line in registered) == names
    assert all("--kubelet-version 1.35.4" in line for line in registered)
    assert (tmp_path / "artifacts" / "admin.conf").read_text() == "lab admin kubeconfig\n"
    assert what_kubespray_did(run, checkout, "v2.31.0") == (
        "validated and facts gathered by Kubespray v2.31.0; node provisioning simulated by the lab"
    )


def test_even_etcd_count_is_refused_in_kubespray_own_words(site, tmp_path):
    """gpuforge's config refuses an even etcd count itself; an inventory changed behind its back meets
    Kubespray's own assert."""
    config_path, _hosts = site
    config = load_config(config_path)
    write_plan(desired.build(config), tmp_path)
    yaml = YAML()
    inventory = yaml.load((tmp_path / "hosts.yaml").read_text())
    etcd = inventory["all"]["children"]["etcd"]["hosts"]
    etcd[next(n.name for n in config.nodes if n.name not in etcd)] = None
    with (tmp_path / "hosts.yaml").open("w") as f:
        yaml.dump(inventory, f)
    checkout, run = kubespray_tasks(str(config_path), str(tmp_path / "hosts.yaml"))
    assert run.status == "failed"
    failed = [(h, t) for h, tasks in run.hosts.items() for t in tasks if t.status == "failed"]
    assert [t.task for _, t in failed] == ["Stop if even number of etcd hosts"]
    assert failed[0][1].message == "Assertion failed"
    assert any(f.endswith("roles/validate_inventory/tasks/main.yml") for f in run.task_files)
    # Refused before any fact was gathered or any node registered.
    assert not any(t.task in ("Gather minimal facts", "Join node to the cluster") for _, t in failed)
    assert all(t.task != "Join node to the cluster" for tasks in run.hosts.values() for t in tasks)


def test_lab_playbook_refuses_to_run_kubespray_without_skipping_bootstrap_os(site, tmp_path):
    """A tripwire stands in for Kubespray's facts.yml: the real one would let bootstrap_os change this machine."""
    config_path, hosts = site
    variant = config_variant(config_path, tmp_path, lambda data: data["kubespray"].update(skip_tags=[]))
    config = load_config(variant)
    write_plan(desired.build(config), tmp_path / "inventory")
    tripwire = tmp_path / "tripwire"
    (tripwire / "playbooks").mkdir(parents=True)
    (tripwire / "playbooks" / "facts.yml").write_text(
        f"- hosts: all\n  gather_facts: false\n  tasks:\n"
        f"    - ansible.builtin.file: {{path: {tmp_path / 'tripped'}, state: touch}}\n"
        f"      delegate_to: localhost\n"
    )
    run = run_playbook(
        playbook=config.path(config.kubespray.playbook),
        inventory=tmp_path / "inventory" / "hosts.yaml",
        project_dir=tripwire,
        extravars={"gpuforge_kubespray_dir": str(tripwire), "gpuforge_kubeconfig": str(config.kubeconfig_path())},
        skip_tags=config.kubespray.skip_tags,
        host_key_checking="off",  # the tripwire is the point here, not host keys
    )
    assert run.status == "failed" and not (tmp_path / "tripped").exists()
    [failed] = [t for t in run.hosts["localhost"] if t.status == "failed"]
    assert "set kubespray.skip_tags: [bootstrap_os]" in failed.message
