"""A real Slurm 22.05 cluster (Debian ``slurm-wlm`` + ``munge``) on the lab's SSH hosts.

Where things run
----------------
* ``munged`` runs in the root namespace; it only has a Unix socket (``<workdir>/munge/munge.sock``), which
  the daemons in the host namespaces reach through the shared filesystem.
* ``slurmctld`` runs inside the controller host's network namespace ``gf-<controller>`` (created by
  :class:`lab.sshhosts.SshHosts`), with the controller's hostname (own UTS namespace; slurmctld refuses to
  start on a host whose name is not ``SlurmctldHost``). The controller must be a lab host: there is no
  loopback fallback, because slurmctld and slurmd always listen on 0.0.0.0 (they cannot be told an
  address), and inside a host namespace 0.0.0.0 only reaches that namespace's own interfaces (loopback and
  its 198.51.100.x address) -- in the root namespace it would reach every interface of the machine.
* One ``slurmd -N <node>`` per node runs in that node's namespace ``gf-<node>``, hostname = node name.
  Node names are the Kubernetes node names given. Nodes with GPUs carry ``Gres=gpu:N``, backed by fake
  character devices ``<workdir>/dev/<node>/nvidia0..N-1`` (``mknod c 1 3``, i.e. /dev/null's numbers), so
  ``--gres=gpu:K`` jobs get ``CUDA_VISIBLE_DEVICES``; asking for more GPUs than a node has is rejected at
  submission. The partition (default ``gpu``, the default partition) holds the GPU nodes; nodes with 0 GPUs,
  if any, go into partition ``cpu``.
* Killing a host with ``SshHosts.kill`` also kills its slurmd/slurmctld (every pid in the namespace); the
  node shows ``idle*`` (not responding) after ~15 s and ``down`` after SlurmdTimeout=20s. After
  ``SshHosts.revive`` call :meth:`SlurmLab.start_node` (or :meth:`SlurmLab.start_controller`).

Clients
-------
:meth:`SlurmLab.client_env` gives ``SLURM_CONF`` (and PATH) so ``sinfo``, ``scontrol``, ``sbatch``,
``squeue``, ``scancel`` work from the root namespace; they only connect out to the controller's lab address.
``srun``/``salloc`` open listening sockets on 0.0.0.0 for the job's I/O, so do not run them in the root
namespace: run them inside a lab host (:meth:`SlurmLab.run` with ``netns=``) or use ``sbatch``.
Always wrap client calls in a timeout (done by :meth:`SlurmLab.run`). ``sacct`` needs slurmdbd and is not
set up (AccountingStorageType=accounting_storage/none).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from lab import procs
from lab.sshhosts import netns_exists, netns_name, netns_pids, validate_ip

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")


class SlurmLab:
    """Slurm cluster `cluster_name`, files and daemons under `workdir`."""

    def __init__(self, workdir: Path, cluster_name: str = "gpuforge", ctld_port: int = 6817, slurmd_port: int = 6818):
        self.workdir = Path(workdir).resolve()
        self.cluster_name = cluster_name
        self.ctld_port = ctld_port
        self.slurmd_port = slurmd_port
        self.conf = self.workdir / "slurm.conf"
        self._state_file = self.workdir / "slurmlab.json"

    # ----- names -------------------------------------------------------------------------------------
    @property
    def _munged(self) -> str:
        return f"munged-{self.cluster_name}"

    @property
    def _ctld(self) -> str:
        return f"slurmctld-{self.cluster_name}"

    def _slurmd(self, node: str) -> str:
        return f"slurmd-{self.cluster_name}-{node}"

    def _load(self) -> dict:
        try:
            return json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return {}

    # ----- public API --------------------------------------------------------------------------------
    def up(
        self,
        controller: tuple[str, str],
        nodes: list[tuple[str, str, int]],
        partition: str = "gpu",
        timeout: float = 60.0,
    ) -> None:
        """Start munged, slurmctld (in `gf-<controller>`) and one slurmd per node; wait until all are idle.

        Idempotent: with the same arguments and everything running it does nothing; with other arguments
        the cluster is restarted with fresh state.
        """
        if os.geteuid() != 0:
            raise PermissionError("the Slurm lab needs root (namespaces, mknod)")
        ctl_name, ctl_ip = controller
        spec = {
            "controller": [ctl_name, validate_ip(ctl_ip)],
            "nodes": [[n, validate_ip(ip), int(g)] for n, ip, g in nodes],
            "partition": partition,
        }
        names = [ctl_name] + [n for n, _, _ in nodes]
        for name in names:
            if not _NAME_RE.match(name):
                raise ValueError(f"invalid Slurm node name {name!r}")
            if not netns_exists(name):
                raise ValueError(
                    f"lab host {name} has no network namespace {netns_name(name)}; start it with SshHosts first "
                    "(Slurm daemons listen on 0.0.0.0 and so only run inside lab namespaces)"
                )
        if not nodes:
            raise ValueError("a Slurm cluster needs at least one node")
        if len({n for n, _, _ in nodes}) != len(nodes):
            raise ValueError("duplicate Slurm node names")
        current = {k: v for k, v in self._load().items() if k != "joining"}  # joined since: as if configured
        if current == spec and self._all_running(spec):
            return
        self.down()
        self._write_files(spec)
        self._state_file.write_text(json.dumps(spec, indent=1))
        self._start_munged()
        self.start_controller(timeout=timeout)
        for name, _ip, _gpus in spec["nodes"]:
            self._start_slurmd(name)
        self.wait_idle(timeout=timeout)

    def down(self) -> None:
        """Stop every Slurm daemon of this cluster (and munged); state files stay in the workdir."""
        spec = self._load()
        nodes = [n for n, _ip, _g in spec.get("nodes", [])]
        for name in nodes:
            procs.stop_daemon(self.workdir, self._slurmd(name), timeout=5)
        procs.stop_daemon(self.workdir, self._ctld, timeout=5)
        procs.stop_daemon(self.workdir, self._munged, timeout=5)
        # slurmstepd (and the job processes under it) of still-running jobs live in their own sessions
        # inside the node namespaces: end them too.
        stepds = [
            pid
            for name in nodes
            if netns_exists(name)
            for pid in netns_pids(netns_name(name))
            if _cmdline(pid).startswith("slurmstepd")
        ]
        _kill_tree(stepds)
        self._state_file.unlink(missing_ok=True)

    def stop_controller(self) -> None:
        procs.stop_daemon(self.workdir, self._ctld, timeout=10)

    def start_controller(self, timeout: float = 30.0) -> None:
        spec = self._load()
        if not spec:
            raise RuntimeError("Slurm lab is not configured; call up() first")
        ctl_name = spec["controller"][0]
        if procs.is_running(self.workdir, self._ctld):
            return
        log = procs.log_file(self.workdir, self._ctld)
        log.unlink(missing_ok=True)
        procs.start_daemon(
            self.workdir,
            self._ctld,
            _in_host(ctl_name, ["slurmctld", "-D", "-i", "-f", str(self.conf)]),
            env=self._daemon_env(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not procs.is_running(self.workdir, self._ctld):
                break
            if self.run("scontrol", "ping", timeout=5, check=False).stdout.count("UP") >= 1:
                return
            time.sleep(0.2)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"slurmctld did not come up within {timeout:.0f}s:\n{tail}")

    def add_node(self, name: str, ip: str, gpus: int, reason: str, timeout: float = 30.0) -> None:
        """A node joins the running cluster (a host added to the lab), drained with `reason` until someone
        resumes it: the config gets its NodeName line (State=DRAIN), slurmctld restarts on its saved state (jobs
        and node states survive), the other slurmds re-read the config, and the node's slurmd starts."""
        spec = self._load()
        if not spec:
            raise RuntimeError("Slurm lab is not configured; call up() first")
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid Slurm node name {name!r}")
        if not netns_exists(name):
            raise ValueError(f"lab host {name} has no network namespace {netns_name(name)}; add the SSH host first")
        nodes = [n for n in spec["nodes"] if n[0] != name] + [[name, validate_ip(ip), int(gpus)]]
        self._change_nodes({**spec, "nodes": nodes, "joining": {**spec.get("joining", {}), name: reason}}, timeout)
        self._start_slurmd(name)

    def remove_node(self, name: str, timeout: float = 30.0) -> None:
        """A node leaves the running cluster: its slurmd stops and its NodeName line goes (slurmctld restarts
        on its saved state). Jobs still on it are lost, as when a machine is pulled."""
        spec = self._load()
        if name not in [n for n, _ip, _g in spec.get("nodes", [])]:
            return
        self.stop_node(name)
        nodes = [n for n in spec["nodes"] if n[0] != name]
        if not nodes:
            raise ValueError("a Slurm cluster needs at least one node")
        joining = {k: v for k, v in spec.get("joining", {}).items() if k != name}
        self._change_nodes({**spec, "nodes": nodes, "joining": joining}, timeout)

    def _change_nodes(self, spec: dict, timeout: float) -> None:
        # Slurm 22.05 takes a changed node list only at a slurmctld restart (it reloads its saved state), then
        # `scontrol reconfigure` makes every slurmd re-read slurm.conf.
        self._write_files(spec, fresh=False)
        self._state_file.write_text(json.dumps(spec, indent=1))
        self.stop_controller()
        self.start_controller(timeout=timeout)
        self.run("scontrol", "reconfigure", timeout=timeout)

    def stop_node(self, name: str) -> None:
        """Stop one node's slurmd (the controller marks it down after SlurmdTimeout=20s)."""
        procs.stop_daemon(self.workdir, self._slurmd(name), timeout=10)

    def start_node(self, name: str) -> None:
        """(Re)start one node's slurmd, e.g. after SshHosts.kill + revive; it re-registers within ~1 s."""
        if name not in [n for n, _ip, _g in self._load().get("nodes", [])]:
            raise KeyError(f"no Slurm node {name!r}")
        self._start_slurmd(name)

    def status(self) -> dict:
        """{"controller": bool (answers ping), "nodes": {name: sinfo state, e.g. "idle", "down*"}}."""
        spec = self._load()
        ctl = bool(spec) and procs.is_running(self.workdir, self._ctld)
        nodes: dict[str, str] = {n: "unknown" for n, _, _ in spec.get("nodes", [])}
        if ctl:
            proc = self.run("sinfo", "-N", "-h", "-o", "%N %t", timeout=10, check=False)
            ctl = proc.returncode == 0
            for line in proc.stdout.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] in nodes:
                    nodes[parts[0]] = parts[1]
        return {"controller": ctl, "nodes": nodes}

    def client_env(self) -> dict[str, str]:
        """Environment for Slurm clients (sinfo, scontrol, sbatch, squeue, scancel) in the root namespace."""
        return {"SLURM_CONF": str(self.conf), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def run(
        self, *argv: str, timeout: float = 20, check: bool = True, netns: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client with client_env() and a timeout; `netns` = lab host name to run it there."""
        cmd = list(argv)
        if netns:
            cmd = ["ip", "netns", "exec", netns_name(netns), *cmd]
        try:
            proc = subprocess.run(
                cmd, env={**os.environ, **self.client_env()}, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            if check:
                raise RuntimeError(f"{' '.join(argv)} timed out after {timeout}s") from exc
            return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout}s")
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until every node is idle (or mixed/allocated: i.e. up and usable)."""
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            for name in self._load().get("nodes", []):
                daemon = self._slurmd(name[0])
                if not procs.is_running(self.workdir, daemon):
                    log = procs.log_file(self.workdir, daemon)
                    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                    raise RuntimeError(f"slurmd of {name[0]} exited:\n{tail}")
            last = self.status()["nodes"]
            if last and all(state.rstrip("*~#") in ("idle", "mix", "alloc") and not state.endswith("*")
                            for state in last.values()):  # fmt: skip
                return
            time.sleep(0.3)
        raise RuntimeError(f"Slurm nodes not idle within {timeout:.0f}s: {last}")

    def job_state(self, job_id: str) -> str:
        """JobState from scontrol (PENDING, RUNNING, COMPLETED, FAILED, ...), "" when unknown."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False, timeout=10)
        m = re.search(r"JobState=(\S+)", proc.stdout)
        return m.group(1) if m else ""

    def wait_job(self, job_id: str, timeout: float = 60.0) -> str:
        """Poll until the job leaves PENDING/RUNNING/COMPLETING; returns its final state."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state and state not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"):
                return state
            time.sleep(0.2)
        raise RuntimeError(f"job {job_id} still {state or 'unknown'} after {timeout:.0f}s")

    # ----- internals ---------------------------------------------------------------------------------
    def _all_running(self, spec: dict) -> bool:
        names = [self._munged, self._ctld] + [self._slurmd(n) for n, _, _ in spec["nodes"]]
        return all(procs.is_running(self.workdir, n) for n in names)

    def _daemon_env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _write_files(self, spec: dict, fresh: bool = True) -> None:
        d = self.workdir
        for sub in ("state", "spool", "log", "run", "jobs", "dev"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        if fresh:
            shutil.rmtree(d / "state")  # fresh cluster: no old jobs or node states
            (d / "state").mkdir()
        munge = d / "munge"
        munge.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o755)  # "Socket is inaccessible: execute permissions for all required"
        (d / "plugstack.conf").write_text("")
        ctl_name, ctl_ip = spec["controller"]
        gpu_nodes = [n for n in spec["nodes"] if n[2] > 0]
        cpu_nodes = [n for n in spec["nodes"] if n[2] == 0]
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={ctl_name}({ctl_ip})",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge / 'munge.sock'}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log'}/slurmd-%n.log",
            f"PlugStackConfig={d / 'plugstack.conf'}",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SlurmdTimeout=20",
            "MessageTimeout=5",
            "KillWait=2",
            "InactiveLimit=0",
            "MinJobAge=600",
            "GresTypes=gpu",
        ]
        gres = ["AutoDetect=off"]
        for name, ip, gpus in spec["nodes"]:
            node_line = f"NodeName={name} NodeAddr={ip} NodeHostname={name} CPUs=2 RealMemory=1000"
            if gpus:
                node_line += f" Gres=gpu:{gpus}"
                devdir = d / "dev" / name
                devdir.mkdir(parents=True, exist_ok=True)
                for i in range(gpus):
                    dev = devdir / f"nvidia{i}"
                    if not dev.exists():
                        subprocess.run(["mknod", "-m", "666", str(dev), "c", "1", "3"], check=True, timeout=10)
                gres.append(f"NodeName={name} Name=gpu File={devdir}/nvidia[0-{gpus - 1}]")
            joining = spec.get("joining", {}).get(name)
            # A node that joins a running cluster takes no job until it is resumed (validated first).
            lines.append(node_line + (f' State=DRAIN Reason="{joining}"' if joining else " State=UNKNOWN"))
        partition = spec["partition"]
        if gpu_nodes:
            lines.append(
                f"PartitionName={partition} Nodes={','.join(n[0] for n in gpu_nodes)} Default=YES "
                "MaxTime=INFINITE State=UP"
            )
        if cpu_nodes:
            default = "NO" if gpu_nodes else "YES"
            lines.append(
                f"PartitionName=cpu Nodes={','.join(n[0] for n in cpu_nodes)} Default={default} "
                "MaxTime=INFINITE State=UP"
            )
        self.conf.write_text("\n".join(lines) + "\n")
        (d / "gres.conf").write_text("\n".join(gres) + "\n")

    def _start_munged(self) -> None:
        munge = self.workdir / "munge"
        key = munge / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30)
        key.chmod(0o600)
        procs.start_daemon(
            self.workdir,
            self._munged,
            ["munged", "--foreground", "--force", f"--socket={munge / 'munge.sock'}", f"--key-file={key}",
             f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
             f"--seed-file={munge / 'munged.seed'}"],
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while not (munge / "munge.sock").exists():
            if time.monotonic() > deadline or not procs.is_running(self.workdir, self._munged):
                log = procs.log_file(self.workdir, self._munged)
                raise RuntimeError(f"munged did not start: {log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.05)

    def _start_slurmd(self, name: str) -> None:
        (self.workdir / "spool" / name).mkdir(parents=True, exist_ok=True)
        procs.start_daemon(
            self.workdir,
            self._slurmd(name),
            _in_host(name, ["slurmd", "-D", "-N", name, "-f", str(self.conf)]),
            env=self._daemon_env(),
        )


def _in_host(name: str, argv: list[str]) -> list[str]:
    """Run argv in lab host `name`'s network namespace with hostname `name` (own UTS namespace).

    nsenter rather than `ip netns exec`: the latter remounts /sys, which hides /sys/fs/cgroup, and slurmd
    refuses to start without it. exec keeps the pid for lab.procs.
    """
    return [
        "nsenter", f"--net=/run/netns/{netns_name(name)}",
        "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv,
    ]  # fmt: skip


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_tree(roots: list[int]) -> None:
    """SIGKILL `roots` and all their descendants (found through /proc/<pid>/stat ppid)."""
    if not roots:
        return
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    todo, victims = list(roots), []
    while todo:
        pid = todo.pop()
        victims.append(pid)
        todo.extend(children.get(pid, []))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.slurm", description="lab Slurm cluster")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--cluster", default="gpuforge")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="--controller NAME=IP NODE=IP:GPUS ...")
    up.add_argument("--controller", required=True)
    up.add_argument("nodes", nargs="+")
    sub.add_parser("down")
    sub.add_parser("status")
    sub.add_parser("env")
    remove = sub.add_parser("remove-node", help="NAME: the node's slurmd stops and it leaves slurm.conf")
    remove.add_argument("name")
    a = p.parse_args(argv)
    lab = SlurmLab(a.workdir, a.cluster)
    if a.cmd == "up":
        cname, _, cip = a.controller.partition("=")
        nodes = []
        for item in a.nodes:
            name, _, rest = item.partition("=")
            ip, _, gpus = rest.partition(":")
            nodes.append((name, ip, int(gpus or 0)))
        t0 = time.monotonic()
        lab.up((cname, cip), nodes)
        print(f"slurm up in {time.monotonic() - t0:.1f}s; export SLURM_CONF={lab.conf}")
    elif a.cmd == "down":
        lab.down()
    elif a.cmd == "status":
        print(json.dumps(lab.status(), indent=1))
    elif a.cmd == "remove-node":
        present = a.name in [n for n, _ip, _g in lab._load().get("nodes", [])]
        lab.remove_node(a.name)
        print(json.dumps({"name": a.name, "changed": present}))
    elif a.cmd == "env":
        for k, v in lab.client_env().items():
            print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
