"""Simulated Kubernetes nodes of the lab: Node objects that kwok keeps alive.

A lab node is a plain `v1/Node` registered through the API server with the annotation
`kwok.x-k8s.io/node: fake`; the lab's kwok controller (see `lab.controlplane`) manages exactly those nodes:
it sets them Ready, fills `status.nodeInfo`, heartbeats them and "runs" the pods bound to them.

Rules that keep kwok's node-initialize stage working (see lab-control-plane.md, "Two pitfalls"):
- no `status.conditions` in the manifest (kwok initialises only nodes that are not Ready yet);
- no `status.addresses` (kwok writes its own address as InternalIP so `kubectl logs/exec` reach it).
No kwok taint either: real workloads (DaemonSets, Helm charts) must schedule without tolerations.

The kubelet version a node reports (`status.nodeInfo.kubeletVersion`) comes from the annotation
`lab.gpuforge.io/kubelet-version` set here; kwok copies it into the status on initialisation and again
whenever the annotation changes (a stand-in upgrade re-registers the node with the new version).

CLI (used by the lab's Kubespray playbook, lab/kubespray/lab-cluster.yml, via `delegate_to: localhost`):
    python -m lab.nodes register --kubeconfig K --name N [--label k=v ...] [--taint k=v:Effect ...]
                                 [--gpus 8] [--kubelet-version 1.35.4] [--cpu 32] [--memory 256Gi] [--wait 60]
    python -m lab.nodes set-gpus --kubeconfig K --name N --count 4     (--gpus 4 works too)
    python -m lab.nodes delete   --kubeconfig K --name N
    python -m lab.nodes local-path-storage-class --kubeconfig K --name local-path
Each prints one JSON line, e.g. {"name": "gpu01", "changed": true, "action": "created"}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KUBELET_VERSION_ANNOTATION = "lab.gpuforge.io/kubelet-version"
GPU_RESOURCE = "nvidia.com/gpu"
# Taints with these key prefixes are owned by Kubernetes controllers (not-ready, unreachable, cordon, ...);
# re-registering a node keeps them.
_SYSTEM_TAINT_PREFIXES = ("node.kubernetes.io/", "node.cloudprovider.kubernetes.io/")


def normalize_version(version: str) -> str:
    """'1.35.4' and 'v1.35.4' -> 'v1.35.4' (the form kubelets report)."""
    version = version.strip()
    if not version:
        raise ValueError("empty kubelet version")
    return version if version.startswith("v") else f"v{version}"


def node_manifest(
    name: str,
    *,
    labels: dict[str, str],
    taints: list[dict],
    kubelet_version: str,
    cpu: str = "32",
    memory: str = "256Gi",
    gpus: int = 0,
    pods: str = "110",
) -> dict:
    """A kwok-managed Node; `gpus > 0` adds `nvidia.com/gpu` to capacity and allocatable."""
    if gpus < 0:
        raise ValueError(f"gpus must be >= 0, got {gpus}")
    all_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        **{str(k): str(v) for k, v in labels.items()},
    }
    resources = {"cpu": str(cpu), "memory": str(memory), "pods": str(pods), "ephemeral-storage": "500Gi"}
    if gpus > 0:
        resources[GPU_RESOURCE] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": all_labels,
            "annotations": {
                FAKE_NODE_ANNOTATION: "fake",
                "node.alpha.kubernetes.io/ttl": "0",
                KUBELET_VERSION_ANNOTATION: normalize_version(kubelet_version),
            },
        },
        "spec": {"taints": [dict(t) for t in taints]},
        # Kept by the API server on create. No conditions, no addresses: kwok fills them.
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


def _core(kubeconfig: Path | str):
    from kubernetes import client, config

    return client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))


def _status_code(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


def _resource_patch(old: dict | None, new: dict) -> dict:
    """Merge-patch body turning resource map `old` into `new` (null removes a key)."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if (old or {}).get(k) != v}
    for k in old or {}:
        if k not in new:
            patch[k] = None
    return patch


