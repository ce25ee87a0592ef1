"""SSH test hosts in network namespaces: real sshd, real SSH, faked hardware facts."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lab import procs
from lab.sshhosts import BRIDGE, HostSpec, SshHosts, _veth, free_lab_ips, netns_name

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("sshd") or not shutil.which("ip"),
    reason="needs root, sshd, iproute2",
)

# Names and addresses unique per run: other test runs may use the lab on the same machine at the same time.
RUN = f"tsh{os.getpid() % 100000}"
GPU, CPU = f"{RUN}-gpu", f"{RUN}-cpu"
GPU_IP, CPU_IP, SPARE_IP = free_lab_ips(3, first=100 + os.getpid() % 120)
HOSTS = [HostSpec(GPU, GPU_IP, 8), HostSpec(CPU, CPU_IP, 0)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    hosts = SshHosts(tmp_path_factory.mktemp("sshlab"))
    t0 = time.monotonic()
    hosts.up(HOSTS)
    print(f"2 hosts up in {time.monotonic() - t0:.2f}s")
    yield hosts
    hosts.down()


def sh(lab: SshHosts, host: str, cmd: str) -> str:
    proc = lab.ssh(host, cmd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_key_is_private_ed25519(lab):
    assert lab.key_path.stat().st_mode & 0o777 == 0o600
    assert lab.key_path.with_suffix(".pub").read_text().startswith("ssh-ed25519 ")


def test_distinct_hostname_and_address_per_host_over_ssh(lab):
    assert sh(lab, GPU, "hostname") == GPU
    assert sh(lab, CPU, "hostname") == CPU
    assert sh(lab, CPU, "cat /etc/hostname") == CPU
    # the SSH server sees our bridge address; each host resolves its peers through its private /etc/hosts
    assert sh(lab, GPU, "echo $SSH_CONNECTION").split()[2] == GPU_IP
    assert sh(lab, GPU, f"getent hosts {CPU}").split()[0] == CPU_IP
    assert "nameserver 127.0.0.1" in sh(lab, CPU, "cat /etc/resolv.conf")
    # no default route leaves a host namespace
    assert "default" not in sh(lab, GPU, "ip route")
    # the root namespace keeps its own hostname
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() not in (GPU, CPU)


@pytest.mark.skipif(not Path(".venv/bin/ansible").exists(), reason="ansible not in the venv")
def test_ansible_setup_sees_per_host_facts(lab, tmp_path):
    inv = lab.write_inventory(tmp_path / "inventory.ini")
    proc = subprocess.run(
        [".venv/bin/ansible", "all", "-i", str(inv), "-m", "setup", "-a",
         "filter=ansible_hostname,ansible_memtotal_mb,ansible_mounts", "-o"],
        env={**os.environ, **lab.ansible_env()}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split(" | ")[0]: line for line in proc.stdout.splitlines() if " | " in line}
    assert f'"ansible_hostname": "{GPU}"' in lines[GPU]
    assert f'"ansible_hostname": "{CPU}"' in lines[CPU]
    assert '"ansible_memtotal_mb": 65536' in lines[CPU]
    assert '"mount": "/var/lib/containerd"' in lines[GPU]


def test_gpu_host_shows_nvidia_pci_devices_cpu_host_none(lab):
    assert sh(lab, GPU, "grep -l 0x10de /sys/bus/pci/devices/*/vendor | wc -l") == "8"
    assert sh(lab, CPU, "grep -l 0x10de /sys/bus/pci/devices/*/vendor | wc -l") == "0"
    assert sh(lab, GPU, "cat /sys/bus/pci/devices/0000:18:00.0/class") == "0x030200"
    # non-NVIDIA devices are there on both
    assert int(sh(lab, CPU, "ls /sys/bus/pci/devices | wc -l")) == 3
    # the root namespace still sees the machine's real PCI tree
    real = [p.name for p in Path("/sys/bus/pci/devices").iterdir()]
    assert "0000:18:00.0" not in real


def test_default_facts(lab):
    assert not sh(lab, GPU, "test -e /sys/module/nouveau && echo yes || echo no") == "yes"
    assert sh(lab, GPU, "awk '/MemTotal/{print $2}' /proc/meminfo") == str(524288 * 1024)
    assert sh(lab, GPU, "tail -n +2 /proc/swaps | wc -l") == "0"
    assert sh(lab, GPU, "df -B1G --output=size /var/lib/containerd | tail -1").strip() == "500"
    assert sh(lab, GPU, "test -e /run/systemd/timesync/synchronized && echo yes") == "yes"


def test_set_fact_changes_what_the_host_reports(lab):
    lab.set_fact(CPU, "gpus", 2)
    lab.set_fact(CPU, "nouveau", True)
    lab.set_fact(CPU, "swap_mb", 4096)
    lab.set_fact(CPU, "memory_mb", 32768)
    lab.set_fact(CPU, "disk_free_gb", 7)
    lab.set_fact(CPU, "time_synced", False)
    try:
        assert sh(lab, CPU, "grep -l 0x10de /sys/bus/pci/devices/*/vendor | wc -l") == "2"
        assert sh(lab, CPU, "cat /sys/module/nouveau/initstate") == "live"
        assert sh(lab, CPU, "awk '/SwapTotal/{print $2}' /proc/meminfo") == str(4096 * 1024)
        assert "/swapfile" in sh(lab, CPU, "cat /proc/swaps")
        assert sh(lab, CPU, "awk '/MemTotal/{print $2}' /proc/meminfo") == str(32768 * 1024)
        assert sh(lab, CPU, "df -B1G --output=size /var/lib/containerd | tail -1").strip() == "7"
        assert sh(lab, CPU, "test -e /run/systemd/timesync/synchronized && echo yes || echo no") == "no"
        # the other host is untouched
        assert sh(lab, GPU, "test -e /sys/module/nouveau && echo yes || echo no") == "no"
    finally:
        for key, value in [("gpus", 0), ("nouveau", False), ("swap_mb", 0), ("memory_mb", 65536),
                           ("disk_free_gb", 500), ("time_synced", True)]:  # fmt: skip
            lab.set_fact(CPU, key, value)
    assert sh(lab, CPU, "grep -l 0x10de /sys/bus/pci/devices/*/vendor | wc -l") == "0"
    with pytest.raises(KeyError):
        lab.set_fact(CPU, "no_such_fact", 1)


def test_refuses_addresses_outside_the_lab_subnet(lab):
    for ip in ("10.0.0.5", "192.0.2.7", "198.51.100.1", "198.51.100.255", "not-an-ip"):
        with pytest.raises(ValueError):
            lab.up([HostSpec(f"{RUN}-bad", ip, 0)])
    with pytest.raises(ValueError, match="already used"):
        lab.up([HostSpec(f"{RUN}-dup", GPU_IP, 0)])
    assert f"{RUN}-bad" not in lab.status()


def test_another_lab_cannot_take_these_hosts(lab, tmp_path):
    other = SshHosts(tmp_path / "other")
    with pytest.raises(ValueError, match="clashes"):
        other.up([HostSpec(GPU, SPARE_IP, 0)])
    with pytest.raises(ValueError, match="clashes"):
        other.up([HostSpec(f"{RUN}-other", CPU_IP, 0)])
    assert lab.status() == {GPU: True, CPU: True}


def test_up_is_idempotent(lab):
    before = procs.read_pid(lab.workdir, f"sshd-{GPU}")
    lab.up(HOSTS)
    assert procs.read_pid(lab.workdir, f"sshd-{GPU}") == before
    assert lab.status() == {GPU: True, CPU: True}


def test_killed_host_is_unreachable_until_revived(lab):
    # a long-lived session inside the host must die too
    sleeper = subprocess.Popen(lab.ssh_argv(CPU, "sleep 300"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    lab.kill(CPU)
    try:
        assert sleeper.wait(timeout=10) != 0
        pids = subprocess.run(["ip", "netns", "pids", netns_name(CPU)], capture_output=True, text=True)
        assert pids.stdout == ""
        proc = lab.ssh(CPU, "true")
        assert proc.returncode == 255
        assert lab.status()[CPU] is False
        assert lab.status()[GPU] is True
    finally:
        lab.revive(CPU)
    assert sh(lab, CPU, "hostname") == CPU


def test_sixteen_hosts_up_fast_and_teardown_leaves_nothing(tmp_path):
    hosts = SshHosts(tmp_path / "big")
    ips = free_lab_ips(16, first=100 + (os.getpid() + 50) % 120)
    specs = [HostSpec(f"{RUN}-n{i:02d}", ip, 8) for i, ip in enumerate(ips)]
    t0 = time.monotonic()
    try:
        hosts.up(specs)
        elapsed = time.monotonic() - t0
        print(f"16 hosts up in {elapsed:.2f}s")
        assert elapsed < 30
        assert all(hosts.status().values()) and len(hosts.status()) == 16
        assert sh(hosts, f"{RUN}-n15", "hostname") == f"{RUN}-n15"
        pids = [procs.read_pid(hosts.workdir, f"sshd-{s.name}") for s in specs]
    finally:
        hosts.down()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{RUN}-n" not in netns
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for s in specs:
        assert _veth(s.name) not in links
        assert not Path("/run/netns", netns_name(s.name)).exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert f"gflab-disk-{RUN}-n" not in Path("/proc/mounts").read_text()
    assert f"{RUN}-n" not in Path("/proc/self/mountinfo").read_text()
    # the bridge stays only while another lab (e.g. this module's fixture) still has hosts on it
    others = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True)
    if f" {BRIDGE}:" in links:
        assert others.stdout.strip(), "bridge left behind without any lab host on it"
