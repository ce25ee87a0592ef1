"""SSH test hosts of the lab: one network namespace, hostname and sshd per host, with faked hardware facts.

Layout
------
* Bridge ``gfbr0`` in the root namespace holds 198.51.100.1/24 (TEST-NET-2, documentation range). Host IPs
  must lie in 198.51.100.0/24 (not .0, .1, .255); anything else is refused with ``ValueError``.
* Each host ``<name>`` gets the network namespace ``gf-<name>``: loopback plus ``eth0`` (a veth whose root
  side, ``gfv<hash>``, is enslaved to the bridge). There is no default route, so nothing leaves the lab.
* In it runs ``unshare --uts --mount`` + the host's own ``sshd -D -e -f <own config>`` listening on
  ``<ip>:22`` only (root login with the lab key only, no PAM, no passwords). The hostname is the host name.
* The private mount namespace of that sshd (and so of every SSH session, every Ansible module) has
  private ``/etc/hosts`` (all lab hosts), ``/etc/hostname`` and ``/etc/resolv.conf``
  (``nameserver 127.0.0.1``: lookups fail at once instead of leaving the lab) and the faked facts below.
  Files live in ``<workdir>/hosts/<name>/`` and are bind-mounted, so :meth:`SshHosts.set_fact` changes
  them live.

Client side
-----------
``SshHosts.key_path`` is the lab's private key (ed25519, mode 600). Connect as ``root`` with
``-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null`` (every ``up`` makes new host keys);
:meth:`SshHosts.ansible_env` gives ANSIBLE_* variables including ``ServerAliveInterval=2``/
``ServerAliveCountMax=3`` so a host that disappears is reported unreachable in ~7 s instead of hanging, and
:meth:`SshHosts.write_inventory` writes an INI inventory (``ansible_host=<ip>``).

Facts for the preflight playbook (key for ``set_fact`` -> what the host shows, and where to read it)
---------------------------------------------------------------------------------------------------
All are read through the ordinary Linux paths inside the host (over SSH, e.g. Ansible ``slurp``/``stat``/
``command`` or the ``setup`` facts named here).

``gpus`` (int, default ``HostSpec.gpus``)
    NVIDIA PCI devices in ``/sys/bus/pci/devices/<addr>/`` with files ``vendor`` (``0x10de``), ``device``
    (``0x2330``, H100 SXM5 80GB; key ``gpu_pci_device`` changes it), ``class`` (``0x030200``, 3D
    controller), ``subsystem_vendor``, ``subsystem_device``, ``revision``, ``numa_node``, ``uevent``. Every
    host also shows three non-NVIDIA devices (Intel host bridge ``0x8086``, virtio NIC ``0x1af4``, Samsung
    NVMe ``0x144d``). Count GPUs as entries whose ``vendor`` is ``0x10de`` and whose ``class`` starts with
    ``0x0302`` or ``0x0300`` (``grep -l 0x10de /sys/bus/pci/devices/*/vendor``). The addresses follow a DGX
    H100 (``0000:18:00.0``, ``0000:2a:00.0``, ...), the same bus ids the DCGM simulator reports.
    The entries are directories, not symlinks into ``/sys/devices``; ``lspci`` is not supported.
``nouveau`` (bool, default False)
    Loaded kernel modules are shown in ``/sys/module/<name>/initstate`` (content ``live``). nouveau is
    loaded iff ``/sys/module/nouveau/initstate`` exists (``test -e``). ``/proc/modules`` (and so ``lsmod``)
    does NOT exist on the lab kernel (built without loadable modules) and cannot be faked (no mount point
    can be created in procfs), so the playbook must read ``/sys/module/nouveau`` -- which is also correct on
    real hosts. A few other modules (``overlay``, ``br_netfilter``, ``nf_conntrack``) are listed too.
``swap_mb`` (int, default 0 = swap off)
    ``/proc/swaps`` lists ``/swapfile`` when on (header only when off); ``/proc/meminfo`` ``SwapTotal``/
    ``SwapFree`` match, so Ansible's ``ansible_swaptotal_mb`` agrees. Alias key ``swap`` (bool: 8192 MiB / 0).
``memory_mb`` (int, default 524288 on GPU hosts, 65536 on CPU hosts)
    ``/proc/meminfo`` ``MemTotal`` (kB) -> Ansible ``ansible_memtotal_mb``.
``disk_free_gb`` (int, default 500)
    A size-limited tmpfs mounted at ``/var/lib/containerd`` (where container images go, the directory a
    Kubernetes preflight should check). Read ``df -B1 --output=avail /var/lib/containerd`` or Ansible's
    ``ansible_mounts`` entry with ``mount == "/var/lib/containerd"`` (``size_available``). tmpfs is lazy,
    so the size may exceed RAM. Changing it remounts the tmpfs with the new size (contents kept). Its source
    is named ``/dev/gflab-disk-<name>`` because Ansible leaves out mounts whose source does not start with
    ``/``.
``time_synced`` (bool, default True)
    The systemd-timesyncd marker ``/run/systemd/timesync/synchronized`` exists iff the clock is synchronised
    (Ansible ``stat``; ``timedatectl`` is not available in the lab).
Kernel release
    Left real (``uname -r`` / ``ansible_kernel``); the lab does not fake it.

Faking works because bind mounts over single files in /proc and /sys and over directories in /sys were
verified on the lab machine; only /proc/modules is impossible (see above).

Processes: daemon ``sshd-<name>`` (lab.procs). :meth:`SshHosts.kill` kills every pid in
``ip netns pids gf-<name>`` (sshd, sessions, ControlPersist children, a slurmd there), so the host is truly
gone (connection refused); :meth:`SshHosts.revive` starts its sshd again. :meth:`SshHosts.down` removes
processes, namespaces, veths (and the bridge when no lab veth is left on it); mounts die with their
namespaces.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lab import procs

LAB_SUBNET = ipaddress.ip_network("198.51.100.0/24")
BRIDGE = "gfbr0"
BRIDGE_IP = "198.51.100.1"
NETNS_PREFIX = "gf-"
DISK_PATH = "/var/lib/containerd"
TIMESYNC_DIR = "/run/systemd/timesync"
# Which lab (workdir) owns which host namespace, so two labs on one machine do not take each other's hosts.
OWNERS = Path("/run/gpuforge-lab/hosts")
IP_OWNERS = Path("/run/gpuforge-lab/ips")
# PCI bus numbers of the eight GPUs in a DGX H100, used by the DCGM simulator too.
GPU_BUSES = [0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB]
SSH_OPTS = [
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=5",
    "-o", "ServerAliveInterval=2",
    "-o", "ServerAliveCountMax=3",
]  # fmt: skip
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
FACT_KEYS = (
    "gpus",
    "gpu_pci_device",
    "nouveau",
    "swap_mb",
    "swap",
    "memory_mb",
    "disk_free_gb",
    "time_synced",
)


@dataclass
class HostSpec:
    name: str
    ip: str
    gpus: int


def gpu_pci_address(index: int) -> str:
    """Sysfs PCI address of GPU `index` (DGX H100 layout, then further buses)."""
    bus = GPU_BUSES[index] if index < len(GPU_BUSES) else 0xE0 + index - len(GPU_BUSES)
    return f"0000:{bus:02x}:00.0"


def netns_name(name: str) -> str:
    return NETNS_PREFIX + name


def netns_exists(name: str) -> bool:
    return Path("/run/netns", netns_name(name)).exists()


def _veth(name: str) -> str:
    # Interface names are limited to 15 characters; host names are not.
    return "gfv" + hashlib.sha1(name.encode()).hexdigest()[:10]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _link_exists(dev: str, netns: str | None = None) -> bool:
    args = ["-n", netns] if netns else []
    return _ip(*args, "link", "show", "dev", dev, check=False).returncode == 0


def netns_pids(ns: str) -> list[int]:
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split() if p.strip().isdigit()]


def free_lab_ips(count: int, first: int = 100) -> list[str]:
    """`count` lab addresses from .`first` up that no live lab host has claimed (for tests and tools)."""
    out = []
    for last in range(first, 255):
        ip = f"198.51.100.{last}"
        try:
            owner = json.loads((IP_OWNERS / ip).read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("name") and netns_exists(owner["name"]):
            continue
        out.append(ip)
        if len(out) == count:
            return out
    raise RuntimeError(f"fewer than {count} free addresses in the lab subnet")


def validate_ip(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise ValueError(f"host IP {ip!r} is not an IP address") from exc
    if addr not in LAB_SUBNET:
        raise ValueError(f"host IP {ip} is outside the lab subnet {LAB_SUBNET}; only lab addresses are allowed")
    if addr in (LAB_SUBNET.network_address, LAB_SUBNET.broadcast_address, ipaddress.ip_address(BRIDGE_IP)):
        raise ValueError(f"host IP {ip} is reserved in the lab subnet (network, broadcast or bridge {BRIDGE_IP})")
    return str(addr)


def _claim_alive(owner: dict) -> bool:
    """A claim holds while its lab can still be up: the namespace exists, its lab folder exists, and some
    process still runs in the namespace. A lab killed without `down` (a crashed test run, a reboot of the
    session) leaves namespaces with no process in them; their claims are stale and may be taken over."""
    name = owner["name"]
    return (
        netns_exists(name)
        and Path(owner.get("workdir", "/nonexistent")).exists()
        and bool(netns_pids(netns_name(name)))
    )


def _write(path: Path, text: str, mode: int | None = None) -> None:
    """Write in place (same inode), so a bind mount of `path` shows the new content."""
    if path.exists():
        with open(path, "r+") as fh:
            fh.write(text)
            fh.truncate()
    else:
        path.write_text(text)
    if mode is not None:
        path.chmod(mode)


def _port_open(ip: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_bridge() -> None:
    """The lab bridge with the root namespace's lab address (the only way into the lab's namespaces)."""
    if not _link_exists(BRIDGE):
        _ip("link", "add", BRIDGE, "type", "bridge")
    addrs = _ip("-o", "-4", "addr", "show", "dev", BRIDGE).stdout
    if f"{BRIDGE_IP}/24" not in addrs:
        _ip("addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def remove_bridge_if_unused() -> None:
    if not _link_exists(BRIDGE):
        return
    if _ip("-o", "link", "show", "master", BRIDGE, check=False).stdout.strip():
        return  # another lab (other workdir) still has namespaces on it
    _ip("link", "del", BRIDGE, check=False)


def claim(workdir: Path, name: str, ip: str) -> None:
    """Claim namespace `name` and address `ip` for the lab in `workdir` (ValueError if a live lab holds one)."""
    record = {"workdir": str(workdir), "name": name, "ip": validate_ip(ip)}
    made: list[Path] = []
    try:
        for path in (OWNERS / name, IP_OWNERS / record["ip"]):
            if _claim(path, record):
                made.append(path)
    except ValueError:
        for path in made:
            path.unlink(missing_ok=True)
        raise


def _claim(path: Path, record: dict) -> bool:
    """Claim `path` for `record`; True if newly made, False if already ours; ValueError if taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(record)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, ValueError):
                owner = {}
            if owner.get("workdir") == record["workdir"] and owner.get("name") == record["name"]:
                return False
            if owner.get("name") and _claim_alive(owner):
                raise ValueError(
                    f"lab host {record['name']} ({record['ip']}) clashes with host {owner['name']} "
                    f"({owner.get('ip')}) of the lab in {owner.get('workdir')}"
                ) from None
            path.unlink(missing_ok=True)  # stale claim: its lab is gone (see _claim_alive)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
        return True
    raise RuntimeError(f"could not claim {path}")


