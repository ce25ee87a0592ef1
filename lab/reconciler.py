"""The operators' controllers, for the lab only: what the GPU Operator, GFD/device plugin and Slinky's NodeSet
controller do on a real cluster, and what kwok alone does not.

    python -m lab.reconciler --kubeconfig K --inventory FILE [--slurm-env FILE] [--logs-dir DIR]

FILE (written by the lab) says which simulated nodes have GPUs: {"gpu01": {"gpus": 8, "model": "H100"}, ...}
(a top-level {"nodes": {...}} is accepted too). It is re-read when it changes. Nodes missing from it, or with
`gpus: 0`, are CPU nodes.

(a) GPU Operator. While ClusterPolicy `cluster-policy` (made by the real chart) exists and Deployment `gpu-operator`
    (in the release's namespace) is available: the operand DaemonSets of every enabled operand are created as the
    operator's state machine would (owned by the ClusterPolicy), with dcgm-exporter's Service and, when
    `dcgmExporter.serviceMonitor.enabled` and the CRD exists, its ServiceMonitor (`app=nvidia-dcgm-exporter` plus
    `serviceMonitor.additionalLabels`). Every GPU node gets NFD's `feature.node.kubernetes.io/pci-10de.present=true`,
    then `nvidia.com/gpu.present=true` and the `nvidia.com/gpu.deploy.<operand>=true` labels, so the operand DaemonSets
    schedule there. The DCGM simulator (--dcgm-url) is told the dcgm-exporter image tag the ClusterPolicy deploys
    (`dcgmExporter.version`), as the exporter pods the operator rolls out would serve that version's labels. Once every
    enabled operand DaemonSet is ready (numberReady == desiredNumberScheduled > 0), each GPU node gets
    capacity/allocatable `nvidia.com/gpu` = its inventory count (status subresource) and GFD's labels
    (`nvidia.com/gpu.product`, `gpu.count`, `gpu.memory`, `gpu.family`, `cuda.driver-version.*`, ...), and the
    ClusterPolicy's status becomes `ready` (condition Ready=True, reason Reconciled, or NoGPUNodes without GPU nodes, as
    upstream); `notReady` (Ready=False, Error=True, OperandNotReady) while an operand is not. With the operator
    Deployment unavailable nothing changes, as with a dead operator. When the ClusterPolicy goes (release removed), the
    labels and capacity set here are undone; what each node got is kept in its annotation
    `lab.gpuforge.io/gpu-operator`.
(b) Pod logs. Every pod bound to a node gets a kwok `Logs` object (same name/namespace, owner = the pod,
    label app.kubernetes.io/managed-by=lab-reconciler) whose logsFile (CRI format, under --logs-dir) depends on
    each container's image: `cuda-sample:vectoradd*` prints the real vectorAdd output ending in `Test PASSED` and
    `Done`; any other image a generic start line. Logs of deleted pods are deleted.
(c) Slinky NodeSets. For each NodeSet, pods `<nodeset>-<ordinal>` for ordinals < spec.replicas (container
    `slurmd` from spec.slurmd, the rest from spec.template: nodeSelector, tolerations, GPU limits, hostname
    prefix), owned by the NodeSet; extra ordinals and finished pods are deleted. Status: replicas,
    readyReplicas, updatedReplicas, availableReplicas, desired, selector, nodeSetHash, and, with --slurm-env,
    slurmIdle/slurmAllocated/slurmDown/slurmDrain counted from `sinfo -h -N -o '%N %T'` for the Kubernetes
    nodes those pods run on (the lab's Slurm node names are the Kubernetes node names; pod name and hostname
    match too). Without --slurm-env those stay 0.

(d) Slinky Controller. For each Controller (not external): StatefulSet and headless Service `<name>-controller`
    (pod `<name>-controller-0`, container `slurmctld`) with the `statesave` volume from spec.persistence, as the
    slurm-operator builds them. No slurm.conf is rendered: the lab's real slurmctld has its own.
(e) Kubespray's local-path provisioner. Claims of a StorageClass whose provisioner is `rancher.io/local-path`
    get a hostPath PersistentVolume on the node the scheduler chose; the PV controller binds them.

Every input is watched (list + watch with bookmarks, one thread per resource); a change triggers a full,
idempotent pass within ~0.1 s. Watches that break (API server restart) re-list with backoff (0.2 s .. 1 s);
a pass that fails is retried after 1 s; a full pass also runs every --resync seconds. Actions are logged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lab.dcgm_sim import post_faults

log = logging.getLogger("lab.reconciler")

MANAGED_BY = "lab-reconciler"
STATE_ANNOTATION = "lab.gpuforge.io/gpu-operator"
GPU_RESOURCE = "nvidia.com/gpu"
NFD_GPU_LABEL = "feature.node.kubernetes.io/pci-10de.present"
CLUSTER_POLICY = "cluster-policy"
OPERATOR_DEPLOYMENT = "gpu-operator"
DEFAULT_OPERATOR_NAMESPACE = "gpu-operator"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"

# nvidia.com/gpu.deploy.<operand> labels the operator puts on every GPU node.
DEPLOY_OPERANDS = (
    "driver",
    "container-toolkit",
    "device-plugin",
    "dcgm",
    "dcgm-exporter",
    "gpu-feature-discovery",
    "operator-validator",
    "node-status-exporter",
)
# Operand DaemonSets the operator creates: (ClusterPolicy spec key or None = always, DaemonSet name, upstream
# state name, the nvidia.com/gpu.deploy.<operand> label that places it).
OPERANDS = (
    ("driver", "nvidia-driver-daemonset", "state-driver", "driver"),
    ("toolkit", "nvidia-container-toolkit-daemonset", "state-container-toolkit", "container-toolkit"),
    (None, "nvidia-operator-validator", "state-operator-validation", "operator-validator"),
    ("devicePlugin", "nvidia-device-plugin-daemonset", "state-device-plugin", "device-plugin"),
    ("dcgmExporter", "nvidia-dcgm-exporter", "state-dcgm-exporter", "dcgm-exporter"),
    ("gfd", "gpu-feature-discovery", "gpu-feature-discovery", "gpu-feature-discovery"),
    ("nodeStatusExporter", "nvidia-node-status-exporter", "state-node-status-exporter", "node-status-exporter"),
)
DCGM_EXPORTER = "nvidia-dcgm-exporter"
DCGM_EXPORTER_PORT = 9400
SPEC_HASH_ANNOTATION = "lab.gpuforge.io/spec-hash"
# Kubespray's local-path-provisioner addon: the provisioner name its StorageClass carries, and where it keeps
# volumes on the node (the lab creates no directory: kwok pods mount nothing).
LOCAL_PATH_PROVISIONER = "rancher.io/local-path"
LOCAL_PATH_DIR = "/opt/local-path-provisioner"
SELECTED_NODE_ANNOTATION = "volume.kubernetes.io/selected-node"
_DEFAULT_OFF = {"nodeStatusExporter"}

# GPU model -> what GFD reports. Keys are matched as words in the inventory's model string.
GPU_MODELS: dict[str, dict[str, Any]] = {
    "H200": {"product": "NVIDIA-H200", "memory": 143771, "family": "hopper", "cc": (9, 0), "mig": True},
    "H100": {"product": "NVIDIA-H100-80GB-HBM3", "memory": 81559, "family": "hopper", "cc": (9, 0), "mig": True},
    "B200": {"product": "NVIDIA-B200", "memory": 183359, "family": "blackwell", "cc": (10, 0), "mig": True},
    "A100": {"product": "NVIDIA-A100-SXM4-80GB", "memory": 81920, "family": "ampere", "cc": (8, 0), "mig": True},
    "L40S": {"product": "NVIDIA-L40S", "memory": 46068, "family": "ada-lovelace", "cc": (8, 9), "mig": False},
    "L4": {"product": "NVIDIA-L4", "memory": 23034, "family": "ada-lovelace", "cc": (8, 9), "mig": False},
    "T4": {"product": "Tesla-T4", "memory": 15360, "family": "turing", "cc": (7, 5), "mig": False},
}
# Driver branch -> CUDA version it ships (for cuda.runtime-version / cuda.driver-version labels).
_CUDA_BY_DRIVER = ((595, "13.2"), (590, "13.1"), (580, "13.0"), (575, "12.9"), (570, "12.8"), (0, "12.4"))
DEFAULT_DRIVER = "595.91.07"

VECTORADD_LOG = [
    "[Vector addition of 50000 elements]",
    "Copy input data from the host memory to the CUDA device",
    "CUDA kernel launch with 196 blocks of 256 threads",
    "Copy output data from the CUDA device to the host memory",
    "Test PASSED",
    "Done",
]
_VECTORADD_IMAGE = re.compile(r"(^|/)cuda-sample:vectoradd", re.IGNORECASE)

_LOGS_API = "/apis/kwok.x-k8s.io/v1alpha1"
_NODESET_API = "/apis/slinky.slurm.net/v1beta1"
_MONITORING_API = "/apis/monitoring.coreos.com/v1"


class ApiError(Exception):
    def __init__(self, status: int, body: bytes | str, what: str = "") -> None:
        self.status = status
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        try:
            self.message = json.loads(text).get("message", text)
        except (ValueError, AttributeError):
            self.message = text
        super().__init__(f"{what}: HTTP {status}: {self.message}" if what else f"HTTP {status}: {self.message}")


class _Expired(Exception):
    """A watch's resourceVersion is too old (410): list again."""


