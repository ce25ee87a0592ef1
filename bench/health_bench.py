"""gpu-health evaluation at fleet scale vs Prometheus's floor: N nodes x 8 GPUs served by the lab's DCGM
simulator, scraped by a real Prometheus on a free 127.0.0.1 port, at two sizes (256 x 8 and 1,024 x 8 GPUs).

    .venv/bin/python bench/health_bench.py [--sizes 256,1024] [--gpus 8] [--runs 6] [--repeat 3] [--scrape 15s]

At each size, side by side in one run, it prints:

- gpuforge's whole evaluation (the fleet's summary queries, the per-GPU questions about the nodes the summary
  cannot clear, decoding, judging, and the report the gpu-health flow builds: counts, the GPUs judged one by one,
  the healthy GPUs counted per node, the table) in Prometheus CPU (its own `process_cpu_seconds_total`, less
  its scraping rate measured while idle), against Prometheus's floor: one `count()` over every series the
  fleet queries read, i.e. what Prometheus must spend just to look at each series once, however the queries
  are shaped, with nothing sent back (ratio; goal <= 1.5);
- gpuforge's own CPU (`time.process_time` of this process, threads included) per 8,192 GPUs (goal <= 100 ms);
- the PromQL queries sent (goal <= 10 whatever the size);
- the peak memory of this process during one evaluation, as tracemalloc's peak of Python allocations, in a
  separate run after the timed ones (tracing slows Python; goal <= 300 MB at 8,192 GPUs);
- the same evaluation with its queries sent all at once (the gpu-health flow sends them one at a time);
- wall times (medians of --runs).

Each measurement is --repeat calls back to back, divided by --repeat, and the three are alternated with the order
turned each run: Prometheus's Go GC collects one query's garbage during later ones, so a single call measured right
after another pays for part of its neighbour's (a fixed order, one call each, read anything from 1.15x to 2.5x).

Then a linear extrapolation of gpuforge's CPU and memory, and of both Prometheus CPUs, to 65,536 GPUs from
the two sizes. One injected fault (XID 79 on one GPU) checks that exactly that GPU is found (exit 1
otherwise). Prints ratios; asserts no time.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
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

MODEL = "NVIDIA H100 80GB HBM3"
SICK = ("node-0007", 3)  # the GPU with the injected XID 79
TARGET_GPUS = 65_536


@dataclass
class Measured:
    gpus: int
    queries: int
    wall_s: float
    prom_cpu_s: float
    client_cpu_s: float
    floor_prom_cpu_s: float
    floor_wall_s: float
    at_once_wall_s: float
    at_once_prom_cpu_s: float
    peak_mb: float
    unhealthy: list
    looked_at: int  # GPUs judged one by one (the rest counted healthy per node)


def prometheus_cpu_s(url: str) -> float:
    """Prometheus's own CPU seconds so far (process_cpu_seconds_total of its /metrics)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^process_cpu_seconds_total (\S+)$", text, re.M).group(1))


def floor_query(fleet: dict[str, str]) -> str:
    """One query reading every series the fleet queries read, once, and answering with a single number."""
    names = sorted({name for q in fleet.values() for name in re.findall(r"DCGM_[A-Z_]+", q)})
    return 'count({__name__=~"' + "|".join(names) + '"})'


def gpuforge_evaluation(
    pc: PrometheusConnect, expected: dict[str, int], table, queries: dict[str, str], concurrency: int = 1
):
    """What the gpu-health flow does with Prometheus's answers: the fleet evaluation and the report."""
    fleet, sent = prom_tasks.evaluate_fleet(pc, expected, table, queries, concurrency)
    return fleet, sent, report_of(fleet)


def report_of(fleet: health.FleetHealth) -> dict:
    """The parts of the gpu-health flow's report that grow with the fleet (flows/gpu_health.py)."""
    return {
        "counts": {k.value: n for k, n in fleet.counts().items()},
        "gpus": [v.model_dump(mode="json") for v in fleet.verdicts],
        "healthy_gpus_by_node": {node: h.gpus for node, h in fleet.healthy.items()},
        "table": fleet.table_rows(),
    }