def release(workdir: Path, name: str) -> None:
    """Give up the claims of namespace `name` held by the lab in `workdir`."""
    for path in [OWNERS / name, *IP_OWNERS.glob("*")] if IP_OWNERS.is_dir() else [OWNERS / name]:
        try:
            owner = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if owner.get("workdir") == str(workdir) and owner.get("name") == name:
            path.unlink(missing_ok=True)


def make_namespace(workdir: Path, name: str, ip: str) -> None:
    """Network namespace `gf-<name>`: loopback plus `eth0` = `ip`/24 on the lab bridge, and no default route,
    so whatever runs inside reaches only the lab subnet; a dial anywhere else fails at once ("Network is
    unreachable"). Leftovers of a crashed run are removed first ("RTNETLINK answers: File exists")."""
    remove_namespace(workdir, name)
    claim(workdir, name, ip)
    ns, veth = netns_name(name), _veth(name)
    _ip("netns", "add", ns)
    _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    _ip("link", "set", veth, "master", BRIDGE, "up")
    _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
    _ip("-n", ns, "link", "set", "eth0", "up")
    _ip("-n", ns, "link", "set", "lo", "up")


def remove_namespace(workdir: Path, name: str) -> None:
    """Kill every process in namespace `gf-<name>`, delete it, its veth and this lab's claims on it."""
    ns = netns_name(name)
    if Path("/run/netns", ns).exists():
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = netns_pids(ns)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 3
            while pids and time.monotonic() < deadline:
                time.sleep(0.05)
                pids = netns_pids(ns)
    _ip("netns", "del", ns, check=False)
    if _link_exists(_veth(name)):
        _ip("link", "del", _veth(name), check=False)
    release(workdir, name)


