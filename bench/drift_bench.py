"""drift at fleet scale with every release installed: the lab, installed by gpuforge's own `install` (real
upstream charts: kube-prometheus-stack, GPU Operator, cert-manager, Slinky, Slurm, dashboard), plus 1,000 and
then 5,000 more kwok GPU nodes registered with the labels and taints gpuforge renders.

    .venv/bin/python bench/drift_bench.py [--sizes 1000,5000] [--runs 3]

At each size it runs the drift evaluation (flows.drift.evaluate: the flow's reading and comparison, without
Prefect's run bookkeeping) --runs times and prints the wall times (goal: <= 3 s at 5,000), the calls per kind
(goal: the same at every size) and the items found. Before the largest size three of the added nodes are
relabelled behind gpuforge's back: exactly those three items must be found. The added nodes stay out of Slurm
(`slurm: false`) and carry no `kubernetes.io/os` label, so no chart's DaemonSet (node-exporter selects
`kubernetes.io/os: linux`) puts thousands of pods on them while drift is timed; drift does not compare that
label. Prints; asserts no wall time.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
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

from flows.drift import evaluate  # noqa: E402
from gpuforge import pins, render  # noqa: E402
from gpuforge.config import load_config  # noqa: E402
from lab.nodes import node_manifest, register_nodes  # noqa: E402

RELABELLED = ("fleet-0001", "fleet-0002", "fleet-0003")


def fleet_config(lab_config: Path, count: int) -> Path:
    """The lab's config plus `count` GPU nodes (addresses only written down: drift never dials a node)."""
    yaml = YAML()
    data = yaml.load(lab_config.read_text())
    for i in range(count):
        data["k8s_cluster_nodes"].append(
            {
                "ip": f"10.{11 + i // 250}.{i % 250}.1",
                "name": f"fleet-{i:04d}",
                "role": ["gpu-worker", "schedulable"],
                "gpu_count": 8,
                "slurm": False,
            }
        )
    path = lab_config.with_name(f"config-{count}.yml")
    with path.open("w") as f:
        yaml.dump(data, f)
    return path


def manifest(config, node) -> dict:
    taints = []
    for t in render.node_taints(node):
        head, _, effect = t.rpartition(":")
        key, _, value = head.partition("=")
        taints.append({"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect})
    body = node_manifest(
        node.name,
        labels=render.node_labels(node, config.cluster_name),
        taints=taints,
        kubelet_version=pins.KUBE_VERSION,
        gpus=node.spec.gpu_count or 0,
    )
    del body["metadata"]["labels"]["kubernetes.io/os"]  # see the module docstring: keeps DaemonSets off them
    return body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,5000", help="GPU node counts added to the lab, smallest first")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]

    from kubernetes import client
    from prefect.testing.utilities import prefect_test_harness

    from flows.install import InstallParams, install
    from lab.lab import Lab
    from tasks.helm import read_releases
    from tasks.kube import api_client
    from tests.conftest import make_lab_config

    with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
        work = Path(tmp)
        os.environ["GPUFORGE_STATE"] = str(work / "state-runs")
        lab_config = make_lab_config(work, prefix="d", ip_base=230, cluster="drift-bench")
        lab = Lab(load_config(lab_config))
        lab.up()
        try:
            with prefect_test_harness(server_startup_timeout=180):
                started = time.monotonic()
                state = install(InstallParams(config=str(lab_config)), return_state=True)
                assert state.is_completed(), state.message
            kubeconfig = load_config(lab_config).kubeconfig_path()
            releases = read_releases(kubeconfig)
            names = [f"{name} {r['chart']}-{r['version']}" for name, r in sorted(releases.items())]
            print(
                f"lab installed in {time.monotonic() - started:.0f} s; releases: {', '.join(names)}",
                flush=True,
            )
            base = evaluate(load_config(lab_config))
            print(f"drift of the installed lab itself: {base['summary']}; calls {base['api_calls']}", flush=True)
            rows = []
            for size in sizes:
                config = load_config(fleet_config(lab_config, size))
                added = [n for n in config.nodes if n.name.startswith("fleet-")]
                started = time.monotonic()
                register_nodes(kubeconfig, [manifest(config, n) for n in added])
                print(f"{len(added)} GPU nodes registered in {time.monotonic() - started:.0f} s", flush=True)
                if size == sizes[-1]:
                    with api_client(kubeconfig) as api:
                        for name in RELABELLED:
                            client.CoreV1Api(api).patch_node(
                                name, {"metadata": {"labels": {"gpuforge.io/nodeset": "moved"}}}
                            )
                times, report = [], {}
                for _ in range(args.runs):
                    started = time.monotonic()
                    report = evaluate(config)
                    times.append(time.monotonic() - started)
                rows.append((size, times, report))
                paths = [i["path"] for i in report["items"]]
                kinds = collections.Counter(re.sub(r"^/nodes/[^/]+", "/nodes/*", p) for p in paths)
                print(
                    f"drift over the lab + {size} GPU nodes ({len(config.nodes)} in all), {len(releases)} releases: "
                    f"median {statistics.median(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)}); "
                    f"calls {report['api_calls']}; {len(paths)} items: {dict(kinds)}; errors {report['errors']}; "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
            with api_client(kubeconfig) as api:
                pods = len(client.CoreV1Api(api).list_pod_for_all_namespaces(_preload_content=False).data)
            print(f"(all pods listed at the end: {pods} bytes of JSON)")
            (s_size, s_times, s_rep), (l_size, l_times, l_rep) = rows[0], rows[-1]
            print(
                f"calls at {s_size} nodes == calls at {l_size} nodes: {s_rep['api_calls'] == l_rep['api_calls']}; "
                f"time {statistics.median(l_times) / statistics.median(s_times):.1f}x for "
                f"{l_size / s_size:.0f}x the nodes (goal: <= 3 s at {l_size})"
            )
            relabel = "/labels/gpuforge.io~1nodeset"
            found = sorted(i["path"].split("/")[2] for i in l_rep["items"] if i["path"].endswith(relabel))
            ok = found == sorted(RELABELLED)
            print(f"relabelled nodes found: {found} ({'as expected' if ok else 'NOT the three relabelled'})")
        finally:
            lab.down(purge=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