def where_the_time_goes(pc, url: str, expected: dict[str, int], table, queries: dict[str, str], idle_rate: float,
                        runs: int) -> None:  # fmt: skip
    """Each query alone, the fleet's and then the closer look's (Prometheus CPU, series and bytes of its answer,
    asked uncompressed and gzipped, alternately), then this process's CPU per step of the evaluation."""
    import json

    def ask(promql: str, encoding: str) -> tuple[float, bytes]:
        cpu0, start = prometheus_cpu_s(url), time.monotonic()
        resp = requests.get(f"{url}/api/v1/query", params={"query": promql}, headers={"Accept-Encoding": encoding},
                            timeout=120)  # fmt: skip
        resp.raise_for_status()
        return prometheus_cpu_s(url) - cpu0 - idle_rate * (time.monotonic() - start), resp.content

    print("  where the time goes, each query alone (Prometheus CPU, medians of runs; identity vs gzip):")
    answers: dict[str, bytes] = {}

    def decoded(names) -> dict[str, list]:
        return {name: json.loads(answers[name])["data"]["result"] for name in names}

    def each_alone(batch: dict[str, str]) -> None:
        for name, promql in batch.items():
            plain, zipped = [], []
            for _ in range(runs):
                cpu, answers[name] = ask(promql, "identity")
                plain.append(cpu)
                zipped.append(ask(promql, "gzip")[0])
            series = len(decoded([name])[name])
            cpu = f"{statistics.median(plain):.2f} s uncompressed, {statistics.median(zipped):.2f} s gzipped"
            print(f"    {name:<27} {series:>6} series, {len(answers[name]) / 2**20:5.1f} MiB: Prometheus CPU {cpu}")

    each_alone(queries)
    each_alone(health.closer_look(decoded(queries), expected, table).queries)  # the per-GPU questions left
    floor_cpu = statistics.median([ask(floor_query(queries), "identity")[0] for _ in range(runs)])
    print(f"    floor (count() of every series read): Prometheus CPU {floor_cpu:.2f} s")
    steps = {"decode JSON": 0.0, "closer look": 0.0, "readings and judging": 0.0, "report": 0.0}
    for _ in range(runs):
        t0 = time.process_time()
        results = decoded(answers)
        t1 = time.process_time()
        look = health.closer_look(results, expected, table)
        t2 = time.process_time()
        fleet = health.fleet_health(results, look, expected, table, time.time())
        t3 = time.process_time()
        report_of(fleet)
        t4 = time.process_time()
        for step, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            steps[step] += dt / runs
    print("  this process's CPU per step (means): " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in steps.items()))


def measure(
    tmp: Path, node_count: int, gpus: int, runs: int, repeat: int, scrape: str, idle_s: float, profile: bool
) -> Measured:
    nodes = {f"node-{i:04d}": (gpus, MODEL) for i in range(node_count)}
    total = node_count * gpus
    sim, prom = DcgmSim(tmp / f"dcgm-{node_count}"), PrometheusLab(tmp / f"prometheus-{node_count}")
    try:
        t0 = time.monotonic()
        sim.up(nodes)
        sim.set_value(*SICK, "XID_ERRORS", 79)
        prom.up(listen="127.0.0.1:0", targets=sim.targets(), scrape_interval=scrape, timeout=60)
        deadline, seen = time.monotonic() + 300, 0
        while time.monotonic() < deadline:
            seen = int(float((prom.query("count(DCGM_FI_DEV_GPU_TEMP)") or [{"value": [0, "0"]}])[0]["value"][1]))
            if seen >= total:
                break
            time.sleep(2)
        print(f"{node_count} nodes x {gpus} GPUs: all {seen} GPUs scraped after {time.monotonic() - t0:.1f} s "
              f"(scrape {scrape})", flush=True)  # fmt: skip
        if seen < total:
            raise RuntimeError("not every GPU was scraped in time; the numbers would be wrong")

        config = parse_config('k8s_cluster_nodes: [{ip: "10.0.0.1", role: [control-plane, etcd]}]\n')  # thresholds
        table = health.resolve_thresholds(config.health.thresholds)
        queries = health.fleet_queries(table)
        # Connected as the gpu-health flow connects (tasks.prometheus.prometheus: answers uncompressed).
        pc = prom_tasks.prometheus(config.model_copy(update={"prometheus_url": prom.url}), timeout_s=120)
        expected = {n: gpus for n in nodes}

        prom0, idle_start = prometheus_cpu_s(prom.url), time.monotonic()
        time.sleep(idle_s)
        scraping_rate = (prometheus_cpu_s(prom.url) - prom0) / (time.monotonic() - idle_start)

        walls, client_cpu, prom_cpu, floor_walls, floor_cpu, at_once_walls, at_once_cpu = [], [], [], [], [], [], []
        fleet, sent = health.FleetHealth([]), 0

        def per_call(work, wall_s: list, prom_s: list, client_s: list | None = None) -> None:
            """`work` `repeat` times back to back; appends the wall, Prometheus CPU and (given a list) this process's
            CPU per call. Go's GC collects a query's garbage during later ones: over several calls each pays for
            its own, where a single call would pay for its neighbour's."""
            prom0, cpu0, start = prometheus_cpu_s(prom.url), time.process_time(), time.monotonic()
            for _ in range(repeat):
                work()
            elapsed = time.monotonic() - start
            wall_s.append(elapsed / repeat)
            prom_s.append((prometheus_cpu_s(prom.url) - prom0 - scraping_rate * elapsed) / repeat)
            if client_s is not None:
                client_s.append((time.process_time() - cpu0) / repeat)

        def evaluation() -> None:
            nonlocal fleet, sent
            fleet, sent, _ = gpuforge_evaluation(pc, expected, table, queries)

        parts = [
            lambda: per_call(evaluation, walls, prom_cpu, client_cpu),
            lambda: per_call(lambda: prom_tasks.query(pc, floor_query(queries)), floor_walls, floor_cpu),
            lambda: per_call(
                lambda: gpuforge_evaluation(pc, expected, table, queries, len(queries)), at_once_walls, at_once_cpu
            ),
        ]
        for run in range(runs):  # alternating, the order turned each run
            for part in parts[run % 3 :] + parts[: run % 3]:
                part()

        if profile:
            where_the_time_goes(pc, prom.url, expected, table, queries, scraping_rate, runs)
        tracemalloc.start()
        gpuforge_evaluation(pc, expected, table, queries)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return Measured(
            gpus=total,
            queries=sent,
            wall_s=statistics.median(walls),
            prom_cpu_s=statistics.median(prom_cpu),
            client_cpu_s=statistics.median(client_cpu),
            floor_prom_cpu_s=statistics.median(floor_cpu),
            floor_wall_s=statistics.median(floor_walls),
            at_once_wall_s=statistics.median(at_once_walls),
            at_once_prom_cpu_s=statistics.median(at_once_cpu),
            peak_mb=peak / 2**20,
            unhealthy=[(v.node, v.gpu, v.verdict.value) for v in fleet.verdicts if v.verdict != Verdict.HEALTHY],
            looked_at=len(fleet.verdicts),
        )
    finally:
        prom.down()
        sim.down()


