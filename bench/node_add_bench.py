"""Adding one node vs re-running the whole kubespray phase, on lab clusters of 16 and 64 SSH hosts, side by side.

For each size, on one lab (real Kubespray v2.31.0 validation and facts over SSH; node provisioning stood in by
the lab, as everywhere in the lab):
  full  the kubespray phase forced over every host (`install --force-phase kubespray`: cluster.yml-equivalent);
  cold  `node add` of a new CPU node while the cluster's fact cache is empty: Kubespray's facts.yml over every
        host first (once per cluster, as Kubespray's docs require before `--limit`), then scale --limit;
  warm  `node add` of the next new CPU node: scale --limit on the new host, the others' facts from the cache.
Full runs and warm adds alternate --runs times (default 3; the first full run is the cluster's first kubespray
phase). Prints every time, the medians, warm/full (goal <= 10 %) and warm at 64 / warm at 16 (goal: flat). Asserts
nothing about time. Needs the lab lock:
    flock /tmp/gpuforge-lab.lock .venv/bin/python bench/node_add_bench.py [--sizes 16 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from ruamel.yaml import YAML  # noqa: E402

LAB_CONFIG = REPO / "deployments" / "lab" / "config.yml"
FIRST_IP = 130  # 198.51.100.130 and up: clear of the test labs (100..) and other benches (200..)


def write_config(folder: Path, hosts: int, extra: int) -> Path:
    """The lab config with `hosts` hosts (a control plane, a GPU worker, CPU workers), plus `extra` more CPU
    workers at the end (the ones added), everything else as the lab's; only Kubernetes services a node add
    touches stay on."""
    yaml = YAML()
    data = yaml.load(LAB_CONFIG.read_text())
    state = folder / "lab"
    data["cluster_name"] = f"bench-add-{hosts}"
    data["kubeconfig"] = str(state / "kubeconfig")
    data["ansible_ssh_private_key_file"] = str(state / "ssh" / "id_ed25519")
    data.pop("prometheus_url", None)
    data.pop("chart_mirror", None)
    for key in ("checkout", "playbook"):
        data["kubespray"][key] = str((LAB_CONFIG.parent / data["kubespray"][key]).resolve())
    for service in data["deepops_services"].values():
        service["enabled"] = False
    nodes = [{"ip": f"198.51.100.{FIRST_IP}", "name": "b-cp", "role": ["control-plane", "etcd", "schedulable"]}]
    nodes.append({"ip": f"198.51.100.{FIRST_IP + 1}", "name": "b-gpu", "role": ["gpu-worker"], "gpu_count": 1})
    nodes += [
        {"ip": f"198.51.100.{FIRST_IP + i}", "name": f"b-cpu{i}", "role": ["cpu-worker"]}
        for i in range(2, hosts + extra)
    ]
    data["k8s_cluster_nodes"] = nodes
    path = folder / f"config-{hosts + extra}.yml"
    with path.open("w") as f:
        yaml.dump(data, f)
    return path


def timed(flow, params) -> float:
    started = time.perf_counter()
    state = flow(params, return_state=True)
    if not state.is_completed():
        raise SystemExit(f"{flow.name} failed: {state.message}")
    return time.perf_counter() - started


def measure(hosts: int, runs: int) -> dict[str, list[float]]:
    from flows.kubespray import KubesprayParams, kubespray
    from flows.node import NodeAddParams, node_add
    from gpuforge.config import load_config
    from lab.lab import Lab

    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-add-") as tmp:
        folder = Path(tmp)
        os.environ["GPUFORGE_STATE"] = str(folder / "state")
        configs = [write_config(folder, hosts, extra) for extra in range(runs + 2)]
        lab = Lab(load_config(configs[0]))

        def add_next(config: Path) -> float:
            new = load_config(config).nodes[-1].name
            Lab(load_config(config)).add_host(new)
            took = timed(node_add, NodeAddParams(config=str(config)))
            print(f"{hosts} hosts: add {new} {took:.1f}s", flush=True)
            return took

        try:
            lab.up()
            print(f"{hosts} hosts: lab up", flush=True)
            # The cluster's first kubespray phase, timed: a forced re-run does the same over every host.
            full = [timed(kubespray, KubesprayParams(config=str(configs[0]), force=True))]
            print(f"{hosts} hosts: full kubespray phase {full[-1]:.1f}s", flush=True)
            cold = add_next(configs[1])  # the fact cache is empty: facts.yml over every host first
            warm = []
            for i, config in enumerate(configs[2:]):  # alternating, so both see the same load
                warm.append(add_next(config))
                if i < runs - 1:
                    full.append(timed(kubespray, KubesprayParams(config=str(config), force=True)))
                    print(f"{hosts} hosts: full kubespray phase {full[-1]:.1f}s", flush=True)
        finally:
            Lab(load_config(configs[-1])).down(purge=True)
    return {"full": full, "cold": [cold], "warm": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--runs", type=int, default=3, help="full runs and cached-fact adds, alternating")
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    results = {}
    with prefect_test_harness(server_startup_timeout=180):
        for hosts in args.sizes:
            results[hosts] = measure(hosts, args.runs)
    print(f"load average after the runs: {os.getloadavg()[0]:.1f} (2 cores, shared)")
    median = {h: {k: statistics.median(v) for k, v in r.items()} for h, r in results.items()}
    for hosts, r in results.items():
        m = median[hosts]
        print(
            f"{hosts:>3} hosts: full kubespray phase {m['full']:6.1f}s {_runs(r['full'])} | add, cold fact cache "
            f"{m['cold']:6.1f}s | add, cached facts {m['warm']:6.1f}s {_runs(r['warm'])} = "
            f"{100 * m['warm'] / m['full']:.1f}% of full (medians; goal <= 10%)"
        )
    if len(results) > 1:
        small, large = min(median), max(median)
        print(
            f"add on cached facts, {large} vs {small} hosts: {median[large]['warm'] / median[small]['warm']:.2f}x "
            f"(goal: flat); full phase: {median[large]['full'] / median[small]['full']:.2f}x"
        )


def _runs(times: list[float]) -> str:
    return "(" + ", ".join(f"{t:.1f}" for t in times) + ")"


if __name__ == "__main__":
    main()
