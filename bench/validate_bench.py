"""Validation at scale, measured side by side in one run (prints ratios; asserts nothing about time).

1. CUDA smoke: all pods started at once and watched, on 64 kwok GPU nodes vs on 1 node (goal: ratio <= 1.5).
2. DCGM coverage on 1,024 nodes x 8 GPUs served by the lab's simulator and scraped by a real Prometheus:
   the number of PromQL queries (constant) and the wall time of the check.

Run: .venv/bin/python bench/validate_bench.py [--part smoke|dcgm]
"""

from __future__ import annotations

import argparse
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


def smoke_round(kubeconfig: Path, names: list[str], round_no: int) -> float:
    """validate's own CUDA smoke check (tasks.kube.cuda_smoke: a pod per node + the oversized pod, logs, cleanup)."""
    config = parse_config('k8s_cluster_nodes: [{ip: "10.0.0.1", role: [control-plane, etcd]}]\n')
    nodes = kube.list_nodes(kubeconfig)
    started = time.perf_counter()
    results = kube.cuda_smoke.fn(config, kubeconfig, nodes, {n: 8 for n in names}, keep=False)
    elapsed = time.perf_counter() - started
    passed = sum(r.result == validation.PASS for r in results if r.check == "cuda-smoke")
    refused = [r for r in results if r.check == "gpu-scheduling" and r.result == validation.PASS]
    print(f"  {len(names):>2} nodes: {passed} passed (Test PASSED in the log), oversized pod refused: "
          f"{bool(refused)}, {elapsed:.2f}s")  # fmt: skip
    if passed != len(names) or not refused:
        raise AssertionError([r for r in results if r.result != validation.PASS])
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
        # Lab pods finish the moment they run, so what grows with the node count is the control plane's own work
        # per pod (create, bind, two status writes, a Logs object, a log read), all on this machine's cores.
        print(f"  each extra node adds {1000 * (t64 - t1) / (len(names) - 1):.0f} ms of control-plane work "
              f"(the lab's pods take no time to run); one node after another would take {len(names) * t1:.2f}s "
              f"({len(names) * t1 / t64:.1f}x the parallel run)")  # fmt: skip
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["smoke", "dcgm", "all"], default="all")
    part = parser.parse_args().part
    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
        if part in ("smoke", "all"):
            bench_smoke(Path(tmp) / "cp")
        if part in ("dcgm", "all"):
            bench_dcgm(Path(tmp) / "metrics")