# ---------------------------------------------------------------------------------------------------- client


class Kube:
    """A minimal JSON client over the kubernetes package's configured urllib3 pool (TLS and auth from the
    kubeconfig): plain dicts in and out, and raw watch streams."""

    def __init__(self, kubeconfig: str | Path) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        cfg.connection_pool_maxsize = 32  # one long-lived watch per resource plus writes
        self._api = client.ApiClient(cfg)
        self._pool = self._api.rest_client.pool_manager
        self.host = cfg.host.rstrip("/")
        self._headers = {"Accept": "application/json", "User-Agent": "lab-reconciler"}
        for setting in cfg.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                self._headers[setting["key"]] = setting["value"]

    def _url(self, path: str, query: dict[str, Any] | None) -> str:
        return self.host + path + ("?" + urllib.parse.urlencode(query) if query else "")

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: tuple[float, float] = (5.0, 30.0),
    ) -> Any:
        import urllib3

        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        resp = self._pool.request(
            method,
            self._url(path, query),
            body=data,
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
            retries=False,
            preload_content=True,
        )
        if not 200 <= resp.status < 300:
            raise ApiError(resp.status, resp.data, f"{method} {path}")
        return json.loads(resp.data) if resp.data else None

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def merge_patch(self, path: str, body: dict) -> Any:
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def create(self, path: str, body: dict) -> Any:
        return self.request("POST", path, body=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def watch(self, path: str, query: dict[str, Any], read_timeout: float) -> Iterable[dict]:
        """Yield watch events (dicts) until the server ends the stream."""
        import urllib3

        resp = self._pool.request(
            "GET",
            self._url(path, {**query, "watch": "true"}),
            headers=self._headers,
            timeout=urllib3.Timeout(connect=5.0, read=read_timeout),
            retries=False,
            preload_content=False,
        )
        try:
            if resp.status != 200:
                raise ApiError(resp.status, resp.read(), f"WATCH {path}")
            buf = b""
            for chunk in resp.stream(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()
            resp.close()


# ------------------------------------------------------------------------------------------------- informers


def object_key(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


class Informer(threading.Thread):
    """Keeps `items` (key -> object) equal to the API's list of `path` through list + watch; calls `on_change`
    after every change. A resource served by a CRD (`crd` = its name) is empty until the CRD is established."""

    def __init__(
        self,
        kube: Kube,
        name: str,
        path: str,
        *,
        on_change: Callable[[str], None],
        stop: threading.Event,
        query: dict[str, Any] | None = None,
        crd: str | None = None,
        crds: Informer | None = None,
        watch_timeout: int = 240,
    ) -> None:
        super().__init__(name=f"watch-{name}", daemon=True)
        self.kube = kube
        self.kind = name
        self.path = path
        self.query = dict(query or {})
        self.crd = crd
        self.crds = crds
        self.on_change = on_change
        self.stop = stop
        self.watch_timeout = watch_timeout
        self.synced = threading.Event()
        self.changed = threading.Condition()
        self._items: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._failing = False

    # -- reading
    def items(self) -> list[dict]:
        with self._lock:
            return list(self._items.values())

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._items.get(key)

    def established(self, crd_name: str) -> bool:
        """For the CRD informer: the CRD exists and is Established."""
        crd = self.get(crd_name)
        if not crd:
            return False
        return any(
            c.get("type") == "Established" and c.get("status") == "True"
            for c in (crd.get("status") or {}).get("conditions") or []
        )

    # -- machinery
    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()
        self.on_change(self.kind)

    def _replace(self, items: list[dict]) -> None:
        new = {object_key(o): o for o in items}
        with self._lock:
            old = {k: v["metadata"].get("resourceVersion") for k, v in self._items.items()}
            self._items = new
        if old != {k: v["metadata"].get("resourceVersion") for k, v in new.items()}:
            self._notify()

    def run(self) -> None:
        delay = 0.2
        while not self.stop.is_set():
            if self.crd and self.crds is not None and not self.crds.established(self.crd):
                self._replace([])
                self.synced.set()
                with self.crds.changed:
                    self.crds.changed.wait(timeout=5.0)
                continue
            try:
                listing = self.kube.get(self.path, **self.query)
                self._replace(listing.get("items") or [])
                self.synced.set()
                if self._failing:
                    log.info("%s: listing works again", self.kind)
                self._failing = False
                delay = 0.2
                rv = listing["metadata"]["resourceVersion"]
                while not self.stop.is_set():
                    rv = self._watch(rv)
            except _Expired:
                log.debug("%s: watch expired, listing again", self.kind)
            except Exception as exc:  # noqa: BLE001 - any failure: list again after a pause
                # A CRD just created answers 404/429 for a moment: expected, not worth a warning.
                transient = isinstance(exc, ApiError) and exc.status in (404, 429)
                if not self._failing:
                    log.log(logging.DEBUG if transient else logging.WARNING, "%s: list/watch failed (%s); retrying",
                            self.kind, _short(exc))  # fmt: skip
                self._failing = not transient
                self.stop.wait(delay)
                delay = min(delay * 2, 1.0)

    def _watch(self, rv: str) -> str:
        query = {
            **self.query,
            "resourceVersion": rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout),
        }
        for event in self.kube.watch(self.path, query, read_timeout=self.watch_timeout + 30):
            etype, obj = event.get("type"), event.get("object") or {}
            if etype == "ERROR":
                if obj.get("code") == 410:
                    raise _Expired()
                raise ApiError(obj.get("code") or 500, json.dumps(obj), f"WATCH {self.path}")
            rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
            if etype == "BOOKMARK":
                continue
            key = object_key(obj)
            with self._lock:
                if etype == "DELETED":
                    self._items.pop(key, None)
                else:
                    self._items[key] = obj
            self._notify()
            if self.stop.is_set():
                break
        return rv


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


# ----------------------------------------------------------------------------------------------- small pieces


def _labels(obj: dict) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _annotations(obj: dict) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def _deleting(obj: dict) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pod_ready(pod: dict) -> bool:
    if (pod.get("status") or {}).get("phase") != "Running":
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def load_inventory(path: Path) -> dict[str, dict[str, Any]]:
    """{node: {"gpus": int, "model": str}}; a missing file is an empty inventory."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    if isinstance(data, dict) and isinstance(data.get("nodes"), dict):
        data = data["nodes"]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of node name -> {{gpus, model}}")
    inv = {}
    for name, entry in data.items():
        entry = entry or {}
        inv[str(name)] = {"gpus": int(entry.get("gpus") or 0), "model": str(entry.get("model") or "")}
    return inv


def load_env_file(path: Path) -> dict[str, str]:
    """A JSON object, or `KEY=VALUE` / `export KEY=VALUE` lines (what `python -m lab.slurm env` prints)."""
    text = path.read_text()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    except ValueError:
        pass
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if sep and key:
            env[key.strip()] = value.strip().strip("'\"")
    return env


def gpu_model_info(model: str) -> dict[str, Any]:
    """GFD's view of a model string ("H100", "NVIDIA H100 80GB HBM3", ...)."""
    words = set(re.split(r"[\s_\-]+", model.upper().replace("NVIDIA", " ")))
    for key, info in GPU_MODELS.items():
        if key in words:
            product = info["product"] if model.strip().upper() in (key, f"NVIDIA {key}") else None
            return {**info, "product": product or re.sub(r"\s+", "-", model.strip())}
    product = re.sub(r"\s+", "-", model.strip()) or "NVIDIA-GPU"
    return {"product": product, "memory": None, "family": None, "cc": None, "mig": False}


def gfd_labels(gpus: int, model: str, driver_version: str, mig_strategy: str) -> dict[str, str]:
    info = gpu_model_info(model)
    parts = (driver_version.split(".") + ["0", "0"])[:3]
    cuda = next(v for branch, v in _CUDA_BY_DRIVER if int(parts[0] or 0) >= branch)
    cuda_major, cuda_minor = cuda.split(".")
    labels = {
        "nvidia.com/gpu.product": _label_value(info["product"]),
        "nvidia.com/gpu.count": str(gpus),
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
        "nvidia.com/gpu.mode": "compute",
        "nvidia.com/gpu.machine": "lab-kwok-node",
        "nvidia.com/mig.capable": str(bool(info["mig"])).lower(),
        "nvidia.com/mig.strategy": mig_strategy or "single",
        "nvidia.com/cuda.driver-version.major": parts[0],
        "nvidia.com/cuda.driver-version.minor": parts[1],
        "nvidia.com/cuda.driver-version.revision": parts[2],
        "nvidia.com/cuda.driver-version.full": ".".join(parts),
        "nvidia.com/cuda.runtime-version.major": cuda_major,
        "nvidia.com/cuda.runtime-version.minor": cuda_minor,
        "nvidia.com/cuda.runtime-version.full": cuda,
        # deprecated names GFD still writes
        "nvidia.com/cuda.driver.major": parts[0],
        "nvidia.com/cuda.driver.minor": parts[1],
        "nvidia.com/cuda.driver.rev": parts[2],
        "nvidia.com/cuda.runtime.major": cuda_major,
        "nvidia.com/cuda.runtime.minor": cuda_minor,
    }
    if info["memory"]:
        labels["nvidia.com/gpu.memory"] = str(info["memory"])
    if info["family"]:
        labels["nvidia.com/gpu.family"] = info["family"]
    if info["cc"]:
        labels["nvidia.com/gpu.compute.major"] = str(info["cc"][0])
        labels["nvidia.com/gpu.compute.minor"] = str(info["cc"][1])
    return labels


def _label_value(value: str) -> str:
    value = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.\-]", "-", value))[:63]
    return value.strip("-_.") or "unknown"


def _cri_lines(lines: list[str], when: dt.datetime) -> str:
    out = []
    for i, line in enumerate(lines):
        stamp = (when + dt.timedelta(milliseconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
        out.append(f"{stamp} stdout F {line}")
    return "\n".join(out) + "\n"


def slurm_node_class(state: str) -> str | None:
    """`sinfo %T` state -> idle | allocated | down | drain (or None for states Slinky does not count)."""
    s = state.strip().lower()
    not_responding = s.endswith("*")
    base = s.rstrip("*~#!%$@^-+")
    if base.startswith("drain"):  # drained, draining
        return "drain"
    if not_responding or base in ("down", "fail", "failing", "inval", "unknown", "future"):
        return "down"
    if base in ("allocated", "mixed", "completing"):
        return "allocated"
    if base in ("idle", "planned", "reserved", "power_up", "powering_up"):
        return "idle"
    return None


# ------------------------------------------------------------------------------------------------ reconciler


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        inventory: Path,
        logs_dir: Path,
        slurm_env: dict[str, str] | None = None,
        *,
        resync: float = 30.0,
        slurm_poll: float = 2.0,
        dcgm_url: str | None = None,
    ) -> None:
        self.kube = kube
        self.dcgm_url = dcgm_url
        self._exporter_told: str | None = None  # the exporter tag the DCGM simulator was last told
        self.inventory_path = inventory
        self.logs_dir = logs_dir
        self.slurm_env = slurm_env
        self.resync = resync
        self.slurm_poll = slurm_poll
        self.stop = threading.Event()
        self.dirty = threading.Event()
        self.inventory: dict[str, dict[str, Any]] = {}
        self._inventory_mtime: float | None = None
        self._slurm_states: dict[str, str] | None = None
        self._slurm_lock = threading.Lock()
        self._written: dict[tuple[str, str], tuple[str | None, str]] = {}
        self._log_files: set[Path] = set()
        self._foreign_logs: set[str] = set()
        self.passes = 0

        def changed(_kind: str) -> None:
            self.dirty.set()

        self.crds = Informer(
            kube, "crds", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", on_change=changed, stop=self.stop
        )
        common = {"on_change": changed, "stop": self.stop}
        self.nodes = Informer(kube, "nodes", "/api/v1/nodes", **common)
        self.pods = Informer(kube, "pods", "/api/v1/pods", **common)
        self.daemonsets = Informer(kube, "daemonsets", "/apis/apps/v1/daemonsets", **common)
        self.deployments = Informer(
            kube,
            "deployments",
            "/apis/apps/v1/deployments",
            query={"fieldSelector": f"metadata.name={OPERATOR_DEPLOYMENT}"},
            **common,
        )
        self.policies = Informer(
            kube,
            "clusterpolicies",
            "/apis/nvidia.com/v1/clusterpolicies",
            crd="clusterpolicies.nvidia.com",
            crds=self.crds,
            **common,
        )
        self.nodesets = Informer(
            kube,
            "nodesets",
            f"{_NODESET_API}/nodesets",
            crd="nodesets.slinky.slurm.net",
            crds=self.crds,
            **common,
        )
        self.logs = Informer(
            kube,
            "logs",
            f"{_LOGS_API}/logs",
            query={"labelSelector": f"app.kubernetes.io/managed-by={MANAGED_BY}"},
            crd="logs.kwok.x-k8s.io",
            crds=self.crds,
            **common,
        )
        ours = {"labelSelector": f"app.kubernetes.io/managed-by={MANAGED_BY}"}
        self.services = Informer(kube, "services", "/api/v1/services", query=ours, **common)
        self.statefulsets = Informer(kube, "statefulsets", "/apis/apps/v1/statefulsets", query=ours, **common)
        self.servicemonitors = Informer(
            kube,
            "servicemonitors",
            f"{_MONITORING_API}/servicemonitors",
            query=ours,
            crd="servicemonitors.monitoring.coreos.com",
            crds=self.crds,
            **common,
        )
        self.controllers = Informer(
            kube,
            "controllers",
            f"{_NODESET_API}/controllers",
            crd="controllers.slinky.slurm.net",
            crds=self.crds,
            **common,
        )
        self.storageclasses = Informer(kube, "storageclasses", "/apis/storage.k8s.io/v1/storageclasses", **common)
        self.claims = Informer(kube, "persistentvolumeclaims", "/api/v1/persistentvolumeclaims", **common)
        self.informers = [
            self.crds,
            self.nodes,
            self.pods,
            self.daemonsets,
            self.deployments,
            self.policies,
            self.nodesets,
            self.logs,
            self.services,
            self.statefulsets,
            self.servicemonitors,
            self.controllers,
            self.storageclasses,
            self.claims,
        ]

    # ---------------------------------------------------------------- loop

    def start(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._reload_inventory()
        for inf in self.informers:
            inf.start()
        threading.Thread(target=self._ticker, name="ticker", daemon=True).start()
        if self.slurm_env is not None:
            threading.Thread(target=self._slurm_poller, name="sinfo", daemon=True).start()

    def run(self) -> None:
        self.start()
        log.info("started: inventory %s (%d GPU nodes), logs in %s, slurm %s", self.inventory_path,
                 sum(1 for e in self.inventory.values() if e["gpus"] > 0), self.logs_dir,
                 "on" if self.slurm_env is not None else "off")  # fmt: skip
        for inf in self.informers:
            while not inf.synced.wait(1.0):
                if self.stop.is_set():
                    return
        log.info("all watches synced")
        self.dirty.set()
        while not self.stop.is_set():
            self.dirty.wait(timeout=self.resync)
            if self.stop.is_set():
                break
            time.sleep(0.05)  # let a burst of events settle into one pass
            self.dirty.clear()
            self.reconcile_once()

    def reconcile_once(self) -> bool:
        ok = True
        for step in (
            self.reconcile_gpu,
            self.reconcile_logs,
            self.reconcile_slurm_controllers,
            self.reconcile_nodesets,
            self.reconcile_local_volumes,
        ):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - log, retry shortly
                ok = False
                log.warning("%s failed: %s", step.__name__, _short(exc))
                log.debug("traceback", exc_info=True)
        self.passes += 1
        if len(self._written) > 10000:  # forget old write records now and then
            self._written.clear()
        if not ok:
            threading.Timer(1.0, self.dirty.set).start()
        return ok

    def _ticker(self) -> None:
        while not self.stop.wait(1.0):
            try:
                if self._reload_inventory():
                    self.dirty.set()
            except Exception as exc:  # noqa: BLE001
                log.warning("inventory %s unreadable: %s", self.inventory_path, _short(exc))

    def _reload_inventory(self) -> bool:
        try:
            mtime = self.inventory_path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime == self._inventory_mtime:
            return False
        self.inventory = load_inventory(self.inventory_path)
        self._inventory_mtime = mtime
        log.info("inventory: %s", {n: e["gpus"] for n, e in sorted(self.inventory.items())})
        return True

    def _slurm_poller(self) -> None:
        failing = False
        while not self.stop.wait(self.slurm_poll):
            if not self.nodesets.items():
                continue
            try:
                out = subprocess.run(
                    ["sinfo", "-h", "-N", "-o", "%N %T"],
                    env={**os.environ, **(self.slurm_env or {})},
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                if out.returncode != 0:
                    raise RuntimeError(out.stderr.strip() or f"exit {out.returncode}")
            except Exception as exc:  # noqa: BLE001
                if not failing:
                    log.warning("sinfo failed (%s); NodeSet Slurm counts kept as they were", _short(exc))
                failing = True
                continue
            if failing:
                log.info("sinfo works again")
            failing = False
            states: dict[str, str] = {}
            for line in out.stdout.splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    states.setdefault(parts[0], parts[1])  # -N lists a node once per partition
            with self._slurm_lock:
                if states != self._slurm_states:
                    self._slurm_states = states
                    self.dirty.set()

    # ---------------------------------------------------------------- writes

    def _once(self, kind: str, obj: dict, payload: Any, key: str | None = None) -> bool:
        """False when exactly this write was already sent for this version of `obj` (cache not caught up)."""
        wkey = (kind, key or object_key(obj))
        digest = hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        rv = obj["metadata"].get("resourceVersion")
        if self._written.get(wkey) == (rv, digest):
            return False
        self._written[wkey] = (rv, digest)
        return True

    def _forget(self, kind: str, obj: dict) -> None:
        self._written.pop((kind, object_key(obj)), None)

    # ---------------------------------------------------------------- (a) GPU Operator

    def reconcile_gpu(self) -> None:
        nodes = [n for n in self.nodes.items() if not _deleting(n)]
        policy = self.policies.get(CLUSTER_POLICY)
        if policy is None or _deleting(policy):
            for node in nodes:
                if STATE_ANNOTATION in _annotations(node):
                    self._undo_node(node)
            return
        namespace = _annotations(policy).get("meta.helm.sh/release-namespace") or DEFAULT_OPERATOR_NAMESPACE
        deployment = self.deployments.get(f"{namespace}/{OPERATOR_DEPLOYMENT}")
        if not deployment or int((deployment.get("status") or {}).get("availableReplicas") or 0) < 1:
            log.debug("operator Deployment %s/%s not available: nothing changes", namespace, OPERATOR_DEPLOYMENT)
            return
        spec = policy.get("spec") or {}
        gpu_nodes = [n for n in nodes if self.inventory.get(n["metadata"]["name"], {}).get("gpus", 0) > 0]
        gpu_names = {n["metadata"]["name"] for n in gpu_nodes}
        for node in nodes:
            if node["metadata"]["name"] not in gpu_names and STATE_ANNOTATION in _annotations(node):
                self._undo_node(node)

        def enabled(key: str | None) -> bool:
            if key is None:
                return True
            return bool((spec.get(key) or {}).get("enabled", key not in _DEFAULT_OFF))

        self._ensure_operands(policy, namespace, enabled)
        not_ready = []
        for key, ds_name, state_name, _ in OPERANDS:
            if enabled(key) and not self._daemonset_ready(namespace, ds_name, need_pods=bool(gpu_nodes)):
                not_ready.append(state_name)
        operands_ready = not not_ready
        driver = str((spec.get("driver") or {}).get("version") or DEFAULT_DRIVER)
        mig_strategy = str((spec.get("mig") or {}).get("strategy") or "single")
        for node in gpu_nodes:
            entry = self.inventory[node["metadata"]["name"]]
            info = gpu_model_info(entry["model"])
            labels = {NFD_GPU_LABEL: "true", "nvidia.com/gpu.present": "true"}
            labels.update({f"nvidia.com/gpu.deploy.{op}": "true" for op in DEPLOY_OPERANDS})
            if info["mig"]:
                labels["nvidia.com/gpu.deploy.mig-manager"] = "true"
            capacity = None
            if operands_ready:
                if enabled("gfd"):
                    labels.update(gfd_labels(entry["gpus"], entry["model"], driver, mig_strategy))
                    labels.setdefault("nvidia.com/gfd.timestamp", _labels(node).get("nvidia.com/gfd.timestamp")
                                      or str(int(time.time())))  # fmt: skip
                if enabled("devicePlugin"):
                    capacity = entry["gpus"]
            self._apply_node(node, labels, capacity)
        self._set_policy_status(policy, namespace, not_ready, has_gpu_nodes=bool(gpu_nodes))

    def _ensure_operands(self, policy: dict, namespace: str, enabled: Callable[[str | None], bool]) -> None:
        """What the operator's state machine creates from the ClusterPolicy: one DaemonSet per enabled operand
        (placed by its nvidia.com/gpu.deploy.* label), dcgm-exporter's Service, and its ServiceMonitor when
        `dcgmExporter.serviceMonitor.enabled` and the CRD exists. All owned by the ClusterPolicy, so they go
        with it (garbage collection), as on a cluster."""
        spec = policy.get("spec") or {}
        owner = _owner(policy, "nvidia.com/v1", "ClusterPolicy")
        daemonsets = spec.get("daemonsets") or {}
        for key, ds_name, _, deploy_label in OPERANDS:
            present = self.daemonsets.get(f"{namespace}/{ds_name}")
            if not enabled(key):
                if present and _owned_by(present, policy):
                    self._delete(f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{ds_name}", "operand disabled")
                continue
            component = (spec.get(key) if key else spec.get("validator")) or {}
            image = "/".join(p for p in (component.get("repository"), component.get("image")) if p) or ds_name
            pod_labels = {"app": ds_name, **(daemonsets.get("labels") or {})}
            body = {
                "apiVersion": "apps/v1",
                "kind": "DaemonSet",
                "metadata": {"name": ds_name, "namespace": namespace, "labels": pod_labels, "ownerReferences": [owner]},
                "spec": {
                    "selector": {"matchLabels": {"app": ds_name}},
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": {
                            "nodeSelector": {f"nvidia.com/gpu.deploy.{deploy_label}": "true"},
                            "tolerations": daemonsets.get("tolerations") or [],
                            "containers": [{"name": ds_name, "image": f"{image}:{component.get('version') or 'lab'}"}],
                        },
                    },
                },
            }
            self._ensure(f"/apis/apps/v1/namespaces/{namespace}/daemonsets", body, present)
        exporter = spec.get("dcgmExporter") or {}
        if not enabled("dcgmExporter"):
            return
        self._tell_dcgm_sim(str(exporter.get("version") or ""))
        metrics_labels = {"app": DCGM_EXPORTER}
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": DCGM_EXPORTER, "namespace": namespace, "labels": metrics_labels,
                         "ownerReferences": [owner]},
            "spec": {
                "selector": {"app": DCGM_EXPORTER},
                "ports": [{"name": "gpu-metrics", "port": DCGM_EXPORTER_PORT, "targetPort": DCGM_EXPORTER_PORT}],
            },
        }  # fmt: skip
        self._ensure(
            f"/api/v1/namespaces/{namespace}/services", service, self.services.get(f"{namespace}/{DCGM_EXPORTER}")
        )
        monitor = exporter.get("serviceMonitor") or {}
        if not monitor.get("enabled") or not self.crds.established("servicemonitors.monitoring.coreos.com"):
            return
        endpoint = {"port": "gpu-metrics", "path": "/metrics"}
        for field in ("interval", "scrapeTimeout", "honorLabels", "relabelings"):
            if monitor.get(field) not in (None, [], ""):
                endpoint[field] = monitor[field]
        body = {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {
                "name": DCGM_EXPORTER,
                "namespace": namespace,
                "labels": {**metrics_labels, **(monitor.get("additionalLabels") or {})},
                "ownerReferences": [owner],
            },
            "spec": {
                "selector": {"matchLabels": metrics_labels},
                "namespaceSelector": {"matchNames": [namespace]},
                "endpoints": [endpoint],
            },
        }
        self._ensure(
            f"{_MONITORING_API}/namespaces/{namespace}/servicemonitors",
            body,
            self.servicemonitors.get(f"{namespace}/{DCGM_EXPORTER}"),
        )

    def _daemonset_ready(self, namespace: str, name: str, need_pods: bool) -> bool:
        ds = self.daemonsets.get(f"{namespace}/{name}")
        if not ds or _deleting(ds):
            return False
        st = ds.get("status") or {}
        desired = int(st.get("desiredNumberScheduled") or 0)
        if int(st.get("observedGeneration") or 0) < int(ds["metadata"].get("generation") or 0):
            return False
        if need_pods and desired == 0:
            return False
        return (
            int(st.get("numberReady") or 0) == desired
            and int(st.get("updatedNumberScheduled") or 0) == desired
            and int(st.get("numberUnavailable") or 0) == 0
        )

    def _apply_node(self, node: dict, labels: dict[str, str], capacity: int | None) -> None:
        name = node["metadata"]["name"]
        current = _labels(node)
        state = _node_state(node)
        new_state = {
            "labels": sorted(set(state.get("labels", [])) | set(labels)),
            "capacity": state.get("capacity"),
            "previous": state.get("previous"),
        }
        status = node.get("status") or {}
        have_cap = (status.get("capacity") or {}).get(GPU_RESOURCE)
        have_alloc = (status.get("allocatable") or {}).get(GPU_RESOURCE)
        want_cap = None if capacity is None else str(capacity)
        if want_cap is not None and new_state["capacity"] is None:
            new_state["previous"] = have_cap  # restored on undo (None: the resource goes away)
        if want_cap is not None:
            new_state["capacity"] = want_cap
        label_patch = {k: v for k, v in labels.items() if current.get(k) != v}
        if label_patch or new_state != state:
            patch = {"metadata": {"labels": label_patch, "annotations": {STATE_ANNOTATION: json.dumps(new_state)}}}
            if self._once("node-meta", node, patch):
                self.kube.merge_patch(f"/api/v1/nodes/{name}", patch)
                if label_patch:
                    log.info("node %s: labels %s", name, _fmt_labels(label_patch))
        if want_cap is not None and (have_cap != want_cap or have_alloc != want_cap):
            body = {"status": {"capacity": {GPU_RESOURCE: want_cap}, "allocatable": {GPU_RESOURCE: want_cap}}}
            if self._once("node-status", node, body):
                self.kube.merge_patch(f"/api/v1/nodes/{name}/status", body)
                log.info("node %s: capacity/allocatable %s=%s (was %s)", name, GPU_RESOURCE, want_cap, have_cap)

    def _undo_node(self, node: dict) -> None:
        name = node["metadata"]["name"]
        state = _node_state(node)
        if state.get("capacity") is not None:
            status = node.get("status") or {}
            prev = state.get("previous")
            have = (
                (status.get("capacity") or {}).get(GPU_RESOURCE),
                (status.get("allocatable") or {}).get(GPU_RESOURCE),
            )
            if have != (prev, prev):
                body = {"status": {"capacity": {GPU_RESOURCE: prev}, "allocatable": {GPU_RESOURCE: prev}}}
                if self._once("node-status", node, body):
                    self.kube.merge_patch(f"/api/v1/nodes/{name}/status", body)
                    log.info("node %s: GPU operator gone, %s capacity back to %s", name, GPU_RESOURCE, prev)
        current = _labels(node)
        remove = {k: None for k in state.get("labels", []) if k in current}
        patch = {"metadata": {"labels": remove, "annotations": {STATE_ANNOTATION: None}}}
        if self._once("node-meta", node, patch):
            self.kube.merge_patch(f"/api/v1/nodes/{name}", patch)
            log.info("node %s: GPU operator gone, removed %d labels", name, len(remove))

    def _tell_dcgm_sim(self, version: str) -> None:
        """The DCGM simulator serves what the exporter at `version` would (its node label spelling); told again on
        the next pass when it cannot be reached."""
        if not self.dcgm_url or version == self._exporter_told:
            return
        try:
            post_faults(self.dcgm_url, {"action": "exporter", "version": version})
        except OSError as exc:
            log.warning("DCGM simulator at %s not told exporter %s: %s", self.dcgm_url, version, exc)
            return
        self._exporter_told = version
        log.info("DCGM simulator: dcgm-exporter %s", version or "(the chart's default)")

    def _set_policy_status(self, policy: dict, namespace: str, not_ready: list[str], has_gpu_nodes: bool) -> None:
        if not_ready:
            state = "notReady"
            message = f"ClusterPolicy is not ready, states not ready: [{' '.join(not_ready)}]"
            conds = [("Ready", "False", "OperandNotReady", message), ("Error", "True", "OperandNotReady", message)]
        elif not has_gpu_nodes:
            state = "ready"
            message = "No GPU node found, watching for new nodes to join the cluster."
            conds = [("Ready", "True", "NoGPUNodes", message), ("Error", "False", "Ready", "")]
        else:
            state = "ready"
            message = "ClusterPolicy is ready as all resources have been successfully reconciled"
            conds = [("Ready", "True", "Reconciled", message), ("Error", "False", "Ready", "")]
        current = policy.get("status") or {}
        old = {c.get("type"): c for c in current.get("conditions") or []}
        conditions = []
        for ctype, cstatus, reason, msg in conds:
            prev = old.get(ctype) or {}
            since = prev.get("lastTransitionTime") if prev.get("status") == cstatus else None
            conditions.append(
                {
                    "type": ctype,
                    "status": cstatus,
                    "reason": reason,
                    "message": msg,
                    "lastTransitionTime": since or _now(),
                    "observedGeneration": int(policy["metadata"].get("generation") or 0),
                }
            )

        def essence(st: dict) -> Any:
            return (
                st.get("state"),
                st.get("namespace"),
                sorted(
                    (c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
                    for c in st.get("conditions") or []
                ),
            )

        body = {"status": {"state": state, "namespace": namespace, "conditions": conditions}}
        if essence(current) == essence(body["status"]):
            return
        if self._once("policy-status", policy, body["status"]["state"] + message):
            self.kube.merge_patch(f"/apis/nvidia.com/v1/clusterpolicies/{CLUSTER_POLICY}/status", body)
            log.info("ClusterPolicy %s: state %s -> %s (%s)", CLUSTER_POLICY, current.get("state"), state, message)

    # ---------------------------------------------------------------- (b) pod logs

    def reconcile_logs(self) -> None:
        if not self.crds.established("logs.kwok.x-k8s.io"):
            return
        pods = {object_key(p): p for p in self.pods.items()}
        to_create = []
        for key, pod in pods.items():
            if _deleting(pod) or not (pod.get("spec") or {}).get("nodeName"):
                continue
            want = self._logs_spec(pod)
            existing = self.logs.get(key)
            if existing is None:
                if f"{key}@{pod['metadata']['uid']}" not in self._foreign_logs:
                    to_create.append((pod, want))
            elif not _owned_by(existing, pod):  # left over from an earlier pod of the same name
                self._delete_logs(existing, "pod replaced")
            elif _logs_essence(existing.get("spec")) != _logs_essence(want):
                if self._once("logs", existing, want):
                    ns, name = key.split("/", 1)
                    self.kube.merge_patch(f"{_LOGS_API}/namespaces/{ns}/logs/{name}", {"spec": want})
                    log.info("logs %s: updated", key)
        # A burst of pods (a smoke run on every GPU node) gets its Logs objects side by side, not one by one.
        if to_create:
            with ThreadPoolExecutor(max_workers=16) as pool:
                list(pool.map(lambda args: self._create_logs(*args), to_create))
        for logs in self.logs.items():
            if object_key(logs) not in pods:
                self._delete_logs(logs, "pod gone")

    def _logs_spec(self, pod: dict) -> dict:
        groups: dict[Path, list[str]] = {}
        spec = pod.get("spec") or {}
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            groups.setdefault(self._log_file(c.get("image") or ""), []).append(c["name"])
        return {
            "logs": [{"containers": names, "logsFile": str(path), "follow": False} for path, names in groups.items()]
        }

    def _log_file(self, image: str) -> Path:
        vectoradd = bool(_VECTORADD_IMAGE.search(image))
        digest = hashlib.sha1(image.encode()).hexdigest()[:12]
        path = self.logs_dir / f"{'vectoradd' if vectoradd else 'generic'}-{digest}.log"
        if path in self._log_files and path.exists():
            return path
        if vectoradd:
            lines = VECTORADD_LOG
        else:
            lines = [f"lab: container started (image {image or '<none>'})", "lab: simulated by kwok, no process runs"]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(_cri_lines(lines, dt.datetime.now(dt.UTC)))
        tmp.replace(path)
        self._log_files.add(path)
        return path

    def _create_logs(self, pod: dict, spec: dict) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "Logs",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"], "controller": False}
                ],
            },
            "spec": spec,
        }
        if not self._once("logs-create", pod, spec):
            return
        try:
            self.kube.create(f"{_LOGS_API}/namespaces/{meta['namespace']}/logs", body)
            log.info(
                "logs %s/%s: %s",
                meta["namespace"],
                meta["name"],
                ", ".join(Path(g["logsFile"]).name for g in spec["logs"]),
            )
        except ApiError as exc:
            if exc.status != 409:
                self._forget("logs-create", pod)
                raise
            other = self.kube.get(f"{_LOGS_API}/namespaces/{meta['namespace']}/logs/{meta['name']}")
            if _labels(other).get("app.kubernetes.io/managed-by") != MANAGED_BY:
                # Someone else's Logs object: leave it alone.
                self._foreign_logs.add(f"{meta['namespace']}/{meta['name']}@{meta['uid']}")
                log.info("logs %s/%s: exists and is not ours; left alone", meta["namespace"], meta["name"])

    def _delete_logs(self, logs: dict, why: str) -> None:
        if _deleting(logs) or not self._once("logs-delete", logs, why):
            return
        ns, name = object_key(logs).split("/", 1)
        try:
            self.kube.delete(f"{_LOGS_API}/namespaces/{ns}/logs/{name}")
            log.info("logs %s/%s: deleted (%s)", ns, name, why)
        except ApiError as exc:
            if exc.status != 404:
                raise

    # ---------------------------------------------------------------- (c) NodeSets

    def reconcile_slurm_controllers(self) -> None:
        """Slinky's Controller controller: StatefulSet and headless Service `<name>-controller` (pod
        `<name>-controller-0`, container `slurmctld`), with the state volume as a claim template from
        `spec.persistence` (on by default, as in the operator) or an emptyDir. The lab's real slurmctld runs
        on a lab host; `kubectl exec` into this pod reaches it (see lab.controlplane exec rules)."""
        for controller in self.controllers.items():
            spec, meta = controller.get("spec") or {}, controller["metadata"]
            if _deleting(controller) or spec.get("external"):
                continue
            name, ns = f"{meta['name']}-controller", meta["namespace"]
            owner = _owner(controller, "slinky.slurm.net/v1beta1", "Controller")
            selector = {"app.kubernetes.io/name": "slurmctld", "app.kubernetes.io/instance": meta["name"]}
            labels = {**selector, "app.kubernetes.io/managed-by": MANAGED_BY}
            slurmctld = {k: v for k, v in (spec.get("slurmctld") or {}).items() if k in ("image", "resources", "env")}
            slurmctld.setdefault("image", "ghcr.io/slinkyproject/slurmctld")
            pod_spec: dict[str, Any] = {
                "containers": [
                    {**slurmctld, "name": "slurmctld", "ports": [{"name": "slurmctld", "containerPort": 6817}]}
                ],
                "automountServiceAccountToken": False,
            }
            persistence = spec.get("persistence") or {}
            claim_templates = []
            if persistence.get("enabled", True) and persistence.get("existingClaim"):
                existing = {"claimName": persistence["existingClaim"]}
                pod_spec["volumes"] = [{"name": "statesave", "persistentVolumeClaim": existing}]
            elif persistence.get("enabled", True):
                claim = {k: v for k, v in persistence.items() if k not in ("enabled", "existingClaim")}
                claim_templates = [{"metadata": {"name": "statesave"}, "spec": claim}]
            else:
                pod_spec["volumes"] = [{"name": "statesave", "emptyDir": {}}]
            statefulset = {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": {"name": name, "namespace": ns, "labels": labels, "ownerReferences": [owner]},
                "spec": {
                    "replicas": 1,
                    "podManagementPolicy": "Parallel",
                    "serviceName": name,
                    "selector": {"matchLabels": selector},
                    "template": {"metadata": {"labels": labels}, "spec": pod_spec},
                    "volumeClaimTemplates": claim_templates,
                },
            }
            self._ensure(
                f"/apis/apps/v1/namespaces/{ns}/statefulsets", statefulset, self.statefulsets.get(f"{ns}/{name}")
            )
            service = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": ns, "labels": labels, "ownerReferences": [owner]},
                "spec": {"clusterIP": "None", "selector": selector,
                         "ports": [{"name": "slurmctld", "port": 6817, "targetPort": 6817}]},
            }  # fmt: skip
            self._ensure(f"/api/v1/namespaces/{ns}/services", service, self.services.get(f"{ns}/{name}"))

    def reconcile_local_volumes(self) -> None:
        """Kubespray's local-path provisioner: a claim of a StorageClass it serves gets a hostPath volume on
        the node the scheduler chose (WaitForFirstConsumer) or, for Immediate binding, on no particular node;
        the PV controller binds the two."""
        classes = {
            sc["metadata"]["name"]: sc
            for sc in self.storageclasses.items()
            if sc.get("provisioner") == LOCAL_PATH_PROVISIONER
        }
        for claim in self.claims.items():
            spec, meta = claim.get("spec") or {}, claim["metadata"]
            sc = classes.get(spec.get("storageClassName") or "")
            if (
                sc is None
                or _deleting(claim)
                or spec.get("volumeName")
                or (claim.get("status") or {}).get("phase") == "Bound"
            ):
                continue
            node = _annotations(claim).get(SELECTED_NODE_ANNOTATION)
            if sc.get("volumeBindingMode") == "WaitForFirstConsumer" and not node:
                continue  # the scheduler has not picked the node yet
            pv_name = f"pvc-{meta['uid']}"
            volume: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {
                    "name": pv_name,
                    "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
                    "annotations": {"pv.kubernetes.io/provisioned-by": LOCAL_PATH_PROVISIONER},
                },
                "spec": {
                    "capacity": {"storage": (spec.get("resources") or {}).get("requests", {}).get("storage", "1Gi")},
                    "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy") or "Delete",
                    "storageClassName": sc["metadata"]["name"],
                    "volumeMode": spec.get("volumeMode") or "Filesystem",
                    "hostPath": {"path": f"{LOCAL_PATH_DIR}/{pv_name}_{meta['namespace']}_{meta['name']}",
                                 "type": "DirectoryOrCreate"},
                    "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                                 "name": meta["name"], "uid": meta["uid"]},
                },
            }  # fmt: skip
            if node:
                volume["spec"]["nodeAffinity"] = {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}
                                ]
                            }
                        ]
                    }
                }
            if not self._once("pv-create", claim, pv_name):
                continue
            try:
                self.kube.create("/api/v1/persistentvolumes", volume)
                log.info(
                    "claim %s/%s: provisioned %s on %s", meta["namespace"], meta["name"], pv_name, node or "any node"
                )
            except ApiError as exc:
                if exc.status != 409:
                    raise

    def _ensure(self, collection: str, body: dict, present: dict | None) -> None:
        """Create `body` in `collection`, or merge-patch the live object when `body` changed since it was written
        (a hash of it is kept in an annotation). Objects written here carry the reconciler's managed-by label."""
        meta = body["metadata"]
        meta.setdefault("labels", {})["app.kubernetes.io/managed-by"] = MANAGED_BY
        digest = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        meta.setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = digest
        if present is not None and _annotations(present).get(SPEC_HASH_ANNOTATION) == digest and not _deleting(present):
            return
        what = f"{body['kind']} {meta.get('namespace', '')}/{meta['name']}"
        if not self._once("ensure", present or body, digest, key=f"{collection}/{meta['name']}"):
            return
        try:
            if present is None:
                self.kube.create(collection, body)
                log.info("%s: created", what)
            else:
                self.kube.merge_patch(f"{collection}/{meta['name']}", body)
                log.info("%s: updated", what)
        except ApiError as exc:
            if exc.status != 409:  # created meanwhile: the next pass sees it
                raise

    def _delete(self, path: str, why: str) -> None:
        try:
            self.kube.delete(path)
            log.info("%s: deleted (%s)", path, why)
        except ApiError as exc:
            if exc.status != 404:
                raise

    def reconcile_nodesets(self) -> None:
        nodesets = [n for n in self.nodesets.items() if not _deleting(n)]
        if not nodesets:
            return
        pods_by_owner: dict[str, list[dict]] = {}
        for pod in self.pods.items():
            for ref in pod["metadata"].get("ownerReferences") or []:
                if ref.get("kind") == "NodeSet":
                    pods_by_owner.setdefault(ref.get("uid"), []).append(pod)
        with self._slurm_lock:
            slurm = dict(self._slurm_states) if self._slurm_states is not None else None
        for nodeset in nodesets:
            try:
                self._reconcile_nodeset(nodeset, pods_by_owner.get(nodeset["metadata"]["uid"], []), slurm)
            except ApiError as exc:
                if exc.status != 404:  # the NodeSet went away meanwhile
                    raise

    def _reconcile_nodeset(self, nodeset: dict, pods: list[dict], slurm: dict[str, str] | None) -> None:
        meta, spec = nodeset["metadata"], nodeset.get("spec") or {}
        name, ns = meta["name"], meta["namespace"]
        replicas = int(spec.get("replicas") if spec.get("replicas") is not None else 1)
        pad = int(spec.get("ordinalPadding") or 0)
        wanted = {f"{name}-{str(i).zfill(pad)}": i for i in range(replicas)}
        live = {}
        for pod in pods:
            pname = pod["metadata"]["name"]
            phase = (pod.get("status") or {}).get("phase")
            if _deleting(pod):
                continue
            if pname not in wanted:
                self._delete_pod(pod, f"scaled down to {replicas}")
            elif phase in ("Succeeded", "Failed"):
                self._delete_pod(pod, f"phase {phase}; will be recreated")
            else:
                live[pname] = pod
        for pname, ordinal in wanted.items():
            if pname not in live and not any(p["metadata"]["name"] == pname for p in pods):
                self._create_worker(nodeset, pname, ordinal)
        ready = [p for p in live.values() if _pod_ready(p)]
        counts = {"idle": 0, "allocated": 0, "down": 0, "drain": 0}
        if slurm is not None:
            # Like Slinky: count NodeSet pods by the state of their Slurm node (the Kubernetes node they run on,
            # or a Slurm node named like the pod or its hostname).
            for pod in ready:
                pspec = pod.get("spec") or {}
                for cand in (pspec.get("nodeName"), pod["metadata"]["name"], pspec.get("hostname")):
                    if cand and cand in slurm:
                        cls = slurm_node_class(slurm[cand])
                        if cls:
                            counts[cls] += 1
                        break
        selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/name=slurmd"
        status = {
            "desired": replicas,
            "replicas": len(live),
            "updatedReplicas": len(live),
            "readyReplicas": len(ready),
            "availableReplicas": len(ready),
            "unavailableReplicas": max(replicas - len(ready), 0),
            "slurmIdle": counts["idle"],
            "slurmAllocated": counts["allocated"],
            "slurmDown": counts["down"],
            "slurmDrain": counts["drain"],
            "selector": selector,
            "nodeSetHash": hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10],
            "observedGeneration": int(meta.get("generation") or 0),
        }
        current = nodeset.get("status") or {}
        if any(current.get(k) != v for k, v in status.items()):
            if self._once("nodeset-status", nodeset, status):
                self.kube.merge_patch(f"{_NODESET_API}/namespaces/{ns}/nodesets/{name}/status", {"status": status})
                log.info(
                    "nodeset %s/%s: replicas %d ready %d (slurm idle %d allocated %d down %d drain %d)",
                    ns, name, status["replicas"], status["readyReplicas"],
                    counts["idle"], counts["allocated"], counts["down"], counts["drain"],
                )  # fmt: skip

    def _create_worker(self, nodeset: dict, pname: str, ordinal: int) -> None:
        meta, spec = nodeset["metadata"], nodeset.get("spec") or {}
        template = spec.get("template") or {}
        pod_spec = {k: v for k, v in (template.get("spec") or {}).items() if v not in (None, "", [], {})}
        prefix = pod_spec.pop("hostname", None)
        slurmd = {k: v for k, v in (spec.get("slurmd") or {}).items() if v not in (None, "", [], {})}
        slurmd["name"] = "slurmd"
        slurmd.setdefault("image", "ghcr.io/slinkyproject/slurmd:26.05-ubuntu24.04")
        slurmd.setdefault("ports", [{"name": "slurmd", "containerPort": 6818}])
        resources = slurmd.get("resources") or {}
        if "limits" in resources and "requests" not in resources:
            resources["requests"] = dict(resources["limits"])  # extended resources: requests = limits
        pod_spec["containers"] = [slurmd] + list(pod_spec.get("containers") or [])
        pod_spec.setdefault("automountServiceAccountToken", False)
        pod_spec["restartPolicy"] = "Always"
        if prefix:
            hostname = f"{prefix}{ordinal}" if str(prefix).endswith("-") else str(prefix)
            if re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", hostname):
                pod_spec["hostname"] = hostname
        labels = {
            **((template.get("metadata") or {}).get("labels") or {}),
            "app.kubernetes.io/name": "slurmd",
            "app.kubernetes.io/instance": meta["name"],
            "app.kubernetes.io/managed-by": MANAGED_BY,
            "slinky.slurm.net/pod-index": str(ordinal),
        }
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pname,
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": {
                    **((template.get("metadata") or {}).get("annotations") or {}),
                    "kubectl.kubernetes.io/default-container": "slurmd",
                },
                "ownerReferences": [
                    {
                        "apiVersion": "slinky.slurm.net/v1beta1",
                        "kind": "NodeSet",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": pod_spec,
        }
        if not self._once("worker-create", nodeset, body, key=f"{meta['namespace']}/{pname}"):
            return
        try:
            self.kube.create(f"/api/v1/namespaces/{meta['namespace']}/pods", body)
            log.info("nodeset %s/%s: created pod %s", meta["namespace"], meta["name"], pname)
        except ApiError as exc:
            if exc.status != 409:
                raise

    def _delete_pod(self, pod: dict, why: str) -> None:
        if not self._once("pod-delete", pod, why):
            return
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        try:
            self.kube.delete(f"/api/v1/namespaces/{ns}/pods/{name}")
            log.info("pod %s/%s: deleted (%s)", ns, name, why)
        except ApiError as exc:
            if exc.status != 404:
                raise


def _node_state(node: dict) -> dict:
    raw = _annotations(node).get(STATE_ANNOTATION)
    if not raw:
        return {}
    try:
        state = json.loads(raw)
        return state if isinstance(state, dict) else {}
    except ValueError:
        return {}


def _logs_essence(spec: dict | None) -> list:
    return [(sorted(g.get("containers") or []), g.get("logsFile")) for g in (spec or {}).get("logs") or []]


def _owner(obj: dict, api_version: str, kind: str) -> dict:
    """A controller ownerReference to `obj`."""
    meta = obj["metadata"]
    return {"apiVersion": api_version, "kind": kind, "name": meta["name"], "uid": meta["uid"], "controller": True}


def _owned_by(obj: dict, owner: dict) -> bool:
    uid = owner["metadata"].get("uid")
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def _fmt_labels(labels: dict[str, str | None]) -> str:
    items = sorted(labels.items())
    shown = ", ".join(f"{k}={v}" for k, v in items[:4])
    return shown + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")


# ------------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.reconciler", description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", required=True, type=Path)
    p.add_argument("--inventory", required=True, type=Path, help="JSON: node name -> {gpus, model}")
    p.add_argument("--slurm-env", type=Path, help="env for sinfo: JSON object or KEY=VALUE lines")
    p.add_argument("--logs-dir", type=Path, help="where pod log files go (default: <inventory dir>/pod-logs)")
    p.add_argument("--resync", type=float, default=30.0, help="seconds between full passes without events")
    p.add_argument("--slurm-poll", type=float, default=2.0, help="seconds between sinfo calls")
    p.add_argument("--dcgm-url", help="the DCGM simulator, told the exporter version the ClusterPolicy deploys")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, a.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    slurm_env = load_env_file(a.slurm_env) if a.slurm_env else None
    logs_dir = (a.logs_dir or a.inventory.resolve().parent / "pod-logs").resolve()
    rec = Reconciler(Kube(a.kubeconfig), a.inventory.resolve(), logs_dir, slurm_env,
                     resync=a.resync, slurm_poll=a.slurm_poll, dcgm_url=a.dcgm_url)  # fmt: skip

    def on_signal(signum, _frame) -> None:
        log.info("signal %d: stopping", signum)
        rec.stop.set()
        rec.dirty.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rec.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
