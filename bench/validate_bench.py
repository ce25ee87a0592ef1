"""Validation at scale, measured side by side in one run (prints ratios; asserts nothing about time).

1. CUDA smoke: all pods started at once and watched, on 64 kwok GPU nodes vs on 1 node (goal: ratio <= 1.5).
2. DCGM coverage on 1,024 nodes x 8 GPUs served by the lab's simulator and scraped by a real Prometheus:
   the number of PromQL queries (constant) and the wall time of the check.

Run: .venv/bin/python bench/validate_bench.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpuforge import validation  # noqa: E402
from gpuforge.config import parse_config  # noqa: E402
from lab import nodes, procs  # noqa: E402
from lab.controlplane import ControlPlane  # noqa: E402
from lab.dcgm_sim import DcgmSim  # noqa: E402
from lab.prometheus import PrometheusLab  # noqa: E402
from tasks import kube  # noqa: E402

BIN = Path("~/.cache/gpuforge/bin").expanduser()
IMAGE = "nvcr.io/nvidia/k8s/cuda-sample:vectoradd-cuda12.5.0-ubuntu22.04"


def smoke_round(kubeconfig: Path, names: list[str], round_no: int) -> float:
    namespace = f"bench-{len(names)}-{round_no}"
    kube.ensure_namespace(kubeconfig, namespace)
    pods = [kube.smoke_pod(f"cuda-smoke-{n}", n, IMAGE) for n in names]
    started = time.perf_counter()
    final = kube.run_pods_to_completion(kubeconfig, namespace, pods, timeout_s=300)
    terminal = time.perf_counter() - started
    logs = kube.pod_logs(kubeconfig, namespace, [f"cuda-smoke-{n}" for n in names])
    logs_ok = sum("Test PASSED" in log for log in logs.values())
    elapsed = time.perf_counter() - started
    print(f"  {len(names):>2} nodes: all pods terminal after {terminal:.2f}s, logs read after {elapsed:.2f}s")
    ok = sum(p.status.phase == "Succeeded" for p in final.values())
    kube.delete_namespace(kubeconfig, namespace)
    if ok != len(names) or logs_ok != len(names):
        from collections import Counter

        phases = Counter(p.status.phase for p in final.values())
        raise AssertionError(f"{ok} Succeeded, {logs_ok} logs with Test PASSED of {len(names)}; phases {dict(phases)}")
    return elapsed


def bench_smoke(work: Path) -> None:
    cp = ControlPlane(work, BIN)
    cp.up()
    try:
        names = [f"bench-gpu-{i}" for i in range(64)]
        nodes.register_nodes(
            cp.kubeconfig,
            [nodes.node_manifest(n, labels={}, taints=[], kubelet_version="1.35.4", gpus=8) for n in names],
        )
        nodes.wait_nodes_ready(cp.kubeconfig, names, timeout=120)
        inventory = work / "inv.json"
        inventory.write_text(json.dumps({n: {"gpus": 8, "model": "NVIDIA H100 80GB HBM3"} for n in names}))
        procs.start_daemon(
            work,
            "reconciler",
            [sys.executable, "-m", "lab.reconciler", "--kubeconfig", str(cp.kubeconfig), "--inventory", str(inventory)],
        )
        time.sleep(2)
        one, many = [], []
        for r in range(3):  # interleaved, so both sizes see the same machine load
            one.append(smoke_round(cp.kubeconfig, names[:1], r))
            many.append(smoke_round(cp.kubeconfig, names, r))
        t1, t64 = statistics.median(one), statistics.median(many)
        print(f"cuda smoke: 1 node {t1:.2f}s, 64 nodes {t64:.2f}s (medians of 3) -> ratio {t64 / t1:.2f} (goal <= 1.5)")
    finally:
        procs.stop_daemon(work, "reconciler")
        cp.down(purge=True)


def bench_dcgm(work: Path) -> None:
    node_count, gpus = 1024, 8
    sim, prom = DcgmSim(work / "dcgm"), PrometheusLab(work / "prom")
    sim.up({f"n{i:04d}": (gpus, "NVIDIA H100 80GB HBM3") for i in range(node_count)})
    try:
        prom.up(targets=sim.targets(), scrape_interval="10s")
        config = parse_config(
            'k8s_cluster_nodes:\n  - {ip: "10.1.0.1", role: [control-plane, etcd]}\n'
            + "".join(
                f'  - {{ip: "10.2.{i // 250}.{i % 250 + 1}", name: n{i:04d}, role: [gpu-worker], gpu_count: {gpus}}}\n'
                for i in range(node_count)
            )
            + f"prometheus_url: {prom.url}\n"
        )
        from tasks import prometheus

        pc = prometheus.prometheus(config, timeout_s=120)
        expected = {n.name: gpus for n in config.gpu_nodes}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the first full scrape
            if len(prometheus.query(pc, "DCGM_FI_DEV_GPU_TEMP")) >= node_count * gpus:
                break
            time.sleep(2)
        walls = []
        for _ in range(3):
            started = time.perf_counter()
            queries = 0
            interval = prometheus.scrape_interval_s(pc)
            queries += 1
            answer = prometheus.query(pc, validation.dcgm_coverage_query())
            queries += 1
            rows = validation.dcgm_coverage(answer, expected, time.time(), 2 * interval)
            walls.append(time.perf_counter() - started)
        passed = sum(r.result == "pass" for r in rows)
        print(
            f"dcgm coverage: {node_count} nodes x {gpus} GPUs x {len(validation.REQUIRED_DCGM_METRICS)} series, "
            f"{queries} HTTP requests (1 PromQL query + 1 targets read), median wall {statistics.median(walls):.2f}s, "
            f"{passed}/{node_count} nodes fully covered"
        )
    finally:
        prom.down()
        sim.down()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
        bench_smoke(Path(tmp) / "cp")
        bench_dcgm(Path(tmp) / "metrics")