def extrapolate(small: Measured, big: Measured, field: str) -> float:
    """The straight line through the two sizes, read at TARGET_GPUS."""
    y0, y1 = getattr(small, field), getattr(big, field)
    return y1 + (y1 - y0) / (big.gpus - small.gpus) * (TARGET_GPUS - big.gpus)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,1024", help="node counts")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--runs", type=int, default=6, help="a multiple of 3: each of the three orders equally often")
    ap.add_argument("--repeat", type=int, default=3, help="calls back to back per measurement (each pays its own GC)")
    ap.add_argument("--scrape", default="15s", help="Prometheus scrape interval (dcgm-exporter's default 15s)")
    ap.add_argument("--idle", type=float, default=15, help="seconds to measure Prometheus's scraping CPU over")
    ap.add_argument("--profile", action="store_true", help="also print where the time goes, per query and step")
    args = ap.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="health-bench-") as tmp:
        for node_count in (int(n) for n in args.sizes.split(",")):
            m = measure(Path(tmp), node_count, args.gpus, args.runs, args.repeat, args.scrape, args.idle, args.profile)
            results.append(m)
            print(f"  gpuforge: {m.queries} PromQL queries (goal <= 10), wall {m.wall_s:.2f} s, Prometheus CPU "
                  f"{m.prom_cpu_s:.2f} s, its own CPU {m.client_cpu_s * 1000:.0f} ms = "
                  f"{m.client_cpu_s * 1000 * 8192 / m.gpus:.0f} ms per 8,192 GPUs (goal <= 100), peak memory "
                  f"{m.peak_mb:.0f} MB (tracemalloc peak, separate run; goal <= 300 MB at 8,192 GPUs)")  # fmt: skip
            print(f"  floor (count() over every series read): Prometheus CPU {m.floor_prom_cpu_s:.2f} s, wall "
                  f"{m.floor_wall_s:.2f} s -> gpuforge/floor in Prometheus CPU "
                  f"{m.prom_cpu_s / m.floor_prom_cpu_s:.2f}x (goal <= 1.5), in wall "
                  f"{m.wall_s / m.floor_wall_s:.2f}x (medians of {args.runs})")  # fmt: skip
            print(f"  the same evaluation, all queries at once: Prometheus CPU {m.at_once_prom_cpu_s:.2f} s "
                  f"({m.at_once_prom_cpu_s / m.floor_prom_cpu_s:.2f}x the floor), "
                  f"wall {m.at_once_wall_s:.2f} s")  # fmt: skip
            print(f"  injected XID 79 on {SICK[0]} GPU {SICK[1]}; not healthy: {m.unhealthy}; GPUs judged one by one: "
                  f"{m.looked_at}, the other {m.gpus - m.looked_at} counted healthy per node", flush=True)  # fmt: skip
    if len(results) >= 2:
        small, big = results[0], results[-1]
        print(f"extrapolated linearly from {small.gpus} and {big.gpus} GPUs to {TARGET_GPUS:,} GPUs: gpuforge CPU "
              f"{extrapolate(small, big, 'client_cpu_s'):.2f} s, peak memory {extrapolate(small, big, 'peak_mb'):.0f}"
              f" MB; Prometheus CPU {extrapolate(small, big, 'prom_cpu_s'):.1f} s vs floor "
              f"{extrapolate(small, big, 'floor_prom_cpu_s'):.1f} s")  # fmt: skip
    return 0 if all(m.unhealthy == [(*SICK, "unhealthy")] for m in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
