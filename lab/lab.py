"""The lab as one thing: `gpuforge lab up|down|status` for a config whose nodes live in the lab subnet.

Everything runs on this machine: SSH hosts in network namespaces (one per config node), a real Kubernetes
control plane with kwok nodes, real Slurm, the DCGM simulator scraped by a real Prometheus, the lab
reconciler, and the vars of the lab's Kubespray playbook (lab/kubespray/). The lab's state lives in the folder
of the config's `kubeconfig` (e.g. `.lab/gpuforge-lab/`), so the config alone says where everything is.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from gpuforge.config import Config
from gpuforge.pins import release_namespace
from gpuforge.state import known_hosts_path
from lab import procs
from lab.controlplane import ControlPlane
from lab.dcgm_sim import DcgmSim
from lab.prometheus import PrometheusLab
from lab.slurm import SlurmLab
from lab.sshhosts import HostSpec, SshHosts

LAB_SUBNET = ipaddress.IPv4Network("198.51.100.0/24")
REPO = Path(__file__).resolve().parents[1]
BIN_DIR = Path("~/.cache/gpuforge/bin").expanduser()
RECONCILER = "reconciler"
DEFAULT_GPU_MODEL = "NVIDIA H100 80GB HBM3"
SCRAPE_INTERVAL = "2s"


class LabConfigError(ValueError):
    """The config cannot describe a lab (addresses outside the lab subnet, no kubeconfig path, ...)."""


def lab_problems(config: Config) -> list[str]:
    """Why this config cannot run as a lab; empty when it can. The lab never touches a real network."""
    problems = []
    for node in config.nodes:
        if ipaddress.IPv4Address(node.spec.ip) not in LAB_SUBNET:
            problems.append(
                f"node {node.name} has address {node.spec.ip} outside the lab subnet {LAB_SUBNET}; "
                "the lab only creates hosts there"
            )
    if not config.kubeconfig:
        problems.append("kubeconfig is not set; the lab keeps its state in the folder of that path")
    if config.prometheus_url:
        url = urlparse(config.prometheus_url)
        if url.hostname != "127.0.0.1" or not url.port:
            problems.append(f"prometheus_url {config.prometheus_url} must be http://127.0.0.1:<port> in the lab")
    if not any(n.spec.is_control_plane for n in config.nodes):
        problems.append("no control-plane node to host slurmctld")
    return problems


class Lab:
    def __init__(self, config: Config, progress: Callable[[str], None] | None = None):
        if problems := lab_problems(config):
            raise LabConfigError("; ".join(problems))
        self.config = config
        self.workdir = config.kubeconfig_path().resolve().parent
        self.progress = progress or (lambda msg: None)
        self.hosts = SshHosts(self.workdir)
        self.slurm = SlurmLab(self.workdir / "slurm", config.cluster_name)
        self.cp = ControlPlane(self.workdir, BIN_DIR, k8s_version=config.kubespray.kube_version, progress=self.progress)
        self.dcgm = DcgmSim(self.workdir / "dcgm")
        self.prometheus = PrometheusLab(self.workdir / "prometheus")

    # ------------------------------------------------------------------ lifecycle

    def up(self) -> dict[str, str]:
        """Start whatever is not running (idempotent); returns the endpoint table."""
        cfg = self.config
        steps: list[tuple[str, Callable[[], None]]] = [
            ("binaries (built once, cached by version)", self._build),
            ("a fresh known_hosts (new host keys every up)", self._forget_host_keys),
            (f"{len(cfg.nodes)} SSH hosts in network namespaces", self._hosts_up),
            ("Slurm (slurmctld + one slurmd per GPU node)", self._slurm_up),
            ("Kubernetes control plane + kwok", self._control_plane_up),
            ("DCGM simulator + Prometheus", self._metrics_up),
            ("lab reconciler", self._reconciler_up),
            ("Kubespray lab vars", self._kubespray_lab_vars),
        ]
        for label, step in steps:
            started = time.monotonic()
            self.progress(f"lab: {label} ...")
            step()
            self.progress(f"lab: {label} ready in {time.monotonic() - started:.1f}s")
        return self.endpoints()

    def down(self, purge: bool = False) -> None:
        """Stop everything and remove namespaces and links. The state folder stays (keys, etcd data, metrics,
        faults) unless `purge`, which deletes everything the lab wrote so the next `up` starts from nothing."""
        procs.stop_daemon(self.workdir, RECONCILER)
        self.prometheus.down(purge=purge)
        self.dcgm.down(purge=purge)
        self.cp.down(purge=purge)
        self.slurm.down()
        self.hosts.down()
        self.config.kubeconfig_path().unlink(missing_ok=True)
        if purge:
            # What the other parts wrote: Slurm's job state, the SSH hosts' keys and files, the reconciler's
            # inputs and pod logs, pid files, logs. Named one by one, not the whole folder: it is the
            # kubeconfig's folder, which may hold the user's own files.
            owned = (
                "hosts",
                "ssh",
                "pod-logs",
                "run",
                "log",
                "gpu-inventory.json",
                "slurm-env.json",
                "kubespray-lab.json",
            )
            for path in (self.slurm.workdir, *(self.workdir / name for name in owned)):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ machines coming and going

    def add_host(self, name: str, slurm_reason: str = "new node: not in the cluster yet") -> None:
        """The lab's stand-in for racking a new machine: node `name` of the config gets its SSH host (own
        namespace, address, faked hardware), its slurmd when it is a Slurm GPU node (joining drained with
        `slurm_reason`, as Slinky's slurmd registers a node that no one has resumed yet) and its DCGM exporter
        target scraped by Prometheus. Its Kubernetes Node is registered by the Kubespray stand-in (the lab's
        scale playbook), as on a real cluster. Idempotent."""
        node = next((n for n in self.config.nodes if n.name == name), None)
        if node is None:
            raise LabConfigError(f"{name} is not a node of {self.config.cluster_name}'s config")
        gpus = node.spec.gpu_count or (1 if node.spec.is_gpu else 0)
        self.hosts.up([HostSpec(name, node.spec.ip, gpus)])
        if node.spec.is_gpu:
            self._gpu_nodes_changed()
        if node.name in {n.name for n in self.config.slurm_gpu_nodes}:
            self.slurm.add_node(name, node.spec.ip, gpus, slurm_reason)

    def remove_host(self, name: str) -> None:
        """The machine is pulled: its slurmd, DCGM target and SSH host go (its Kubernetes Node stays until
        someone deletes it, as on a real cluster). Works whether or not the config still names it."""
        self.slurm.remove_node(name)
        self.hosts.remove(name)
        self._gpu_nodes_changed(without=name)

    def _gpu_nodes_changed(self, without: str | None = None) -> None:
        """The DCGM simulator, Prometheus' targets and the reconciler's GPU inventory follow the GPU hosts."""
        nodes = {
            n.name: (n.spec.gpu_count or 1, n.spec.gpu_model or DEFAULT_GPU_MODEL)
            for n in self.config.gpu_nodes
            if n.name != without and n.name in {h.name for h in self.hosts.hosts()}
        }
        self.dcgm.up(nodes)
        self.prometheus.up(
            listen=f"127.0.0.1:{urlparse(self.prometheus.url).port}",
            targets=self.dcgm.targets(),
            scrape_interval=SCRAPE_INTERVAL,
        )
        self._write_gpu_inventory(nodes)

    def status(self) -> dict[str, object]:
        cp = self.cp.status()
        return {
            "control_plane": cp,
            "ssh_hosts": self.hosts.status(),
            "slurm": self.slurm.status(),
            "dcgm_simulator": self.dcgm.running(),
            "prometheus": self.prometheus.running(),
            "reconciler": procs.is_running(self.workdir, RECONCILER),
        }

    def endpoints(self) -> dict[str, str]:
        out = {
            "workdir": str(self.workdir),
            "kubeconfig": str(self.config.kubeconfig_path().resolve()),
        }
        if self.cp.status().get("up"):
            out["api server"] = self.cp.server
        if self.prometheus.running():
            out["prometheus"] = self.prometheus.url
        if self.dcgm.running():
            out["dcgm simulator"] = self.dcgm.url
        out["slurm"] = f"SLURM_CONF={self.slurm.conf}"
        for host in self.hosts.hosts():
            out[f"ssh {host.name}"] = f"root@{host.ip} (key {self.hosts.key_path})"
        return out

    # ------------------------------------------------------------------ steps

    def _build(self) -> None:
        env_pins = {"K8S_VERSION": self.config.kubespray.kube_version}
        result = subprocess.run(
            ["bash", str(REPO / "lab" / "build" / "build-binaries.sh")],
            env={**os.environ, **env_pins},
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"building the lab binaries failed:\n{result.stderr[-3000:]}")

    def _forget_host_keys(self) -> None:
        """Every `up` makes new host keys: the cluster's known_hosts starts empty, accept-new pins them again."""
        known_hosts_path(self.config.cluster_name).unlink(missing_ok=True)

    def _hosts_up(self) -> None:
        specs = [
            HostSpec(n.name, n.spec.ip, n.spec.gpu_count or (1 if n.spec.is_gpu else 0)) for n in self.config.nodes
        ]
        self.hosts.up(specs)
        key = self.config.ansible_ssh_private_key_file
        if key and self.config.path(key).resolve() != self.hosts.key_path:
            raise LabConfigError(
                f"ansible_ssh_private_key_file must be the lab's key {self.hosts.key_path} "
                f"(it is {self.config.path(key).resolve()})"
            )

    def _slurm_up(self) -> None:
        ctl = next(n for n in self.config.nodes if n.spec.is_control_plane)
        gpu = [(n.name, n.spec.ip, n.spec.gpu_count or 1) for n in self.config.slurm_gpu_nodes]
        self.slurm.up(controller=(ctl.name, ctl.spec.ip), nodes=gpu, partition="gpu")

    def _control_plane_up(self) -> None:
        # `kubectl exec` into pods of the slurm namespace runs the real Slurm clients against the lab's Slurm.
        exec_rules = [{"name": "slurm", "namespaces": [release_namespace("slurm")], "env": self.slurm.client_env()}]
        self.cp.up(
            service_cidr=self.config.kubespray.service_cidr,
            exec_rules=exec_rules,
            pod_cidr=self.config.kubespray.pod_cidr,
        )
        target = self.config.kubeconfig_path()
        if target.resolve() != self.cp.kubeconfig.resolve():
            shutil.copyfile(self.cp.kubeconfig, target)
            target.chmod(0o600)

    def _metrics_up(self) -> None:
        nodes = {n.name: (n.spec.gpu_count or 1, n.spec.gpu_model or DEFAULT_GPU_MODEL) for n in self.config.gpu_nodes}
        self.dcgm.up(nodes)
        url = urlparse(self.config.prometheus_url or "http://127.0.0.1:0")
        self.prometheus.up(
            listen=f"127.0.0.1:{url.port or 0}", targets=self.dcgm.targets(), scrape_interval=SCRAPE_INTERVAL
        )

    def _write_gpu_inventory(self, nodes: dict[str, tuple[int, str]]) -> Path:
        """What the reconciler reads (and re-reads when it changes): which nodes have how many GPUs."""
        inventory = self.workdir / "gpu-inventory.json"
        tmp = inventory.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({name: {"gpus": gpus, "model": model} for name, (gpus, model) in nodes.items()}, indent=1)
        )
        tmp.replace(inventory)
        return inventory

    def _reconciler_up(self) -> None:
        inventory = self._write_gpu_inventory(
            {n.name: (n.spec.gpu_count or 1, n.spec.gpu_model or DEFAULT_GPU_MODEL) for n in self.config.gpu_nodes}
        )
        slurm_env = self.workdir / "slurm-env.json"
        slurm_env.write_text(json.dumps(self.slurm.client_env()))
        procs.start_daemon(
            self.workdir,
            RECONCILER,
            [
                sys.executable,
                "-m",
                "lab.reconciler",
                "--kubeconfig",
                str(self.cp.kubeconfig),
                "--inventory",
                str(inventory),
                "--slurm-env",
                str(slurm_env),
                *(["--dcgm-url", self.dcgm.url] if self.dcgm.running() else []),
            ],
            env={"PYTHONPATH": str(REPO)},
        )

    def set_device_plugin_gpus(self, node: str, count: int | None, timeout: float = 30.0) -> None:
        """Fault injection: the node's device plugin now reports `count` GPUs (None: the configured count).

        Changes what the lab reconciler advertises as the node's allocatable `nvidia.com/gpu`, and waits for it.
        """
        from lab import nodes as lab_nodes

        inventory = self.workdir / "gpu-inventory.json"
        data = json.loads(inventory.read_text())
        spec = next(n for n in self.config.gpu_nodes if n.name == node)
        data[node]["gpus"] = count if count is not None else (spec.spec.gpu_count or 1)
        inventory.write_text(json.dumps(data, indent=1))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            core = lab_nodes._core(self.cp.kubeconfig)
            alloc = (core.read_node(node).status.allocatable or {}).get("nvidia.com/gpu")
            if alloc == str(data[node]["gpus"]):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the reconciler did not set {node} to {data[node]['gpus']} GPUs in {timeout:.0f}s")

    def _kubespray_lab_vars(self) -> None:
        """What lab/kubespray/lab-cluster.yml needs to register Nodes, beside the kubeconfig where it looks."""
        (self.workdir / "kubespray-lab.json").write_text(
            json.dumps(
                {
                    "lab_python": sys.executable,
                    "lab_pythonpath": str(REPO),
                    "lab_kubeconfig": str(self.cp.kubeconfig),
                    "lab_controlplane_workdir": str(self.cp.workdir),
                    "lab_bin_dir": str(BIN_DIR),
                    "lab_slurm_workdir": str(self.slurm.workdir),
                    "lab_slurm_cluster": self.config.cluster_name,
                },
                indent=1,
            )
        )
