"""gpu-health evaluation at fleet scale: 1,024 nodes x 8 GPUs served by the lab's DCGM simulator, scraped by a
real Prometheus on a free 127.0.0.1 port.

    .venv/bin/python bench/health_bench.py [--nodes 1024] [--gpus 8] [--sample 256] [--scrape 15s]

Prints the number of PromQL queries of the fleet evaluation (fixed, independent of the GPU count: the fleet
queries, plus one for the nodes whose GPUs showed an XID, here the injected one), its wall
time (median of --runs), and the ratio against a naive evaluation that sends one query per GPU, measured in
the same run on a random sample of GPUs and extrapolated to the fleet (said so in the output). The naive path
is a complete evaluation: the same queries (with the exact XID query in place of the fleet's XID filter)
narrowed to one GPU and joined into one query, parsed and judged by
the same code, so both paths must agree on every sampled GPU (checked; exit 1 otherwise). One injected fault
(XID 79 on one GPU, always in the sample) checks that both find exactly that GPU.

It also accounts for the CPU, to show what bounds the ratio on this machine: the CPU seconds one evaluation
costs Prometheus (its own `process_cpu_seconds_total`) and this process (`time.process_time`, threads
included), the CPUs already busy while nobody queries (Prometheus scraping 1,024 targets, the simulator
serving them), and Prometheus's floor: the CPU of one `count()` over every series the fleet queries read
(each DCGM metric they name), i.e. what it must spend just to look at each series once, however the queries
are shaped, with nothing sent back. CPU seconds over the CPUs left free is the least wall time an evaluation
can take here. Prints ratios; asserts no wall time.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402
from prometheus_api_client import PrometheusConnect  # noqa: E402

from gpuforge import health  # noqa: E402
from gpuforge.config import parse_config  # noqa: E402
from gpuforge.health import Verdict  # noqa: E402
from lab.dcgm_sim import DcgmSim  # noqa: E402
from lab.prometheus import PrometheusLab  # noqa: E402
from tasks import prometheus as prom_tasks  # noqa: E402
from tasks.prometheus import evaluate_fleet  # noqa: E402

MODEL = "NVIDIA H100 80GB HBM3"
TAG = "gpuforge_query"


def per_gpu_query(fleet: dict[str, str], node: str, gpu: int) -> str:
    """The fleet queries narrowed to one GPU and joined into one query, each part tagged with its name."""
    match = f'hostname="{node}", gpu="{gpu}"'
    parts = []
    for name, q in fleet.items():
        q = q.replace('{__name__=~"', "{" + match + ', __name__=~"')
        # Bare metric names (not those inside a __name__ regex): add the matcher.
        q = re.sub(r'(?<![|"\w])(DCGM_[A-Z_]+)(?![|"\w{])', lambda m: f"{m.group(1)}{{{match}}}", q)
        parts.append(f'label_replace({q}, "{TAG}", "{name}", "", "")')
    return " or ".join(parts)


def busy_cpus(seconds: float) -> float:
    """How many CPUs the machine keeps busy (all processes) over `seconds` while this process idles."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def prometheus_cpu_s(url: str) -> float:
    """Prometheus's own CPU seconds so far (process_cpu_seconds_total of its /metrics)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^process_cpu_seconds_total (\S+)$", text, re.M).group(1))


def floor_query(fleet: dict[str, str]) -> str:
    """One query reading every series the fleet queries read, once, and answering with a single number."""
    names = sorted({name for q in fleet.values() for name in re.findall(r"DCGM_[A-Z_]+", q)})
    return 'count({__name__=~"' + "|".join(names) + '"})'


def naive_one_gpu(pc: PrometheusConnect, fleet: dict[str, str], node: str, gpu: int, table):
    """A complete evaluation of one GPU with one query: the same inputs and rules as the fleet path."""
    results: dict[str, list] = {name: [] for name in fleet}
    for item in prom_tasks.query(pc, per_gpu_query(fleet, node, gpu)):
        name = item["metric"].pop(TAG)
        results[name].append(item)
    readings = health.readings_from_query_results(results, {node: None}, time.time())
    return [v for v in health.judge_all(readings, table) if v.gpu == gpu]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1024)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--sample", type=int, default=256, help="GPUs timed on the naive path (extrapolated)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scrape", default="15s", help="Prometheus scrape interval (dcgm-exporter's default 15s)")
    ap.add_argument("--idle", type=float, default=15, help="seconds to measure the idle load over (a scrape interval)")
    args = ap.parse_args()

    nodes = {f"node-{i:04d}": (args.gpus, MODEL) for i in range(args.nodes)}
    total = args.nodes * args.gpus
    with tempfile.TemporaryDirectory(prefix="health-bench-") as tmp:
        sim = DcgmSim(Path(tmp) / "dcgm")
        prom = PrometheusLab(Path(tmp) / "prometheus")
        try:
            t0 = time.monotonic()
            sim.up(nodes)
            sick = ("node-0007", 3)
            sim.set_value(*sick, "XID_ERRORS", 79)
            prom.up(listen="127.0.0.1:0", targets=sim.targets(), scrape_interval=args.scrape, timeout=60)
            print(f"{args.nodes} nodes x {args.gpus} GPUs = {total} GPUs; simulator + Prometheus {prom.url} "
                  f"(scrape {args.scrape})", flush=True)  # fmt: skip
            deadline = time.monotonic() + 300
            seen = 0
            while time.monotonic() < deadline:
                seen = int(float((prom.query("count(DCGM_FI_DEV_GPU_TEMP)") or [{"value": [0, "0"]}])[0]["value"][1]))
                if seen >= total:
                    break
                time.sleep(2)
            print(f"all {seen} GPUs scraped after {time.monotonic() - t0:.1f} s", flush=True)
            if seen < total:
                print("not every GPU was scraped in time; numbers below would be wrong", file=sys.stderr)
                return 1

            config = parse_config(
                'k8s_cluster_nodes: [{ip: "10.0.0.1", role: [control-plane, etcd]}]\n'
            )  # only for thresholds (the defaults)
            table = health.resolve_thresholds(config.health.thresholds)
            queries = health.fleet_queries(table)
            # One GPU at a time, the exact XID question is asked directly (default thresholds: default window).
            naive_queries = {k: q for k, q in queries.items() if k != health.XID_SEEN}
            naive_queries["xid_recent"] = health.HEALTH_QUERIES["xid_recent"]
            pc = PrometheusConnect(url=prom.url, timeout=120)
            expected = {n: args.gpus for n in nodes}

            cpus = os.cpu_count() or 1
            prom0 = prometheus_cpu_s(prom.url)
            idle_start = time.monotonic()
            background = busy_cpus(args.idle)
            prom_idle_rate = (prometheus_cpu_s(prom.url) - prom0) / (time.monotonic() - idle_start)  # scraping
            times, client_cpu, prom_cpu = [], [], []
            verdicts = []
            for _ in range(args.runs):
                prom0, cpu0, start = prometheus_cpu_s(prom.url), time.process_time(), time.monotonic()
                verdicts, sent = evaluate_fleet(pc, expected, table, queries)
                times.append(time.monotonic() - start)
                client_cpu.append(time.process_time() - cpu0)
                prom_cpu.append(prometheus_cpu_s(prom.url) - prom0 - prom_idle_rate * times[-1])
            fleet_s = statistics.median(times)
            counts = health.summarize(verdicts)
            bad = [(v.node, v.gpu, v.verdict.value) for v in verdicts if v.verdict != Verdict.HEALTHY]
            print(f"fleet evaluation: {sent} PromQL queries ({len(queries)} fleet queries + {sent - len(queries)} for "
                  f"the nodes that showed an XID), median {fleet_s:.2f} s, best {min(times):.2f} s over {args.runs} "
                  f"runs ({', '.join(f'{t:.2f}' for t in times)}), "
                  f"{len(verdicts)} verdicts: {dict((k.value, n) for k, n in counts.items())}")  # fmt: skip
            print(f"  injected XID 79 on {sick[0]} GPU {sick[1]}; not healthy: {bad}")

            floor_cpu = []
            for _ in range(args.runs):
                prom0, start = prometheus_cpu_s(prom.url), time.monotonic()
                prom_tasks.query(pc, floor_query(queries))
                floor_cpu.append(prometheus_cpu_s(prom.url) - prom0 - prom_idle_rate * (time.monotonic() - start))

            rng = random.Random(7)
            sample = rng.sample([(n, g) for n in nodes for g in range(args.gpus)], min(args.sample - 1, total))
            sample.append(sick)  # the faulty GPU is in the sample: both paths must call it unhealthy
            fleet_by_gpu = {(v.node, v.gpu): v for v in verdicts}
            start = time.monotonic()
            naive = [naive_one_gpu(pc, naive_queries, n, g, table) for n, g in sample]
            naive_s = time.monotonic() - start
            differ = [
                (n, g)
                for (n, g), got in zip(sample, naive, strict=True)
                if len(got) != 1
                or (got[0].verdict, got[0].reasons) != (fleet_by_gpu[(n, g)].verdict, fleet_by_gpu[(n, g)].reasons)
            ]
            per_gpu = naive_s / len(sample)
            naive_total = per_gpu * total
            print(f"naive evaluation: 1 query per GPU (the same {len(naive_queries)} queries narrowed to the GPU, "
                  f"joined with 'or'), timed on a random sample of {len(sample)} GPUs: {naive_s:.2f} s "
                  f"({per_gpu * 1000:.1f} ms/GPU); EXTRAPOLATED to {total} GPUs = {total} queries, "
                  f"{naive_total:.1f} s")  # fmt: skip
            print(f"  verdicts of the sample: {len(sample) - len(differ)} of {len(sample)} identical to the fleet path"
                  + (f"; DIFFERENT: {differ[:5]}" if differ else ""))  # fmt: skip
            print(f"ratio naive/fleet: {naive_total / fleet_s:.1f}x with the median, {naive_total / min(times):.1f}x "
                  "with the best fleet time (goal >= 100x); "
                  f"queries {total} vs {sent} ({total // sent}x fewer)")  # fmt: skip
            free = cpus - background
            prom_eval, client_eval = statistics.median(prom_cpu), statistics.median(client_cpu)
            eval_cpu = prom_eval + client_eval
            floor_s = statistics.median(floor_cpu)
            metrics = floor_query(queries).count("|") + 1
            print(f"CPU: {cpus} CPUs, {background:.2f} busy while idle (Prometheus scraping, the simulator serving), "
                  f"{free:.2f} free. One fleet evaluation costs {eval_cpu:.2f} CPU s (median: Prometheus "
                  f"beyond its scraping {prom_eval:.2f}, this process {client_eval:.2f}): on "
                  f"{free:.2f} free CPUs that is about {eval_cpu / free:.2f} s of wall time (measured: median "
                  f"{fleet_s:.2f} s)")  # fmt: skip
            print(f"Prometheus floor: one count() over every series the {len(queries)} queries read ({metrics} "
                  f"metrics) costs Prometheus {floor_s:.2f} CPU s (median; best {min(floor_cpu):.2f}); with no "
                  f"other work at all (no answer encoded, sent or parsed), no fleet evaluation here takes less than "
                  f"about {floor_s / free:.2f} s, i.e. beats about {naive_total / (floor_s / free):.0f}x")  # fmt: skip
            return 1 if differ else 0
        finally:
            prom.down()
            sim.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
