"""drift at fleet scale: 1,000 and 5,000 kwok GPU nodes (plus a control-plane node) on the lab's local control
plane.

    .venv/bin/python bench/drift_bench.py [--sizes 1000,5000] [--runs 3]

Starts lab.controlplane.ControlPlane in a temporary folder, registers the config's nodes with the labels and
taints gpuforge renders (lab.nodes.register_nodes), relabels three of them behind gpuforge's back, and runs the
drift evaluation (flows.drift.evaluate: the flow's reading and comparison, without Prefect) at each size
(goal: <= 3 s at 5,000). Prints the wall time and the calls per kind at each size: the number of calls does
not grow with the nodes. The config enables only the GPU Operator service, so the reads are one node list, one
Helm release list and one ClusterPolicy get (no releases are installed: those show as drift too). Prints; asserts
no wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.drift import evaluate  # noqa: E402
from gpuforge import pins, render  # noqa: E402
from gpuforge.config import parse_config  # noqa: E402
from lab.controlplane import ControlPlane  # noqa: E402
from lab.lab import BIN_DIR  # noqa: E402
from lab.nodes import node_manifest, register_nodes  # noqa: E402


def make_config(kubeconfig: Path, count: int):
    lines = [
        "cluster_name: drift-bench",
        f"kubeconfig: {kubeconfig}",
        "deepops_services:",
        "  gpu-operator: { enabled: true }",
        "k8s_cluster_nodes:",
        '  - { ip: "10.10.0.1", name: cp-1, role: [control-plane, etcd] }',
    ]
    for i in range(count):
        lines.append(
            f'  - {{ ip: "10.{11 + i // 250}.{i % 250}.1", name: gpu-{i:04d}, role: [gpu-worker, schedulable], '
            "gpu_count: 8 }"
        )
    return parse_config("\n".join(lines) + "\n")


def manifest(config, node) -> dict:
    taints = []
    for t in render.node_taints(node):
        head, _, effect = t.rpartition(":")
        key, _, value = head.partition("=")
        taints.append({"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect})
    return node_manifest(
        node.name,
        labels=render.node_labels(node, config.cluster_name),
        taints=taints,
        kubelet_version=pins.KUBE_VERSION,
        gpus=node.spec.gpu_count or 0,
    )


def measure(config, runs: int) -> tuple[list[float], dict]:
    times, report = [], {}
    for _ in range(runs):
        start = time.monotonic()
        report = evaluate(config)
        times.append(time.monotonic() - start)
    return times, report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,5000", help="GPU node counts, smallest first")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
        cp = ControlPlane(Path(tmp), BIN_DIR, k8s_version=pins.KUBE_VERSION)
        try:
            t0 = time.monotonic()
            cp.up()
            print(f"control plane up in {time.monotonic() - t0:.1f} s", flush=True)
            sizes = [int(n) for n in args.sizes.split(",")]
            config = make_config(cp.kubeconfig, max(sizes))
            nodes = config.nodes
            rows = []
            for size in sizes:
                t0 = time.monotonic()
                register_nodes(cp.kubeconfig, [manifest(config, n) for n in nodes[: size + 1]])
                print(f"{size + 1} nodes registered in {time.monotonic() - t0:.1f} s", flush=True)
                sub = make_config(cp.kubeconfig, size)
                if size == sizes[-1]:
                    from kubernetes import client

                    from tasks.kube import api_client

                    with api_client(cp.kubeconfig) as api:
                        for name in ("gpu-0001", "gpu-0002", "gpu-0003"):
                            client.CoreV1Api(api).patch_node(
                                name, {"metadata": {"labels": {"gpuforge.io/nodeset": "moved"}}}
                            )
                times, report = measure(sub, args.runs)
                rows.append((size, times, report))
                paths = [i["path"] for i in report["items"]]
                print(
                    f"drift over {size} GPU nodes + 1 control plane: median {statistics.median(times):.2f} s "
                    f"({', '.join(f'{t:.2f}' for t in times)}); calls {report['api_calls']}; "
                    f"{len(paths)} items: {paths}; errors {report['errors']}",
                    flush=True,
                )
            (s_size, s_times, s_rep), (l_size, l_times, l_rep) = rows[0], rows[-1]
            constant = {k: v for k, v in s_rep["api_calls"].items()} == {k: v for k, v in l_rep["api_calls"].items()}
            print(
                f"calls at {s_size} nodes == calls at {l_size} nodes: {constant}; "
                f"time ratio {statistics.median(l_times) / statistics.median(s_times):.1f}x for "
                f"{l_size / s_size:.0f}x the nodes (goal: <= 3 s at {l_size})"
            )
        finally:
            cp.down(purge=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