def _register_one(core, manifest: dict) -> str:
    from kubernetes.client.exceptions import ApiException

    name = manifest["metadata"]["name"]
    try:
        core.create_node(body=manifest)
        return "created"
    except ApiException as exc:
        if exc.status != 409:
            raise
    for _attempt in range(5):
        existing = core.api_client.sanitize_for_serialization(core.read_node(name))
        meta, spec = existing["metadata"], existing.get("spec") or {}
        want_meta = manifest["metadata"]
        labels = {**(meta.get("labels") or {}), **(want_meta.get("labels") or {})}
        annotations = {**(meta.get("annotations") or {}), **(want_meta.get("annotations") or {})}
        system_taints = [
            t for t in spec.get("taints") or [] if str(t.get("key", "")).startswith(_SYSTEM_TAINT_PREFIXES)
        ]
        wanted_taints = list((manifest.get("spec") or {}).get("taints") or [])
        wanted_keys = {(t.get("key"), t.get("effect")) for t in wanted_taints}
        taints = wanted_taints + [t for t in system_taints if (t.get("key"), t.get("effect")) not in wanted_keys]
        metadata_changed = (
            labels != (meta.get("labels") or {})
            or annotations != (meta.get("annotations") or {})
            or _taint_set(taints) != _taint_set(spec.get("taints") or [])
        )
        if metadata_changed:
            body = copy.deepcopy(existing)
            body["metadata"]["labels"] = labels
            body["metadata"]["annotations"] = annotations
            body.setdefault("spec", {})["taints"] = taints or None
            body.pop("status", None)
            try:
                core.replace_node(name, body)
            except ApiException as exc:
                if exc.status == 409:  # changed under us (kwok heartbeat); read again
                    continue
                raise
        status = existing.get("status") or {}
        want_status = manifest.get("status") or {}
        status_patch = {}
        for field in ("capacity", "allocatable"):
            if field in want_status:
                diff = _resource_patch(status.get(field), want_status[field])
                if diff:
                    status_patch[field] = diff
        if status_patch:
            core.patch_node_status(name, {"status": status_patch}, _content_type="application/merge-patch+json")
        return "updated" if (metadata_changed or status_patch) else "unchanged"
    raise RuntimeError(f"node {name}: kept conflicting with concurrent updates")


def _taint_set(taints: Iterable[dict]) -> set[tuple]:
    return {(t.get("key"), t.get("value"), t.get("effect")) for t in taints}


def register_nodes(kubeconfig: Path | str, manifests: Sequence[dict]) -> dict[str, str]:
    """Create each node, or bring an existing one in line with its manifest (idempotent).

    An existing node gets the manifest's labels and annotations on top of its own (labels set by others,
    e.g. `beta.kubernetes.io/*` by the controller manager or feature-discovery labels, stay), exactly the
    manifest's taints plus the ones Kubernetes owns (`node.kubernetes.io/*`), and the manifest's
    capacity/allocatable through the status subresource. A cordon (`spec.unschedulable`) is kept.
    Returns {node name: "created" | "updated" | "unchanged"}.
    """
    core = _core(kubeconfig)
    return {m["metadata"]["name"]: _register_one(core, m) for m in manifests}


def set_allocatable_gpus(kubeconfig: Path | str, node: str, count: int) -> None:
    """Patch `nvidia.com/gpu` in the node's capacity and allocatable (status subresource)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    value = str(count)
    body = {"status": {"capacity": {GPU_RESOURCE: value}, "allocatable": {GPU_RESOURCE: value}}}
    _core(kubeconfig).patch_node_status(node, body, _content_type="application/merge-patch+json")


def set_kubelet_version(kubeconfig: Path | str, name: str, version: str) -> bool:
    """Annotate the node with the version its kubelet reports (kwok's node-kubelet-version stage moves
    nodeInfo.kubeletVersion after it); False when it already said so."""
    core = _core(kubeconfig)
    want = normalize_version(version)
    if (core.read_node(name).metadata.annotations or {}).get(KUBELET_VERSION_ANNOTATION) == want:
        return False
    core.patch_node(name, {"metadata": {"annotations": {KUBELET_VERSION_ANNOTATION: want}}})
    return True


def delete_node(kubeconfig: Path | str, name: str) -> bool:
    """Delete the node; False when it did not exist."""
    from kubernetes.client.exceptions import ApiException

    try:
        _core(kubeconfig).delete_node(name)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def ensure_local_path_storage_class(kubeconfig: Path | str, name: str) -> bool:
    """What Kubespray's local-path-provisioner addon leaves in the cluster: its StorageClass (provisioner
    rancher.io/local-path, volumes bound on the node of the first consumer). The lab reconciler plays the
    provisioner. True when it was created now."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    body = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": "rancher.io/local-path",
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
    }
    try:
        client.StorageV1Api(_core(kubeconfig).api_client).create_storage_class(body)
        return True
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise


def node_ready(node: dict) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def wait_nodes_ready(kubeconfig: Path | str, names: Iterable[str], timeout: float = 60.0) -> None:
    """Wait until every named node is Ready (kwok initialised it); raises TimeoutError otherwise."""
    from kubernetes.client.exceptions import ApiException

    core = _core(kubeconfig)
    pending = set(names)
    deadline = time.monotonic() + timeout
    while pending:
        for name in sorted(pending):
            try:
                node = core.api_client.sanitize_for_serialization(core.read_node(name))
            except ApiException as exc:
                if exc.status != 404:
                    raise
                continue
            if node_ready(node):
                pending.discard(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nodes not Ready after {timeout:.0f}s: {sorted(pending)} (is kwok running?)")
        time.sleep(0.2)


# ---------------------------------------------------------------- CLI


def _parse_labels(items: Sequence[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--label wants key=value, got {item!r}")
        labels[key] = value
    return labels


def _parse_taints(items: Sequence[str]) -> list[dict]:
    """`key=value:Effect` or `key:Effect`."""
    taints = []
    for item in items:
        left, sep, effect = item.rpartition(":")
        if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise SystemExit(f"--taint wants key[=value]:NoSchedule|PreferNoSchedule|NoExecute, got {item!r}")
        key, _, value = left.partition("=")
        taint = {"key": key, "effect": effect}
        if value:
            taint["value"] = value
        taints.append(taint)
    return taints


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.nodes", description="simulated (kwok) lab nodes")
    sub = parser.add_subparsers(dest="cmd", required=True)
    reg = sub.add_parser("register", help="create or update a simulated node")
    reg.add_argument("--kubeconfig", required=True)
    reg.add_argument("--name", required=True)
    reg.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    reg.add_argument("--taint", action="append", default=[], metavar="KEY[=VALUE]:EFFECT")
    reg.add_argument("--gpus", type=int, default=0)
    reg.add_argument("--kubelet-version", required=True)
    reg.add_argument("--cpu", default="32")
    reg.add_argument("--memory", default="256Gi")
    reg.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait until Ready")
    gpus = sub.add_parser("set-gpus", help="set nvidia.com/gpu capacity and allocatable")
    gpus.add_argument("--kubeconfig", required=True)
    gpus.add_argument("--name", required=True)
    gpus.add_argument("--count", "--gpus", dest="count", type=int, required=True)
    dele = sub.add_parser("delete", help="delete a node")
    dele.add_argument("--kubeconfig", required=True)
    dele.add_argument("--name", required=True)
    version = sub.add_parser("set-kubelet-version", help="the version the node's simulated kubelet reports")
    version.add_argument("--kubeconfig", required=True)
    version.add_argument("--name", required=True)
    version.add_argument("--kubelet-version", required=True)
    storage = sub.add_parser("local-path-storage-class", help="the StorageClass of Kubespray's local-path addon")
    storage.add_argument("--kubeconfig", required=True)
    storage.add_argument("--name", required=True)
    args = parser.parse_args(argv)

    if args.cmd == "register":
        manifest = node_manifest(
            args.name,
            labels=_parse_labels(args.label),
            taints=_parse_taints(args.taint),
            kubelet_version=args.kubelet_version,
            cpu=args.cpu,
            memory=args.memory,
            gpus=args.gpus,
        )
        action = register_nodes(args.kubeconfig, [manifest])[args.name]
        if args.wait > 0:
            wait_nodes_ready(args.kubeconfig, [args.name], timeout=args.wait)
        result = {"name": args.name, "changed": action != "unchanged", "action": action}
    elif args.cmd == "set-gpus":
        core = _core(args.kubeconfig)
        node = core.api_client.sanitize_for_serialization(core.read_node(args.name))
        before = ((node.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE)
        capacity = ((node.get("status") or {}).get("capacity") or {}).get(GPU_RESOURCE)
        changed = before != str(args.count) or capacity != str(args.count)
        if changed:
            set_allocatable_gpus(args.kubeconfig, args.name, args.count)
        result = {"name": args.name, "changed": changed, "gpus": args.count}
    elif args.cmd == "set-kubelet-version":
        changed = set_kubelet_version(args.kubeconfig, args.name, args.kubelet_version)
        result = {"name": args.name, "changed": changed, "kubelet_version": normalize_version(args.kubelet_version)}
    elif args.cmd == "local-path-storage-class":
        created = ensure_local_path_storage_class(args.kubeconfig, args.name)
        result = {"name": args.name, "changed": created, "action": "created" if created else "unchanged"}
    else:
        existed = delete_node(args.kubeconfig, args.name)
        result = {"name": args.name, "changed": existed, "action": "deleted" if existed else "absent"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