class SshHosts:
    """The lab's SSH hosts under `workdir` (state in `<workdir>/hosts.json`, files in `<workdir>/hosts/`)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir).resolve()
        self.key_path = self.workdir / "ssh" / "id_ed25519"
        self.known_hosts = Path("/dev/null")  # host keys change with every `up`; never check them
        self._state_file = self.workdir / "hosts.json"

    # ----- state -------------------------------------------------------------------------------------
    def _load(self) -> dict[str, dict]:
        try:
            return json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return {}

    def _save(self, state: dict[str, dict]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(self._state_file)

    def hosts(self) -> list[HostSpec]:
        return [HostSpec(v["name"], v["ip"], v["gpus"]) for v in self._load().values()]

    def _hostdir(self, name: str) -> Path:
        return self.workdir / "hosts" / name

    def _daemon(self, name: str) -> str:
        return f"sshd-{name}"

    # ----- public API --------------------------------------------------------------------------------
    def up(self, hosts: list[HostSpec], timeout: float = 30.0) -> None:
        """Bring `hosts` up (idempotent: running hosts are left alone, others are (re)built)."""
        if os.geteuid() != 0:
            raise PermissionError("the SSH lab needs root (network namespaces, mounts)")
        state = self._load()
        ip_owner = {v["ip"]: k for k, v in state.items() if k not in {h.name for h in hosts}}
        for spec in hosts:
            if not _NAME_RE.match(spec.name):
                raise ValueError(f"host name {spec.name!r} is not a valid lowercase hostname")
            ip = validate_ip(spec.ip)
            if ip_owner.setdefault(ip, spec.name) != spec.name:
                raise ValueError(f"IP {ip} of host {spec.name} is already used by lab host {ip_owner[ip]}")
            if spec.gpus < 0:
                raise ValueError(f"host {spec.name}: gpus must be >= 0")
        self._check_other_labs(hosts)
        self._ensure_key()
        ensure_bridge()
        for mp in (DISK_PATH, TIMESYNC_DIR, "/run/sshd"):
            Path(mp).mkdir(parents=True, exist_ok=True)
        for spec in hosts:
            old = state.get(spec.name)
            new = {"name": spec.name, "ip": validate_ip(spec.ip), "gpus": spec.gpus}
            if old and old["ip"] == new["ip"] and old["gpus"] == new["gpus"] and self._alive(spec.name):
                continue
            if old and old["ip"] != new["ip"] and netns_exists(spec.name):
                self._destroy(spec.name)
            state[spec.name] = new
        self._save(state)
        self._write_etc_hosts(state)
        started = []
        for spec in hosts:
            if self._alive(spec.name):
                continue
            self._build(state[spec.name])
            started.append(spec.name)
        self._wait_listening(started, timeout)

    def down(self) -> None:
        """Remove every host: processes, namespaces, veths; the bridge too when no lab veth is left."""
        state = self._load()
        self._close_control_masters()
        for name in list(state):
            self._destroy(name)
        self._state_file.unlink(missing_ok=True)
        remove_bridge_if_unused()

    def remove(self, name: str) -> None:
        """Take one host out of the lab for good (a machine pulled from the rack): its processes, namespace,
        veth, claims and files go; the other hosts' /etc/hosts no longer name it."""
        state = self._load()
        if name not in state:
            return
        self._destroy(name)
        shutil.rmtree(self._hostdir(name), ignore_errors=True)
        del state[name]
        self._save(state)
        self._write_etc_hosts(state)

    def _close_control_masters(self) -> None:
        """Ask Ansible's ControlPersist ssh masters (root namespace) to exit."""
        root = self._cp_root()
        socks = [s for d in ("ansible", "ssh") if (root / d).is_dir() for s in (root / d).iterdir()]
        for sock in socks:
            subprocess.run(
                ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "lab-host"],
                capture_output=True, timeout=10, check=False,
            )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)

    def _cp_root(self) -> Path:
        # ssh control sockets need a short path (< 108 bytes), so not under a deep workdir.
        return Path("/tmp") / f"gflab-cp-{hashlib.sha1(str(self.workdir).encode()).hexdigest()[:10]}"

    def _cp_dir(self, kind: str) -> Path:
        d = self._cp_root() / kind
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    def status(self) -> dict[str, bool]:
        """name -> sshd runs and accepts connections on <ip>:22."""
        return {
            name: procs.is_running(self.workdir, self._daemon(name)) and _port_open(h["ip"], 22)
            for name, h in self._load().items()
        }

    def kill(self, name: str) -> None:
        """Make the host unreachable: SIGKILL every process in its network namespace."""
        self._require(name)
        ns = netns_name(name)
        for _ in range(5):
            pids = netns_pids(ns)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        procs.stop_daemon(self.workdir, self._daemon(name), timeout=1)

    def revive(self, name: str, timeout: float = 15.0) -> None:
        """Start the sshd of a killed host again (same namespace, address and facts)."""
        host = self._require(name)
        if self._alive(name):
            return
        if not netns_exists(name) or not _link_exists("eth0", netns_name(name)):
            self._build(host)
        else:
            self._start_sshd(host)
        self._wait_listening([name], timeout)

    def set_fact(self, name: str, key: str, value) -> None:
        """Change a simulated hardware fact (see module docstring); takes effect at once on a live host."""
        host = self._require(name)
        if key not in FACT_KEYS:
            raise KeyError(f"unknown fact {key!r}; known: {', '.join(FACT_KEYS)}")
        if key == "swap":
            key, value = "swap_mb", (8192 if value else 0)
        if isinstance(value, str) and key in ("nouveau", "time_synced"):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        facts = self._facts(host)
        caster = {"gpus": int, "swap_mb": int, "memory_mb": int, "disk_free_gb": int,
                  "nouveau": bool, "time_synced": bool, "gpu_pci_device": str}[key]  # fmt: skip
        facts[key] = caster(value)
        if key in ("gpus", "swap_mb", "memory_mb", "disk_free_gb") and facts[key] < 0:
            raise ValueError(f"{key} must be >= 0")
        self._write_facts(host, facts)
        if key == "disk_free_gb" and self._alive(name):
            pid = procs.read_pid(self.workdir, self._daemon(name))
            subprocess.run(
                ["nsenter", "-t", str(pid), "-m", "mount", "-o", f"remount,size={facts[key]}g", DISK_PATH],
                check=True, capture_output=True, timeout=10,
            )  # fmt: skip

    def facts(self, name: str) -> dict:
        return self._facts(self._require(name))

    def ssh_argv(self, name: str, *command: str) -> list[str]:
        """argv for running `command` on host `name` over real SSH."""
        host = self._require(name)
        cp = self._cp_dir("ssh")
        mux = ["-o", "ControlMaster=auto", "-o", f"ControlPath={cp}/%C", "-o", "ControlPersist=15s"]
        return ["ssh", "-i", str(self.key_path), *SSH_OPTS, *mux, f"root@{host['ip']}", *command]

    def ssh(self, name: str, *command: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_argv(name, *command), capture_output=True, text=True, timeout=timeout)

    def ansible_env(self) -> dict[str, str]:
        """ANSIBLE_* settings for running against the lab hosts (see lab-notes)."""
        cp = self._cp_dir("ansible")
        return {
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_PRIVATE_KEY_FILE": str(self.key_path),
            "ANSIBLE_REMOTE_USER": "root",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(cp),
            "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=30s -o ServerAliveInterval=2 "
            "-o ServerAliveCountMax=3 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            "ANSIBLE_TIMEOUT": "10",
            "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
        }

    def write_inventory(self, path: Path, group: str = "all_hosts") -> Path:
        lines = [f"[{group}]"]
        for name, h in sorted(self._load().items()):
            lines.append(f"{name} ansible_host={h['ip']} ansible_user=root gpus={h['gpus']}")
        path.write_text("\n".join(lines) + "\n")
        return path

    # ----- internals ---------------------------------------------------------------------------------
    def _require(self, name: str) -> dict:
        host = self._load().get(name)
        if host is None:
            raise KeyError(f"no lab host {name!r}")
        return host

    def _alive(self, name: str) -> bool:
        return netns_exists(name) and procs.is_running(self.workdir, self._daemon(name))

    def _ensure_key(self) -> None:
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.key_path.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpuforge-lab",
                 "-f", str(self.key_path)],
                check=True, timeout=30,
            )  # fmt: skip
        self.key_path.chmod(0o600)
        auth = self.key_path.parent / "authorized_keys"
        auth.write_text(self.key_path.with_suffix(".pub").read_text())
        auth.chmod(0o600)

    def _destroy(self, name: str) -> None:
        procs.stop_daemon(self.workdir, self._daemon(name), timeout=2)
        remove_namespace(self.workdir, name)

    def _check_other_labs(self, hosts: list[HostSpec]) -> None:
        """Claim each host's name and IP for this lab; refuse those a live host of another lab holds.

        Claims are files created with O_EXCL under /run/gpuforge-lab/{hosts,ips}/, so two labs (or two test
        runs) starting at once cannot both take a name or address. A claim whose namespace is gone is stale.
        """
        known = self._load()
        for spec in hosts:
            if netns_exists(spec.name) and not (OWNERS / spec.name).exists() and spec.name not in known:
                raise ValueError(f"network namespace {netns_name(spec.name)} exists and belongs to no lab of ours")
        for spec in hosts:
            claim(self.workdir, spec.name, spec.ip)

    def _build(self, host: dict) -> None:
        make_namespace(self.workdir, host["name"], host["ip"])
        self._prepare_files(host)
        self._start_sshd(host)

    def _prepare_files(self, host: dict) -> None:
        name, ip = host["name"], host["ip"]
        d = self._hostdir(name)
        for sub in ("pci", "sysmodule", "timesync"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        _write(d / "hostname", name + "\n")
        _write(d / "resolv.conf", "# gpuforge lab: no DNS leaves the lab\nnameserver 127.0.0.1\n")
        hostkey = d / "ssh_host_ed25519_key"
        for f in (hostkey, hostkey.with_suffix(".pub")):
            f.unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(hostkey)],
            check=True,
            timeout=30,
        )
        (d / "sshd_config").write_text(
            f"""# gpuforge lab host {name}
Port 22
ListenAddress {ip}
HostKey {hostkey}
PidFile {d / "sshd.pid"}
AuthorizedKeysFile {self.key_path.parent / "authorized_keys"}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
MaxStartups 200:30:400
MaxSessions 100
Subsystem sftp /usr/lib/openssh/sftp-server
AcceptEnv LANG LC_*
"""
        )
        if not (d / "facts.json").exists():
            self._write_facts(host, self._default_facts(host))
        else:
            self._write_facts(host, self._facts(host))

    def _default_facts(self, host: dict) -> dict:
        gpu = host["gpus"] > 0
        return {
            "gpus": host["gpus"],
            "gpu_pci_device": "0x2330",
            "nouveau": False,
            "swap_mb": 0,
            "memory_mb": 524288 if gpu else 65536,
            "disk_free_gb": 500,
            "time_synced": True,
        }

    def _facts(self, host: dict) -> dict:
        try:
            stored = json.loads((self._hostdir(host["name"]) / "facts.json").read_text())
        except FileNotFoundError:
            stored = {}
        return {**self._default_facts(host), **stored}

    def _write_facts(self, host: dict, facts: dict) -> None:
        d = self._hostdir(host["name"])
        d.mkdir(parents=True, exist_ok=True)
        (d / "facts.json").write_text(json.dumps(facts, indent=1, sort_keys=True))
        self._render_pci(d / "pci", facts["gpus"], facts["gpu_pci_device"])
        mods = d / "sysmodule"
        mods.mkdir(exist_ok=True)
        wanted = {"overlay", "br_netfilter", "nf_conntrack"} | ({"nouveau"} if facts["nouveau"] else set())
        for entry in mods.iterdir():
            if entry.name not in wanted:
                shutil.rmtree(entry)
        for mod in wanted:
            (mods / mod).mkdir(exist_ok=True)
            _write(mods / mod / "initstate", "live\n")
        swap_kb = facts["swap_mb"] * 1024
        swaps = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        if swap_kb:
            swaps += f"/swapfile                               file\t\t{swap_kb}\t\t0\t\t-2\n"
        _write(d / "swaps", swaps)
        _write(d / "meminfo", _meminfo(facts["memory_mb"] * 1024, swap_kb))
        marker = d / "timesync" / "synchronized"
        if facts["time_synced"]:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    @staticmethod
    def _render_pci(root: Path, gpus: int, gpu_device: str) -> None:
        devices = {
            "0000:00:00.0": ("0x8086", "0x09a2", "0x060000", "0x8086", "0x0000"),  # host bridge
            "0000:00:03.0": ("0x1af4", "0x1000", "0x020000", "0x1af4", "0x0001"),  # virtio NIC
            "0000:01:00.0": ("0x144d", "0xa80a", "0x010802", "0x144d", "0xa801"),  # NVMe
        }
        for i in range(gpus):
            devices[gpu_pci_address(i)] = ("0x10de", gpu_device, "0x030200", "0x10de", "0x16c1")
        for entry in root.iterdir():
            if entry.name not in devices:
                shutil.rmtree(entry)
        for addr, (vendor, device, cls, svendor, sdevice) in devices.items():
            e = root / addr
            e.mkdir(exist_ok=True)
            numa = "0" if int(addr[5:7], 16) < 0x80 else "1"
            files = {"vendor": vendor, "device": device, "class": cls, "subsystem_vendor": svendor,
                     "subsystem_device": sdevice, "revision": "0xa1" if vendor == "0x10de" else "0x01",
                     "numa_node": numa, "enable": "1",
                     "uevent": f"PCI_CLASS={cls[2:].upper()}\n"
                               f"PCI_ID={vendor[2:].upper()}:{device[2:].upper()}\n"
                               f"PCI_SUBSYS_ID={svendor[2:].upper()}:{sdevice[2:].upper()}\n"
                               f"PCI_SLOT_NAME={addr}\n"}  # fmt: skip
            for fname, content in files.items():
                _write(e / fname, content if content.endswith("\n") else content + "\n")

    def _write_etc_hosts(self, state: dict[str, dict]) -> None:
        lines = [
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
            f"{BRIDGE_IP}\tgf-lab-gateway",
        ]
        lines += [f"{h['ip']}\t{name}" for name, h in sorted(state.items())]
        text = "\n".join(lines) + "\n"
        for name in state:
            d = self._hostdir(name)
            d.mkdir(parents=True, exist_ok=True)
            _write(d / "etc_hosts", text)

    def _start_sshd(self, host: dict) -> None:
        name = host["name"]
        d = self._hostdir(name)
        facts = self._facts(host)
        mounts = [
            (d / "etc_hosts", "/etc/hosts"),
            (d / "hostname", "/etc/hostname"),
            (d / "resolv.conf", "/etc/resolv.conf"),
            (d / "pci", "/sys/bus/pci/devices"),
            (d / "sysmodule", "/sys/module"),
            (d / "meminfo", "/proc/meminfo"),
            (d / "swaps", "/proc/swaps"),
            (d / "timesync", TIMESYNC_DIR),
        ]
        shadow = self._shadow_copy(d)
        if shadow:
            mounts.append((shadow, "/etc/shadow"))
        script = ["set -e", f"hostname {name}"]
        script += [f"mount --bind '{src}' '{dst}'" for src, dst in mounts]
        script.append(f"mount -t tmpfs -o size={facts['disk_free_gb']}g,mode=755 /dev/gflab-disk-{name} {DISK_PATH}")
        script.append(f"exec /usr/sbin/sshd -D -e -f '{d / 'sshd_config'}'")
        procs.start_daemon(
            self.workdir,
            self._daemon(name),
            ["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
            netns=netns_name(name),
        )

    @staticmethod
    def _shadow_copy(d: Path) -> Path | None:
        """sshd without PAM refuses a locked root ("root:!..."); give such hosts a copy with "*" instead."""
        try:
            lines = Path("/etc/shadow").read_text().splitlines()
        except OSError:
            return None
        out, changed = [], False
        for line in lines:
            parts = line.split(":")
            if parts[0] == "root" and len(parts) > 1 and parts[1].startswith("!"):
                parts[1] = "*"
                changed = True
            out.append(":".join(parts))
        if not changed:
            return None
        path = d / "shadow"
        path.write_text("\n".join(out) + "\n")
        path.chmod(0o600)
        return path

    def _wait_listening(self, names: list[str], timeout: float) -> None:
        state = self._load()
        pending = set(names)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                if not procs.is_running(self.workdir, self._daemon(name)):
                    log = procs.log_file(self.workdir, self._daemon(name))
                    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                    raise RuntimeError(f"sshd of lab host {name} exited:\n{tail}")
                if _port_open(state[name]["ip"], 22, timeout=0.2):
                    pending.discard(name)
            if pending:
                time.sleep(0.05)
        if pending:
            raise RuntimeError(f"lab hosts not listening on :22 after {timeout:.0f}s: {sorted(pending)}")


def _meminfo(total_kb: int, swap_kb: int) -> str:
    free = total_kb * 9 // 10
    rows = [
        ("MemTotal", total_kb), ("MemFree", free), ("MemAvailable", total_kb * 95 // 100),
        ("Buffers", 2048), ("Cached", total_kb // 50), ("SwapCached", 0),
        ("Active", total_kb // 40), ("Inactive", total_kb // 60),
        ("SwapTotal", swap_kb), ("SwapFree", swap_kb), ("Dirty", 0), ("Writeback", 0),
        ("AnonPages", total_kb // 100), ("Mapped", 65536), ("Shmem", 4096), ("Slab", 131072),
        ("SReclaimable", 65536), ("SUnreclaim", 65536), ("KernelStack", 8192), ("PageTables", 16384),
        ("CommitLimit", total_kb // 2 + swap_kb), ("Committed_AS", total_kb // 80),
        ("VmallocTotal", 34359738367), ("VmallocUsed", 0), ("VmallocChunk", 0),
        ("HugePages_Total", None), ("HugePages_Free", None), ("Hugepagesize", 2048),
    ]  # fmt: skip
    out = []
    for key, val in rows:
        if val is None:
            out.append(f"{key + ':':<16}{0:>8}")
        else:
            out.append(f"{key + ':':<16}{val:>8} kB")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.sshhosts", description="lab SSH hosts")
    p.add_argument("--workdir", type=Path, required=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="NAME=IP[:GPUS] ...")
    up.add_argument("hosts", nargs="+")
    sub.add_parser("down")
    sub.add_parser("status")
    for c in ("kill", "revive"):
        sub.add_parser(c).add_argument("name")
    sf = sub.add_parser("set-fact")
    sf.add_argument("name")
    sf.add_argument("key")
    sf.add_argument("value")
    a = p.parse_args(argv)
    lab = SshHosts(a.workdir)
    if a.cmd == "up":
        specs = []
        for item in a.hosts:
            name, _, rest = item.partition("=")
            ip, _, gpus = rest.partition(":")
            specs.append(HostSpec(name, ip, int(gpus or 0)))
        t0 = time.monotonic()
        lab.up(specs)
        print(f"{len(specs)} hosts up in {time.monotonic() - t0:.1f}s; key {lab.key_path}")
    elif a.cmd == "down":
        lab.down()
    elif a.cmd == "status":
        print(json.dumps(lab.status(), indent=1))
    elif a.cmd == "kill":
        lab.kill(a.name)
    elif a.cmd == "revive":
        lab.revive(a.name)
    elif a.cmd == "set-fact":
        value: object = a.value
        if a.value.lower() in ("true", "false"):
            value = a.value.lower() == "true"
        lab.set_fact(a.name, a.key, value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
