"""The lab's Kubernetes control plane: real etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
a kwok controller that plays the kubelets, all inside one network namespace of the lab.

    cp = ControlPlane(workdir, Path.home() / ".cache/gpuforge/bin")
    cp.up(exec_rules=[{"namespaces": ["slurm"], "env": {"SLURM_CONF": "/lab/slurm/slurm.conf"}}])
    subprocess.run(["kubectl", "--kubeconfig", cp.kubeconfig, "get", "nodes"])
    cp.down()

Binaries (built by lab/build/build-binaries.sh): `<bin_dir>/kubernetes-v<K8S>/{kube-apiserver,
kube-controller-manager,kube-scheduler}`, `<bin_dir>/kwok-<KWOK>`, `<bin_dir>/etcd-<ETCD>/etcd` (3.6; when it is
missing, etcd from PATH, e.g. Debian's 3.4.23, with the API server's WatchList feature off, see `_old_etcd`).
Every process is a `lab.procs` daemon of `workdir` (pid in workdir/run, log in workdir/log); all other files
live in `workdir/k8s/` (pki/, etcd data, kubeconfigs, kwok.yaml, state.json with the chosen ports).

Where it runs. A real API server dials pod and service addresses (admission and conversion webhooks, its
service proxy, `kubectl logs` through a kubelet). In the lab those are 10.233.x.x addresses where nothing of
ours listens, and traffic to private ranges must never leave this machine. So every component runs in the
network namespace `gf-k8s-<hash of workdir>` (`namespace`), which has loopback and one address on the lab
bridge (`address`, the first free one from 198.51.100.240 up, kept in state.json) and no default route: any
dial outside the lab subnet fails at once with "Network is unreachable". Clients in the root namespace reach
the API server through the bridge. Admission webhooks are never called either: the API server runs with
MutatingAdmissionWebhook and ValidatingAdmissionWebhook disabled (cert-manager's, for one, cannot be switched
off through its chart, and no kwok pod can answer it).

Listen addresses (well-known ports: the namespace is the lab's own; nothing binds 0.0.0.0):
    etcd                     http://<address>:2379, peers http://<address>:2380
    kube-apiserver           https://<address>:6443  (kubeconfig server)
    kube-controller-manager  https://<address>:10257  (/healthz)
    kube-scheduler           https://<address>:10259  (/healthz)
    kwok                     <address>:10250  (HTTPS and HTTP on one port: kubelet API for logs/exec, /healthz)

Simulation (kwok Stages written to workdir/k8s/kwok.yaml; they replace kwok's defaults):
    node-initialize       nodes annotated kwok.x-k8s.io/node=fake become Ready; InternalIP <address>, Hostname
                          = node name; nodeInfo.kubeletVersion = annotation lab.gpuforge.io/kubelet-version
                          (v-prefixed), else the existing nodeInfo, else the control plane's version.
    node-kubelet-version  when that annotation changes later, nodeInfo.kubeletVersion follows it.
    node-heartbeat        Ready conditions refreshed every 20-25 s (and kwok renews node Leases).
    pod-ready             Pending -> Running/Ready, pod IP from pod_cidr.
    pod-ready-again       a Running pod whose containers are ready but which is not Ready (the node lifecycle
                          controller marks every pod of a node NotReady when its heartbeats stop, e.g. while
                          etcd is down) is Ready again: what a kubelet reports once its node is back.
    pod-complete          Running pods owned by a Job, or with restartPolicy Never/OnFailure, terminate with
                          exit code 0 -> phase Succeeded. Annotations on the pod:
                          lab.gpuforge.io/exit-code: "3"      -> exit code 3, phase Failed
                          lab.gpuforge.io/complete-after: "5s" -> terminate after that long
                          lab.gpuforge.io/keep-running: "true" -> never terminate (e.g. to exec into it)
    pod-delete            pods being deleted go away at once (no kubelet to wait for).

Pod logs (`kubectl logs`): the `Logs` CRD (kwok.x-k8s.io/v1alpha1) is installed and kwok watches it. One object
per pod, same name and namespace as the pod; the file must be in CRI log format (`<RFC3339 time> stdout F
<text>` per line; plain text fails with "unsupported log format"):
    apiVersion: kwok.x-k8s.io/v1alpha1
    kind: Logs
    metadata: {name: cuda-smoke, namespace: default}      # = the pod
    spec:
      logs:
      - containers: [main]                  # optional; an entry without containers serves every container
        logsFile: /abs/path/cuda-smoke.log  # absolute path on this machine
        previousLogsFile: /abs/prev.log     # optional, for --previous
        follow: false                       # optional, not consulted (kubectl logs -f decides)

Pod exec (`kubectl exec`): runs the requested argv on this machine (no container) when a rule from
`up(exec_rules=...)` matches the pod; a pod without a matching rule gets an error. A rule is a dict:
    {"name": "slurm",                          # optional, default "exec-<index>"
     "namespaces": ["slurm"],                  # optional; pod namespace must be one of them
     "pods": ["slurm-controller-0"],           # optional; pod name must be one of them
     "containers": ["slurmctld"],              # optional; default: every container of the pod
     "env": {"SLURM_CONF": "/lab/slurm.conf"}, # optional; added to kwok's environment
     "workdir": "/lab/slurm",                  # optional; default: workdir/k8s
     "run_as_user": 0, "run_as_group": 0}      # optional
or kwok's own ClusterExec spec, {"name": ..., "selector": {"matchNamespaces": [...], "matchNames": [...]},
"execs": [{"containers": [...], "local": {"workDir": ..., "envs": [{"name": ..., "value": ...}]}}]}.
The first rule that matches wins. Changing the rules restarts only kwok; `up()` without exec_rules keeps them.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from lab import procs
from lab.sshhosts import (
    ensure_bridge,
    free_lab_ips,
    make_namespace,
    netns_exists,
    netns_name,
    remove_bridge_if_unused,
    remove_namespace,
)

log = logging.getLogger(__name__)

K8S_VERSION = "1.35.4"
KWOK_VERSION = "v0.8.0"
ETCD_VERSION = "v3.6.16"  # built by lab/build/build-binaries.sh; Debian's /usr/bin/etcd (3.4.23) is the fallback
DEFAULT_SERVICE_CIDR = "10.233.0.0/18"  # Kubespray's kube_service_addresses
DEFAULT_POD_CIDR = "10.233.64.0/18"  # Kubespray's kube_pods_subnet
KUBELET_VERSION_ANNOTATION = "lab.gpuforge.io/kubelet-version"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
LOGS_CRD = "kwok.x-k8s.io_logs.yaml"

ETCD = "etcd"
APISERVER = "kube-apiserver"
CONTROLLER_MANAGER = "kube-controller-manager"
SCHEDULER = "kube-scheduler"
KWOK = "kwok"
COMPONENTS = (ETCD, APISERVER, CONTROLLER_MANAGER, SCHEDULER, KWOK)  # start order
_PORT_KEYS = {
    ETCD: ("etcd_client", "etcd_peer"),
    APISERVER: ("apiserver",),
    CONTROLLER_MANAGER: ("controller_manager",),
    SCHEDULER: ("scheduler",),
    KWOK: ("kwok",),
}
# Kubernetes' own defaults; the namespace belongs to this control plane alone, so they are always free.
PORTS = {
    "etcd_client": 2379,
    "etcd_peer": 2380,
    "apiserver": 6443,
    "controller_manager": 10257,
    "scheduler": 10259,
    "kwok": 10250,
}
# Control planes take lab addresses from here up; config nodes and test labs use lower ones.
FIRST_ADDRESS = 240
_ALWAYS_ALLOW = "/healthz,/readyz,/livez,/metrics"
_SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


class ControlPlane:
    """A local Kubernetes control plane with kwok-simulated nodes, kept in `workdir`."""

    def __init__(
        self,
        workdir: Path,
        bin_dir: Path,
        *,
        k8s_version: str = K8S_VERSION,
        kwok_version: str = KWOK_VERSION,
        etcd_binary: Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.bin_dir = Path(bin_dir).expanduser().resolve()
        self.k8s_version = k8s_version.removeprefix("v")
        self.kwok_version = kwok_version if kwok_version.startswith("v") else f"v{kwok_version}"
        self._etcd_binary = Path(etcd_binary) if etcd_binary else None
        self._progress = progress
        self._etcd_version: tuple[int, ...] | None = None
        self.dir = self.workdir / "k8s"
        self.pki = self.dir / "pki"
        # The namespace's host name, as lab.sshhosts names lab namespaces (gf-<name>, at most 15 characters).
        self._ns_host = "k8s-" + hashlib.sha1(str(self.workdir).encode()).hexdigest()[:8]

    # ------------------------------------------------------------------ public

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (client cert in group system:masters, certs embedded)."""
        return self.dir / "admin.conf"

    @property
    def version(self) -> str:
        return f"v{self.k8s_version}"

    @property
    def ports(self) -> dict[str, int]:
        return dict(PORTS)

    @property
    def namespace(self) -> str:
        """The network namespace every component runs in (`ip netns exec <this>`)."""
        return netns_name(self._ns_host)

    @property
    def address(self) -> str:
        """The control plane's lab address (chosen on the first `up`); every component listens there."""
        return self._load_state()["address"]

    @property
    def server(self) -> str:
        return f"https://{self.address}:{PORTS['apiserver']}"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.crt"

    def up(
        self,
        service_cidr: str = DEFAULT_SERVICE_CIDR,
        exec_rules: list[dict] | None = None,
        *,
        pod_cidr: str = DEFAULT_POD_CIDR,
        timeout: float = 180.0,
    ) -> None:
        """Start what is not running (idempotent) and return once the API server is ready, the controller
        manager, scheduler and kwok are healthy and the `default` service account exists.

        `exec_rules=None` keeps the rules of the previous `up` (none the first time); `[]` removes them.
        """
        started = time.monotonic()
        service_cidr = str(ipaddress.ip_network(service_cidr))
        pod_cidr = str(ipaddress.ip_network(pod_cidr))
        if exec_rules is not None:
            exec_rules = json.loads(json.dumps(exec_rules))  # plain JSON data, stored in state.json
            for i, rule in enumerate(exec_rules):
                _cluster_exec(rule, i)  # validate before touching anything
        binaries = self._binaries()
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._up_once(service_cidr, pod_cidr, exec_rules, binaries, started, timeout)
        self._say(f"lab control plane {self.version} up in {time.monotonic() - started:.1f}s")

    def _up_once(
        self,
        service_cidr: str,
        pod_cidr: str,
        exec_rules: list[dict] | None,
        binaries: dict[str, Path],
        started: float,
        timeout: float,
    ) -> None:
        state = self._load_state()
        if exec_rules is None:
            exec_rules = state.get("exec_rules", [])
        state["exec_rules"] = exec_rules
        cluster_execs = [_cluster_exec(rule, i) for i, rule in enumerate(exec_rules)]
        if state.get("service_cidr", service_cidr) != service_cidr:
            raise ValueError(
                f"the lab control plane in {self.dir} was created with service CIDR {state['service_cidr']}; "
                f"call down(purge=True) before using {service_cidr}"
            )
        state.update(service_cidr=service_cidr, pod_cidr=pod_cidr, version=self.version)
        state.pop("ports", None)  # from labs that picked free ports on 127.0.0.1
        self._ensure_namespace(state)
        self._save_state(state)
        self._ensure_pki(service_cidr, state["address"])
        self._write_kubeconfigs(state["address"])
        self._write_kwok_config(cluster_execs)
        argvs = self._argvs(binaries, state)
        fingerprints = state.setdefault("fingerprints", {})

        def ensure(name: str) -> bool:
            fp = self._fingerprint(name, argvs[name])
            if procs.is_running(self.workdir, name) and fingerprints.get(name) != fp:
                self._say(f"{name}: configuration changed, restarting")
                self._stop(name)
            if procs.is_running(self.workdir, name):
                return False
            self._say(f"starting {name}")
            if name == KWOK:
                self._release_kwok_leases()
            procs.start_daemon(self.workdir, name, argvs[name], env=self._env(name), cwd=self.dir, netns=self.namespace)
            fingerprints[name] = fp
            self._save_state(state)
            return True

        deadline = time.monotonic() + timeout
        ensure(ETCD)
        ensure(APISERVER)
        self._wait(ETCD, self._etcd_healthy, deadline)
        self._wait(APISERVER, self._apiserver_ready, deadline)
        self._say(f"kube-apiserver ready at {self.server} ({time.monotonic() - started:.1f}s)")
        self._ensure_logs_crd(deadline)
        for name in (CONTROLLER_MANAGER, SCHEDULER, KWOK):
            ensure(name)
        for name in (CONTROLLER_MANAGER, SCHEDULER, KWOK):
            self._wait(name, self._checks()[name], deadline)
        self._wait_default_service_account(deadline)

    def down(self, purge: bool = False) -> None:
        """Stop every daemon (kwok first, etcd last) and wait until their ports are closed.

        The network namespace goes too (with anything a `kubectl exec` left running in it). `purge=True` also
        deletes workdir/k8s (etcd data, certificates, kubeconfigs); without it the next `up` finds the
        cluster's objects again.
        """
        for name in reversed(COMPONENTS):
            if procs.is_running(self.workdir, name):
                self._say(f"stopping {name}")
            self._stop(name)
        remove_namespace(self.workdir, self._ns_host)
        remove_bridge_if_unused()
        if purge:
            shutil.rmtree(self.dir, ignore_errors=True)

    def status(self) -> dict:
        """{"up": all running and healthy, "server", "kubeconfig", "version",
        "components": {name: {"running", "healthy", "pid", "listen": ["<address>:port", ...], "log"}}}."""
        state = self._load_state()
        ports = self.ports if "address" in state else {}
        checks = self._checks()
        components = {}
        for name in COMPONENTS:
            running = procs.is_running(self.workdir, name)
            healthy = False
            if running and ports:
                try:
                    healthy = checks[name]()
                except Exception:  # noqa: BLE001 - a health probe failing is a status, not an error
                    healthy = False
            components[name] = {
                "running": running,
                "healthy": healthy,
                "pid": procs.read_pid(self.workdir, name) if running else None,
                "listen": [f"{state['address']}:{ports[k]}" for k in _PORT_KEYS[name] if k in ports],
                "log": str(procs.log_file(self.workdir, name)),
            }
        return {
            "up": all(c["running"] and c["healthy"] for c in components.values()),
            "server": self.server if ports else None,
            "kubeconfig": str(self.kubeconfig),
            "version": self.version,
            "components": components,
        }

    def set_version(self, timeout: float = 180.0) -> None:
        """Bring the running control plane to this object's `k8s_version`, everything else as the last `up()` left
        it (etcd with its data, the CIDRs, the exec rules): what a control-plane upgrade (or putting the lab back
        at an older release) does here. The components whose binary changes restart, the others keep running."""
        state = self._load_state()
        if not state.get("address"):
            raise RuntimeError("the lab control plane was never started; call up() first")
        self.up(state["service_cidr"], None, pod_cidr=state["pod_cidr"], timeout=timeout)

    def restart(self, name: str, downtime: float = 0.0, timeout: float = 120.0) -> None:
        """Stop one component, keep it down for `downtime` seconds, start it again and wait until healthy."""
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; one of {COMPONENTS}")
        state = self._load_state()
        if not state.get("address"):
            raise RuntimeError("the lab control plane was never started; call up() first")
        argv = self._argvs(self._binaries(), state)[name]
        self._say(f"restarting {name}")
        # kube-apiserver's graceful shutdown hangs while clients hold watches open; it keeps no state of its
        # own (etcd does), so after a short grace a SIGKILL is fine.
        self._stop(name, timeout=3.0)
        if downtime > 0:
            time.sleep(downtime)
        if name == KWOK:
            self._release_kwok_leases()
        procs.start_daemon(self.workdir, name, argv, env=self._env(name), cwd=self.dir, netns=self.namespace)
        state.setdefault("fingerprints", {})[name] = self._fingerprint(name, argv)
        self._save_state(state)
        deadline = time.monotonic() + timeout
        self._wait(name, self._checks()[name], deadline)
        if name == ETCD and procs.is_running(self.workdir, APISERVER):
            # etcd answering is not the API server answering: its etcd client reconnects with a backoff, and a
            # request in that gap times out ("unable to return a response in the time allotted"). /readyz checks
            # etcd through the API server's own client. Its per-resource clients reconnect on their own backoff
            # (gRPC's, up to 2 minutes after a long outage): until then a request for such a resource still times
            # out, as on a real control plane, and gpuforge retries it.
            self._wait(APISERVER, self._apiserver_ready, deadline, "kube-apiserver ready again after etcd")

    def restart_apiserver(self, downtime: float = 0.0) -> None:
        """Restart kube-apiserver (same port, same etcd data) and wait for /readyz."""
        self.restart(APISERVER, downtime=downtime)

    def _stop(self, name: str, timeout: float = 10.0) -> None:
        """procs.stop_daemon, plus the daemon's descendants that left its process group (a `kubectl exec`
        command may call setsid; kwok kills its exec children on SIGTERM, but not when it has to be SIGKILLed)."""
        pid = procs.read_pid(self.workdir, name)
        children = _descendants(pid) if pid and procs.is_running(self.workdir, name) else []
        procs.stop_daemon(self.workdir, name, timeout=timeout)
        for child in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)

    # ------------------------------------------------------------------ files and state

    def _say(self, msg: str) -> None:
        log.info("%s", msg)
        if self._progress is not None:
            self._progress(msg)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _load_state(self) -> dict:
        try:
            return json.loads((self.dir / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _save_state(self, state: dict) -> None:
        _write(self.dir / "state.json", json.dumps(state, indent=2, sort_keys=True))

    def _binaries(self) -> dict[str, Path]:
        k8s = self.bin_dir / f"kubernetes-v{self.k8s_version}"
        etcd = self._etcd_binary or self.bin_dir / f"etcd-{ETCD_VERSION}" / "etcd"
        if self._etcd_binary is None and not os.access(etcd, os.X_OK) and shutil.which("etcd"):
            etcd = Path(shutil.which("etcd"))  # e.g. Debian's 3.4.23: works, see _old_etcd
        bins = {
            ETCD: etcd,
            APISERVER: k8s / "kube-apiserver",
            CONTROLLER_MANAGER: k8s / "kube-controller-manager",
            SCHEDULER: k8s / "kube-scheduler",
            KWOK: self.bin_dir / f"kwok-{self.kwok_version}",
        }
        missing = [str(p) for p in bins.values() if not os.access(p, os.X_OK)]
        if missing:
            raise FileNotFoundError(
                "lab control plane binaries missing: " + ", ".join(missing) + " (run lab/build/build-binaries.sh)"
            )
        return bins

    def _ensure_namespace(self, state: dict) -> None:
        """The control plane's namespace on the lab bridge, with the recorded address when it is still ours."""
        ensure_bridge()
        if netns_exists(self._ns_host) and state.get("address"):
            return
        address = state.get("address")
        if address:
            try:  # the recorded address: kubeconfigs and certificates already name it
                make_namespace(self.workdir, self._ns_host, address)
            except ValueError:
                address = None  # a live lab took it meanwhile
        if not address:
            address = free_lab_ips(1, first=FIRST_ADDRESS)[0]
            make_namespace(self.workdir, self._ns_host, address)
        state["address"] = address

    def _fingerprint(self, name: str, argv: list[str]) -> str:
        # The address is in every argv: a moved control plane changes all of them.
        h = hashlib.sha256(json.dumps(argv).encode())
        if name == KWOK:
            h.update((self.dir / "kwok.yaml").read_bytes())
        return h.hexdigest()

    def _env(self, name: str) -> dict[str, str]:
        env = {}
        if name in (CONTROLLER_MANAGER, SCHEDULER, KWOK) and self._old_etcd():
            # Streaming watch-lists need etcd's RequestWatchProgress (>= 3.4.31 / 3.5.13); without it the
            # API server refuses them (client-go then falls back to LIST, noisily).
            env["KUBE_FEATURE_WatchListClient"] = "false"
        if name == KWOK:
            # kwok also loads ~/.kwok/kwok.yaml when it exists; point it at an empty home of its own.
            env["KWOK_WORKDIR"] = str(self.dir / "kwok-home")
        return env

    def _old_etcd(self) -> bool:
        """True when the etcd in use lacks RequestWatchProgress (older than 3.4.31 or 3.5.0-3.5.12)."""
        if self._etcd_version is None:
            out = subprocess.run(
                [str(self._binaries()[ETCD]), "--version"], capture_output=True, text=True, timeout=30
            ).stdout
            match = re.search(r"etcd Version: (\d+)\.(\d+)\.(\d+)", out)
            self._etcd_version = tuple(int(x) for x in match.groups()) if match else (0, 0, 0)
        v = self._etcd_version
        return v < (3, 4, 31) or (3, 5, 0) <= v < (3, 5, 13)

    # ------------------------------------------------------------------ PKI and kubeconfigs

    def _ensure_pki(self, service_cidr: str, address: str) -> None:
        self.pki.mkdir(parents=True, exist_ok=True)
        if not (self.pki / "ca.crt").exists():
            self._say("generating lab PKI")
            ca_key = _ec_key()
            ca = _cert("gpuforge-lab-ca", None, ca_key.public_key(), ca_key, None, ca=True)
            _write_key(self.pki / "ca.key", ca_key)
            _write(self.pki / "ca.crt", _pem(ca))
            sa_key = _rsa_key()
            _write_key(self.pki / "sa.key", sa_key)
            _write(self.pki / "sa.pub", _public_pem(sa_key))
        from cryptography import x509

        ca_key = _read_key(self.pki / "ca.key")
        ca = x509.load_pem_x509_certificate((self.pki / "ca.crt").read_bytes())
        first_service_ip = str(next(ipaddress.ip_network(service_cidr).hosts()))
        leaf = {
            # name: (CN, O, server SANs or None for a client cert)
            "apiserver": (
                "kube-apiserver",
                None,
                {
                    "dns": [
                        "kubernetes",
                        "kubernetes.default",
                        "kubernetes.default.svc",
                        "kubernetes.default.svc.cluster.local",
                        "localhost",
                    ],
                    "ip": [address, "127.0.0.1", "::1", first_service_ip],
                },
            ),
            "admin": ("kubernetes-admin", "system:masters", None),
            "controller-manager": ("system:kube-controller-manager", None, None),
            "scheduler": ("system:kube-scheduler", None, None),
            "kwok-client": ("kwok-controller", "system:masters", None),
            "kwok": ("kwok", None, {"dns": ["localhost"], "ip": [address, "127.0.0.1"]}),
        }
        # Server certificates name the addresses they serve: new ones when an address moves.
        marker = self.pki / "server-ips"
        served = f"{address} {first_service_ip}"
        for name, (cn, org, sans) in leaf.items():
            crt = self.pki / f"{name}.crt"
            stale = sans is not None and (not marker.exists() or marker.read_text() != served)
            if crt.exists() and not stale:
                continue
            key = _ec_key()
            _write_key(self.pki / f"{name}.key", key)
            _write(crt, _pem(_cert(cn, org, key.public_key(), ca_key, ca, sans=sans)))
        _write(marker, served)

    def _write_kubeconfigs(self, address: str) -> None:
        server = f"https://{address}:{PORTS['apiserver']}"
        ca = (self.pki / "ca.crt").read_bytes()
        for user, fname in (
            ("admin", "admin.conf"),
            ("controller-manager", "controller-manager.conf"),
            ("scheduler", "scheduler.conf"),
            ("kwok-client", "kwok.conf"),
        ):
            cfg = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "gpuforge-lab",
                        "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca).decode()},
                    }
                ],
                "users": [
                    {
                        "name": user,
                        "user": {
                            "client-certificate-data": base64.b64encode(
                                (self.pki / f"{user}.crt").read_bytes()
                            ).decode(),
                            "client-key-data": base64.b64encode((self.pki / f"{user}.key").read_bytes()).decode(),
                        },
                    }
                ],
                "contexts": [{"name": "gpuforge-lab", "context": {"cluster": "gpuforge-lab", "user": user}}],
                "current-context": "gpuforge-lab",
            }
            _write(self.dir / fname, yaml.safe_dump(cfg, sort_keys=False), mode=0o600)

    # ------------------------------------------------------------------ kwok configuration

    def _write_kwok_config(self, cluster_execs: list[dict]) -> None:
        # Like kwokctl's --disable-qps-limits: the simulated kubelets must not be what a benchmark measures.
        tuning = {
            "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
            "kind": "KwokConfiguration",
            # kwok does not default the options of a configuration file: every field is spelled out.
            "options": {
                "podPlayStageParallelism": 32,
                "nodePlayStageParallelism": 16,
                "nodeLeaseParallelism": 16,
                "podsOnNodeSyncParallelism": 4,
                "enableDebuggingHandlers": True,
                "enableProfilingHandler": False,
                "enableContentionProfiling": False,
                "manageAllNodes": False,
                "enablePodsOnNodeSyncListPager": True,
                "enablePodsOnNodeSyncStreamWatch": False,
            },
        }
        docs = [tuning, *_stages(self.version), *cluster_execs]
        text = "".join("---\n" + yaml.dump(d, Dumper=_LiteralDumper, sort_keys=False) for d in docs)
        path = self.dir / "kwok.yaml"
        if not path.exists() or path.read_text() != text:
            _write(path, text)
        (self.dir / "kwok-home").mkdir(exist_ok=True)

    def _logs_crd_path(self) -> Path:
        candidates = [self.bin_dir / f"kwok-{self.kwok_version}-crds" / LOGS_CRD]
        modcache = os.environ.get("GOMODCACHE") or str(
            Path(os.environ.get("GOPATH") or Path.home() / "go").expanduser() / "pkg" / "mod"
        )
        candidates.append(Path(modcache) / f"sigs.k8s.io/kwok@{self.kwok_version}/kustomize/crd/bases/{LOGS_CRD}")
        for path in candidates:
            if path.exists():
                return path
        raise FileNotFoundError(f"kwok Logs CRD not found in {[str(c) for c in candidates]}")

    def _ensure_logs_crd(self, deadline: float) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        crd = yaml.safe_load(self._logs_crd_path().read_text())
        api = client.ApiextensionsV1Api(self._api_client())
        name = crd["metadata"]["name"]
        try:
            api.create_custom_resource_definition(crd)
            self._say(f"installed CRD {name}")
        except ApiException as exc:
            if exc.status != 409:
                raise

        def established() -> bool:
            obj = api.read_custom_resource_definition(name)
            return any(c.type == "Established" and c.status == "True" for c in obj.status.conditions or [])

        self._wait(APISERVER, established, deadline, what=f"CRD {name} established")

    def _release_kwok_leases(self) -> None:
        """Delete node Leases held by an earlier kwok process.

        Every kwok process has a random identity and manages a node only while it holds the node's Lease, so
        a restarted kwok would leave nodes (and the pods on them) alone until the old Leases expire (40 s).
        """
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        prefix = socket.gethostname() + "_"
        coord = client.CoordinationV1Api(self._api_client())
        for lease in coord.list_namespaced_lease("kube-node-lease").items:
            if (lease.spec.holder_identity or "").startswith(prefix):
                try:
                    coord.delete_namespaced_lease(lease.metadata.name, "kube-node-lease")
                except ApiException as exc:
                    if exc.status != 404:
                        raise

    def _wait_default_service_account(self, deadline: float) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(self._api_client())

        def exists() -> bool:
            try:
                core.read_namespaced_service_account("default", "default")
                return True
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise

        self._wait(CONTROLLER_MANAGER, exists, deadline, what="service account default/default")

    def _api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    # ------------------------------------------------------------------ command lines

    def _argvs(self, bins: dict[str, Path], state: dict) -> dict[str, list[str]]:
        p, a = PORTS, state["address"]
        d, pki = self.dir, self.pki
        # With an etcd lacking RequestWatchProgress the API server must not turn legacy watches (kwok
        # restarts every watch at resourceVersion 0) into watch-lists, or those watches fail.
        old_etcd_gates = ["--feature-gates=WatchList=false"] if self._old_etcd() else []
        etcd_client, etcd_peer = f"http://{a}:{p['etcd_client']}", f"http://{a}:{p['etcd_peer']}"
        return {
            ETCD: [
                str(bins[ETCD]),
                "--name=lab",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls={etcd_client}",
                f"--advertise-client-urls={etcd_client}",
                f"--listen-peer-urls={etcd_peer}",
                f"--initial-advertise-peer-urls={etcd_peer}",
                f"--initial-cluster=lab={etcd_peer}",
                "--initial-cluster-state=new",
                "--auto-compaction-retention=1",
                "--quota-backend-bytes=8589934592",
                "--logger=zap",
                "--log-outputs=stderr",
            ],
            APISERVER: [
                str(bins[APISERVER]),
                f"--etcd-servers={etcd_client}",
                f"--bind-address={a}",
                f"--secure-port={p['apiserver']}",
                f"--advertise-address={a}",
                # No pod can answer a webhook here (see the module docstring); the call would only time out.
                "--disable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-account-issuer={_SA_ISSUER}",
                f"--service-cluster-ip-range={state['service_cidr']}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                # kwok's nodes carry InternalIP <address> and kwok's port: logs/exec reach kwok.
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                # One machine, no tenants: no request throttling between the lab's own clients.
                "--max-requests-inflight=0",
                "--max-mutating-requests-inflight=0",
                "--enable-priority-and-fairness=false",
                *old_etcd_gates,
            ],
            CONTROLLER_MANAGER: [
                str(bins[CONTROLLER_MANAGER]),
                f"--kubeconfig={d / 'controller-manager.conf'}",
                f"--bind-address={a}",
                f"--secure-port={p['controller_manager']}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={state['service_cidr']}",
                f"--authorization-always-allow-paths={_ALWAYS_ALLOW}",
                "--node-monitor-grace-period=60s",
                "--profiling=false",
                "--kube-api-qps=5000",
                "--kube-api-burst=10000",
            ],
            SCHEDULER: [
                str(bins[SCHEDULER]),
                f"--kubeconfig={d / 'scheduler.conf'}",
                f"--bind-address={a}",
                f"--secure-port={p['scheduler']}",
                "--leader-elect=false",
                f"--authorization-always-allow-paths={_ALWAYS_ALLOW}",
                "--kube-api-qps=5000",
                "--kube-api-burst=10000",
            ],
            KWOK: [
                str(bins[KWOK]),
                f"--kubeconfig={d / 'kwok.conf'}",
                f"--config={d / 'kwok.yaml'}",
                f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
                f"--node-ip={a}",
                "--node-name=localhost",
                f"--node-port={p['kwok']}",
                f"--server-address={a}:{p['kwok']}",
                f"--tls-cert-file={pki / 'kwok.crt'}",
                f"--tls-private-key-file={pki / 'kwok.key'}",
                f"--cidr={state['pod_cidr']}",
                "--enable-crds=Logs",
                "--node-lease-duration-seconds=40",
            ],
        }

    # ------------------------------------------------------------------ health

    def _checks(self) -> dict[str, Callable[[], bool]]:
        return {
            ETCD: self._etcd_healthy,
            APISERVER: self._apiserver_ready,
            CONTROLLER_MANAGER: lambda: _get_ok(f"https://{self.address}:{PORTS['controller_manager']}/healthz"),
            SCHEDULER: lambda: _get_ok(f"https://{self.address}:{PORTS['scheduler']}/healthz"),
            KWOK: lambda: _get_ok(f"http://{self.address}:{PORTS['kwok']}/healthz"),
        }

    def _etcd_healthy(self) -> bool:
        body = _get(f"http://{self.address}:{PORTS['etcd_client']}/health")
        return body is not None and json.loads(body).get("health") == "true"

    def _apiserver_ready(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        return _get(f"{self.server}/readyz", ctx) is not None

    def _wait(self, name: str, check: Callable[[], bool], deadline: float, what: str | None = None) -> None:
        what = what or f"{name} healthy"
        last_error: Exception | None = None
        while True:
            try:
                if check():
                    return
            except Exception as exc:  # noqa: BLE001 - keep polling, report the last error on timeout
                last_error = exc
            dead = not procs.is_running(self.workdir, name)
            if dead or time.monotonic() > deadline:
                path = procs.log_file(self.workdir, name)
                tail = path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"
                why = f"{name} exited" if dead else f"timed out waiting for {what}"
                if last_error is not None:
                    why += f" (last error: {last_error})"
                raise RuntimeError(f"lab control plane: {why}; log {path} ends with:\n{tail}")
            time.sleep(0.2)


# ---------------------------------------------------------------------- kwok documents


def _cluster_exec(rule: dict, index: int) -> dict:
    """One `exec_rules` entry -> a kwok ClusterExec document."""
    rule = dict(rule)
    name = str(rule.pop("name", f"exec-{index}"))
    if "execs" in rule:  # kwok's own spec shape
        spec = {k: rule.pop(k) for k in ("selector", "execs") if k in rule}
    else:
        selector = {}
        if rule.get("namespaces"):
            selector["matchNamespaces"] = list(rule.pop("namespaces"))
        if rule.get("pods"):
            selector["matchNames"] = list(rule.pop("pods"))
        rule.pop("namespaces", None)
        rule.pop("pods", None)
        local: dict[str, Any] = {}
        if rule.get("workdir"):
            local["workDir"] = str(rule.pop("workdir"))
        envs = rule.pop("env", None) or {}
        if envs:
            local["envs"] = [{"name": str(k), "value": str(v)} for k, v in envs.items()]
        sc = {}
        if rule.get("run_as_user") is not None:
            sc["runAsUser"] = int(rule.pop("run_as_user"))
        if rule.get("run_as_group") is not None:
            sc["runAsGroup"] = int(rule.pop("run_as_group"))
        if sc:
            local["securityContext"] = sc
        target: dict[str, Any] = {"local": local}
        containers = rule.pop("containers", None)
        if containers:
            target["containers"] = list(containers)
        spec = {"selector": selector, "execs": [target]}
        for key in ("workdir", "run_as_user", "run_as_group"):
            rule.pop(key, None)
    if rule:
        raise ValueError(f"exec rule {name!r}: unknown keys {sorted(rule)}")
    return {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "ClusterExec", "metadata": {"name": name}, "spec": spec}


# jq (gojq) expressions evaluated by kwok's stage selectors.
_READY = '.status.conditions.[] | select( .type == "Ready" ) | .status'
_CONTAINERS_READY = '.status.conditions.[] | select( .type == "ContainersReady" ) | .status'
_VERSION_DRIFT = (
    f'(.metadata.annotations // {{}})["{KUBELET_VERSION_ANNOTATION}"] as $v'
    ' | $v != null and ("v" + ($v | ltrimstr("v"))) != .status.nodeInfo.kubeletVersion'
)
_RUN_ONCE = (
    '((.metadata.ownerReferences // []) | any(.kind == "Job"))'
    ' or .spec.restartPolicy == "Never" or .spec.restartPolicy == "OnFailure"'
)
# Go template: the annotated kubelet version, v-prefixed, or "".
_ANNOTATED_VERSION = (
    '{{ $annotated := "" }}{{ with .metadata.annotations }}{{ with index . "'
    + KUBELET_VERSION_ANNOTATION
    + '" }}{{ $annotated = printf "v%s" (trimPrefix "v" .) }}{{ end }}{{ end }}'
)


def _stage(name: str, kind: str, match: list[dict], next_: dict, **extra: Any) -> dict:
    spec: dict[str, Any] = {
        "resourceRef": {"apiGroup": "v1", "kind": kind},
        "selector": {"matchExpressions": match},
        **extra,
        "next": next_,
    }
    return {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage", "metadata": {"name": name}, "spec": spec}


def _stages(version: str) -> list[dict]:
    not_deleting = {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"}
    node_initialize = _stage(
        "node-initialize",
        "Node",
        [{"key": _READY, "operator": "NotIn", "values": ["True"]}],
        {
            "statusTemplate": f"""{{{{ $now := Now }}}}
{{{{ $lastTransitionTime := or .metadata.creationTimestamp $now }}}}
conditions:
{{{{ range NodeConditions }}}}
- lastHeartbeatTime: {{{{ $now | Quote }}}}
  lastTransitionTime: {{{{ $lastTransitionTime | Quote }}}}
  message: {{{{ .message | Quote }}}}
  reason: {{{{ .reason | Quote }}}}
  status: {{{{ .status | Quote }}}}
  type: {{{{ .type | Quote }}}}
{{{{ end }}}}
{{{{ with .status.addresses }}}}
addresses: {{{{ YAML . 1 }}}}
{{{{ else }}}}
addresses:
{{{{ with NodeIP }}}}
- address: {{{{ . | Quote }}}}
  type: InternalIP
{{{{ end }}}}
- address: {{{{ .metadata.name | Quote }}}}
  type: Hostname
{{{{ end }}}}
{{{{ with NodePort }}}}
daemonEndpoints:
  kubeletEndpoint:
    Port: {{{{ . }}}}
{{{{ end }}}}
allocatable:
{{{{ with .status.allocatable }}}}
{{{{ YAML . 1 }}}}
{{{{ else }}}}
  cpu: 1k
  memory: 1Ti
  pods: 1M
{{{{ end }}}}
capacity:
{{{{ with .status.capacity }}}}
{{{{ YAML . 1 }}}}
{{{{ else }}}}
  cpu: 1k
  memory: 1Ti
  pods: 1M
{{{{ end }}}}
{{{{ $nodeInfo := .status.nodeInfo }}}}
{{{{ $kwokVersion := printf "kwok-%s" Version }}}}
{_ANNOTATED_VERSION}
nodeInfo:
  architecture: {{{{ or $nodeInfo.architecture "amd64" }}}}
  bootID: {{{{ or $nodeInfo.bootID `""` }}}}
  containerRuntimeVersion: {{{{ or $nodeInfo.containerRuntimeVersion "containerd://2.1.4" | Quote }}}}
  kernelVersion: {{{{ or $nodeInfo.kernelVersion $kwokVersion | Quote }}}}
  kubeProxyVersion: {{{{ or $annotated $nodeInfo.kubeProxyVersion "{version}" | Quote }}}}
  kubeletVersion: {{{{ or $annotated $nodeInfo.kubeletVersion "{version}" | Quote }}}}
  machineID: {{{{ or $nodeInfo.machineID `""` }}}}
  operatingSystem: {{{{ or $nodeInfo.operatingSystem "linux" }}}}
  osImage: {{{{ or $nodeInfo.osImage "Ubuntu 22.04.5 LTS" | Quote }}}}
  systemUUID: {{{{ or $nodeInfo.systemUUID `""` }}}}
phase: Running
"""
        },
    )
    node_version = _stage(
        "node-kubelet-version",
        "Node",
        [
            {"key": _READY, "operator": "In", "values": ["True"]},
            {"key": _VERSION_DRIFT, "operator": "In", "values": ["true"]},
        ],
        {
            "statusTemplate": f"""{_ANNOTATED_VERSION}
nodeInfo:
  kubeletVersion: {{{{ $annotated | Quote }}}}
  kubeProxyVersion: {{{{ $annotated | Quote }}}}
"""
        },
    )
    node_heartbeat = _stage(
        "node-heartbeat",
        "Node",
        [
            {"key": ".status.phase", "operator": "In", "values": ["Running"]},
            {"key": _READY, "operator": "In", "values": ["True"]},
            {"key": _VERSION_DRIFT, "operator": "NotIn", "values": ["true"]},
        ],
        {
            "statusTemplate": """{{ $now := Now }}
{{ $lastTransitionTime := or .metadata.creationTimestamp $now }}
conditions:
{{ range NodeConditions }}
- lastHeartbeatTime: {{ $now | Quote }}
  lastTransitionTime: {{ $lastTransitionTime | Quote }}
  message: {{ .message | Quote }}
  reason: {{ .reason | Quote }}
  status: {{ .status | Quote }}
  type: {{ .type | Quote }}
{{ end }}
"""
        },
        delay={"durationMilliseconds": 20000, "jitterDurationMilliseconds": 25000},
        immediateNextStage=True,
    )
    pod_ready = _stage(
        "pod-ready",
        "Pod",
        [
            not_deleting,
            {"key": ".status.phase", "operator": "In", "values": ["Pending"]},
            {"key": _READY, "operator": "NotIn", "values": ["True"]},
        ],
        {
            "statusTemplate": """{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: ContainersReady
{{ range .spec.readinessGates }}
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: {{ .conditionType | Quote }}
{{ end }}
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  started: true
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
initContainerStatuses:
{{ range .spec.initContainers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  {{ if eq .restartPolicy "Always" }}
  started: true
  state:
    running:
      startedAt: {{ $now | Quote }}
  {{ else }}
  state:
    terminated:
      exitCode: 0
      finishedAt: {{ $now | Quote }}
      reason: Completed
      startedAt: {{ $now | Quote }}
  {{ end }}
{{ end }}
{{ $hostIPs := NodeIPsWith .spec.nodeName }}
{{ with $hostIPs }}
hostIP: {{ index . 0 | Quote }}
hostIPs:
{{ range . }}
- ip: {{ . | Quote }}
{{ end }}
{{ end }}
{{ $podIPs := PodIPsWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) \
( or .metadata.name "" ) ( or .metadata.namespace "" ) }}
{{ with $podIPs }}
podIP: {{ index . 0 | Quote }}
podIPs:
{{ range . }}
- ip: {{ . | Quote }}
{{ end }}
{{ end }}
phase: Running
startTime: {{ $now | Quote }}
"""
        },
    )
    # A kubelet re-reports its pods' readiness after an outage; kwok's pod-ready stage only plays Pending -> Running,
    # so without this stage a pod marked NotReady by the node lifecycle controller stayed NotReady for good (its
    # DaemonSet never ready again: every later Helm --wait on the lab timed out).
    pod_ready_again = _stage(
        "pod-ready-again",
        "Pod",
        [
            not_deleting,
            {"key": ".status.phase", "operator": "In", "values": ["Running"]},
            {"key": _CONTAINERS_READY, "operator": "In", "values": ["True"]},
            {"key": _READY, "operator": "NotIn", "values": ["True"]},
        ],
        {
            "statusTemplate": """{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Ready
"""
        },
    )
    pod_complete = _stage(
        "pod-complete",
        "Pod",
        [
            not_deleting,
            {"key": ".status.phase", "operator": "In", "values": ["Running"]},
            {"key": _RUN_ONCE, "operator": "In", "values": ["true"]},
            {"key": '.metadata.annotations["lab.gpuforge.io/keep-running"]', "operator": "NotIn", "values": ["true"]},
        ],
        {
            "statusTemplate": """{{ $now := Now }}
{{ $code := 0 }}
{{ with .metadata.annotations }}{{ with index . "lab.gpuforge.io/exit-code" }}{{ $code = atoi . }}{{ end }}{{ end }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  type: Ready
  reason: PodCompleted
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  type: ContainersReady
  reason: PodCompleted
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  restartCount: 0
  started: false
  state:
    terminated:
      exitCode: {{ $code }}
      finishedAt: {{ $now | Quote }}
      reason: {{ if eq $code 0 }}Completed{{ else }}Error{{ end }}
      startedAt: {{ $now | Quote }}
{{ end }}
phase: {{ if eq $code 0 }}Succeeded{{ else }}Failed{{ end }}
"""
        },
        delay={
            "durationMilliseconds": 0,
            "durationFrom": {"expressionFrom": '.metadata.annotations["lab.gpuforge.io/complete-after"]'},
        },
    )
    pod_delete = _stage(
        "pod-delete",
        "Pod",
        [{"key": ".metadata.deletionTimestamp", "operator": "Exists"}],
        {"delete": True},
    )
    return [node_initialize, node_version, node_heartbeat, pod_ready, pod_ready_again, pod_complete, pod_delete]


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the Go templates) as YAML literal blocks, for a readable kwok.yaml."""


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_LiteralDumper.add_representer(str, _str_representer)


# ---------------------------------------------------------------------- helpers


def _write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read()
    except FileNotFoundError:
        return b""


def _descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 3.0) -> bytes | None:
    """Body of a 200 answer, else None."""
    if ctx is None and url.startswith("https:"):
        ctx = ssl._create_unverified_context()  # noqa: S323 - self-signed health endpoints of the lab
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:  # noqa: S310
            return resp.read() if resp.status == 200 else None
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return None


def _get_ok(url: str) -> bool:
    return _get(url) is not None


def _ec_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _rsa_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    _write(path, pem, mode=0o600)


def _read_key(path: Path):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _public_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _cert(cn: str, org: str | None, public_key, signer_key, issuer, *, ca: bool = False, sans: dict | None = None):
    """A certificate valid for 10 years: the CA (self-signed), a server cert (with SANs) or a client cert."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    attrs = []
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    subject = x509.Name(attrs)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if sans else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False
        )
    if sans:
        names = [x509.DNSName(n) for n in sans.get("dns", [])]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in sans.get("ip", [])]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer_key, hashes.SHA256())


# ---------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lab.controlplane")
    parser.add_argument("action", choices=["up", "down", "status", "restart-apiserver", "set-version"])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--bin-dir", type=Path, default=Path.home() / ".cache/gpuforge/bin")
    parser.add_argument("--k8s-version", default=K8S_VERSION, help="the release to run (binaries per version)")
    parser.add_argument("--service-cidr", default=DEFAULT_SERVICE_CIDR)
    parser.add_argument("--purge", action="store_true", help="with down: delete etcd data and certificates")
    args = parser.parse_args(argv)
    cp = ControlPlane(args.workdir, args.bin_dir, k8s_version=args.k8s_version, progress=lambda m: print(m, flush=True))
    if args.action == "up":
        cp.up(service_cidr=args.service_cidr)
        print(f"export KUBECONFIG={cp.kubeconfig}")
    elif args.action == "down":
        cp.down(purge=args.purge)
    elif args.action == "restart-apiserver":
        cp.restart_apiserver()
    elif args.action == "set-version":
        before = cp._load_state().get("version")
        cp.set_version()
        print(json.dumps({"version": cp.version, "changed": before != cp.version}))
    else:
        print(json.dumps(cp.status(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
