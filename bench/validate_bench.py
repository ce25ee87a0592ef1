"""Validation at scale, measured side by side in one run (prints ratios; asserts nothing about time).

1. CUDA smoke on 1, 64 and 256 kwok GPU nodes: gpuforge's cuda_smoke vs its floor, a bare client creating the
   same pods, waiting with one watch and reading their logs; alternating runs, ratio per size (goal <= 1.2) and
   the per-node cost (goal: flat from 64 to 256).
2. DCGM coverage on 1,024 nodes x 8 GPUs served by the lab's simulator and scraped by a real Prometheus:
   the number of PromQL queries (constant) and the wall time of the check.

Run: .venv/bin/python bench/validate_bench.py [--part smoke|dcgm] [--sizes 1,64,256] [--runs 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
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


class ApiCalls:
    """Counts the Kubernetes API requests this process sends (every kubernetes-client call goes through
    RESTClientObject.request), by verb and kind of object: what each side of the smoke asks the API server."""

    def __init__(self) -> None:
        from kubernetes.client import rest

        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        original = rest.RESTClientObject.request
        calls = self

        def counted(client_self, method, url, *args, **kwargs):
            path = url.split("?", 1)[0]
            kind = re.sub(r"^/namespaces/[^/]+(?=/)", "", path.split("/api/v1", 1)[-1])
            kind = re.sub(r"/(pods|namespaces|events)/[^/]+", r"/\1/NAME", kind)
            watch = "watch " if "watch=true" in url.lower() else ""
            with calls._lock:
                calls.counts[f"{watch}{method} {kind}"] += 1
            return original(client_self, method, url, *args, **kwargs)

        rest.RESTClientObject.request = counted

    def take(self) -> collections.Counter[str]:
        with self._lock:
            counts, self.counts = self.counts, collections.Counter()
        return counts


def per_node(counts: collections.Counter[str], size: int) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f" ({sum(counts.values())} in all, {size} nodes)"


CUDA_IMAGE = parse_config('k8s_cluster_nodes: [{ip: "10.0.0.1", role: [control-plane, etcd]}]\n').validation.cuda_image


def gpuforge_smoke(kubeconfig: Path, names: list[str], cluster_nodes: dict[str, kube.NodeState]) -> float:
    """validate's own CUDA smoke check, called as the validate flow calls it (tasks.kube.cuda_smoke: a pod per
    node + the oversized pod, logs, verdicts, cleanup); the node list it is given is read once, before any clock
    starts."""
    config = parse_config('k8s_cluster_nodes: [{ip: "10.0.0.1", role: [control-plane, etcd]}]\n')
    started = time.perf_counter()
    results = kube.cuda_smoke.fn(config, kubeconfig, cluster_nodes, {n: 8 for n in names}, keep=False)
    elapsed = time.perf_counter() - started
    passed = sum(r.result == validation.PASS for r in results if r.check == "cuda-smoke")
    refused = any(r.check == "gpu-scheduling" and r.result == validation.PASS for r in results)
    if passed != len(names) or not refused:
        raise AssertionError([r for r in results if r.result != validation.PASS])
    return elapsed


def floor_smoke(kubeconfig: Path, names: list[str]) -> float:
    """The floor: a bare kubernetes client in this process that creates the same pods (tasks.kube.smoke_pod, the
    oversized one included) in a fresh namespace, 16 at a time, lists them and waits for all of them with ONE
    watch from the list's resourceVersion (list and watch again if the server ends it): each smoke pod finished,
    the oversized one refused by the scheduler. It reads each log as its pod finishes (asking again while the
    kubelet does not serve it yet, as any client must: tasks.kube.read_pod_log), and deletes the namespace. No
    verdicts, no node or GPU bookkeeping."""
    from concurrent.futures import ThreadPoolExecutor

    from kubernetes import client, watch
    from kubernetes.client.exceptions import ApiException

    started = time.perf_counter()
    namespace = f"floor-{uuid.uuid4().hex[:6]}"
    oversized = kube.smoke_pod("cuda-oversized", "", CUDA_IMAGE, 9)
    pods = [kube.smoke_pod(f"cuda-smoke-{n}", n, CUDA_IMAGE) for n in names] + [oversized]
    with kube.api_client(kubeconfig) as api, ThreadPoolExecutor(max_workers=16) as pool:
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": namespace}})
        list(pool.map(lambda pod: core.create_namespaced_pod(namespace, pod), pods))
        waiting = {p["metadata"]["name"] for p in pods}
        logs = {}

        def settle(pod) -> None:
            name = pod.metadata.name
            if name not in waiting:
                return
            if name == "cuda-oversized":
                if any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in pod.status.conditions or []):
                    waiting.discard(name)
            elif pod.status.phase in ("Succeeded", "Failed"):
                waiting.discard(name)
                logs[name] = pool.submit(kube.read_pod_log, core, namespace, name)

        deadline = time.monotonic() + 120
        while waiting and time.monotonic() < deadline:  # list, then one watch from there; again if the server ends it
            listed = core.list_namespaced_pod(namespace)
            for pod in listed.items:
                settle(pod)
            w = watch.Watch()
            try:
                for event in w.stream(
                    core.list_namespaced_pod, namespace, resource_version=listed.metadata.resource_version,
                    timeout_seconds=60,
                ):  # fmt: skip
                    settle(event["object"])
                    if not waiting:
                        w.stop()
            except ApiException as exc:  # the watch cache behind the list (504) or compacted past it (410)
                if exc.status not in (410, 504):
                    raise
        passed = sum("Test PASSED" in future.result() for future in logs.values())
        core.delete_namespace(namespace)
    elapsed = time.perf_counter() - started
    if waiting or passed != len(names):
        raise AssertionError(f"floor: still waiting for {sorted(waiting)[:5]}, {passed}/{len(names)} logs passed")
    return elapsed


def bench_smoke(work: Path, sizes: list[int], runs: int) -> None:
    cp = ControlPlane(work, BIN)
    cp.up()
    try:
        names = [f"bench-gpu-{i}" for i in range(max(sizes))]
        nodes.register_nodes(
            cp.kubeconfig,
            [nodes.node_manifest(n, labels={}, taints=[], kubelet_version="1.35.4", gpus=8) for n in names],
        )
        nodes.wait_nodes_ready(cp.kubeconfig, names, timeout=300)
        inventory = work / "inv.json"
        inventory.write_text(json.dumps({n: {"gpus": 8, "model": "NVIDIA H100 80GB HBM3"} for n in names}))
        procs.start_daemon(
            work,
            "reconciler",
            [sys.executable, "-m", "lab.reconciler", "--kubeconfig", str(cp.kubeconfig), "--inventory", str(inventory)],
        )
        time.sleep(2)
        per_node_s = {}
        cluster_nodes = kube.list_nodes(cp.kubeconfig)
        calls = ApiCalls()
        for size in sizes:
            ours, floor = [], []
            for _ in range(runs):  # alternating, so both see the same machine load
                calls.take()
                ours.append(gpuforge_smoke(cp.kubeconfig, names[:size], cluster_nodes))
                ours_calls = calls.take()
                floor.append(floor_smoke(cp.kubeconfig, names[:size]))
                floor_calls = calls.take()
            t_ours, t_floor = statistics.median(ours), statistics.median(floor)
            per_node_s[size] = (t_ours / size, t_floor / size)
            print(f"cuda smoke, {size:>3} nodes: gpuforge {t_ours:.2f} s, floor {t_floor:.2f} s (medians of {runs}) "
                  f"-> ratio {t_ours / t_floor:.2f} (goal <= 1.2); per node: gpuforge {1000 * t_ours / size:.0f} ms, "
                  f"floor {1000 * t_floor / size:.0f} ms; raw gpuforge {', '.join(f'{t:.2f}' for t in ours)}, "
                  f"floor {', '.join(f'{t:.2f}' for t in floor)}", flush=True)  # fmt: skip
            print(f"  API requests, last run: gpuforge {per_node(ours_calls, size)}")
            print(f"  API requests, last run: floor    {per_node(floor_calls, size)}", flush=True)
        big = [s for s in sizes if s >= 64]
        if len(big) >= 2:
            lo, hi = big[0], big[-1]
            print(f"per-node cost {lo} -> {hi} nodes: gpuforge x{per_node_s[hi][0] / per_node_s[lo][0]:.2f}, "
                  f"floor x{per_node_s[hi][1] / per_node_s[lo][1]:.2f} (goal: flat)")  # fmt: skip
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
    parser.add_argument("--sizes", default="1,64,256", help="kwok GPU node counts for the CUDA smoke")
    parser.add_argument("--runs", type=int, default=3, help="CUDA smoke runs per size and side")
    args = parser.parse_args()
    part = args.part
    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
        if part in ("smoke", "all"):
            bench_smoke(Path(tmp) / "cp", [int(n) for n in args.sizes.split(",")], args.runs)
        if part in ("dcgm", "all"):
            bench_dcgm(Path(tmp) / "metrics")
