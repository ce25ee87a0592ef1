"""Prometheus verbs: connect (directly or through the Kubernetes API service proxy) and run instant queries."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import requests
from prefect import task
from prefect.cache_policies import NO_CACHE
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from gpuforge import health, metric_contract, pins, validation
from gpuforge.config import Config
from gpuforge.health import FleetHealth, Thresholds
from gpuforge.metric_contract import Contract
from gpuforge.render import PROMETHEUS_SERVICE
from gpuforge.validation import ERROR, CheckResult


class PrometheusUnreachable(RuntimeError):
    """Prometheus could not be asked; callers report this as "could not check", never as healthy."""


def prometheus(config: Config, timeout_s: float = 10) -> PrometheusConnect:
    """The config's prometheus_url, else kube-prometheus-stack's Service through the API server proxy."""
    if config.prometheus_url:
        return PrometheusConnect(url=config.prometheus_url, retry=Retry(total=1, backoff_factor=0.2), timeout=timeout_s)
    from tasks.kube import api_client

    conf = api_client(config.kubeconfig_path()).configuration
    session = requests.Session()
    if conf.cert_file:
        session.cert = (conf.cert_file, conf.key_file)
    session.verify = conf.ssl_ca_cert or True
    headers = {"Authorization": conf.api_key["authorization"]} if conf.api_key.get("authorization") else {}
    namespace = pins.release_namespace("kube-prometheus-stack")
    proxy = f"{conf.host}/api/v1/namespaces/{namespace}/services/{PROMETHEUS_SERVICE}:9090/proxy"
    return PrometheusConnect(
        url=proxy, headers=headers, session=session, timeout=timeout_s, retry=Retry(total=1, backoff_factor=0.2)
    )


def query(pc: PrometheusConnect, promql: str) -> list[dict]:
    try:
        return pc.custom_query(promql)
    except (requests.RequestException, PrometheusApiClientException) as exc:
        what = f"Prometheus at {_safe(pc.url)} did not answer {promql[:60]!r}"
        raise PrometheusUnreachable(f"{what}: {why(exc)}") from None


def scrape_interval_s(pc: PrometheusConnect, default: float = 15.0) -> float:
    """The longest scrape interval among active targets (freshness is judged against it)."""
    try:
        resp = pc._session.get(
            f"{pc.url}/api/v1/targets",
            params={"state": "active"},
            timeout=10,
            verify=pc._session.verify,
            headers=pc.headers,
        )
        targets = resp.json()["data"]["activeTargets"]
    except (requests.RequestException, KeyError, ValueError) as exc:
        raise PrometheusUnreachable(f"Prometheus at {_safe(pc.url)} did not list its targets: {why(exc)}") from None
    intervals = [_seconds(t.get("scrapeInterval", "")) for t in targets]
    intervals = [i for i in intervals if i]
    return max(intervals) if intervals else default


def why(exc: BaseException) -> str:
    """The cause of a failed request in a few words: the OS error (`[Errno 111] Connection refused`) or a
    timeout, not urllib3's "Max retries exceeded with url: <the whole URL-encoded query>"."""
    text = str(exc)
    if errno := re.search(r"\[Errno -?\d+\] [^'\")]+", text):
        return errno.group(0).strip()
    if isinstance(exc, requests.Timeout) or "timed out" in text:
        return f"timed out ({type(exc).__name__})"
    return re.sub(r" with url: \S+", "", text).splitlines()[0][:200] if text else type(exc).__name__


def _seconds(duration: str) -> float | None:
    total, matched = 0.0, False
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        matched = True
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total if matched else None


def _safe(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


@task(name="dcgm-metrics", cache_policy=NO_CACHE)
def dcgm_coverage(config: Config, expected: dict[str, int], contract: Contract) -> list[CheckResult]:
    """Every required DCGM series of every expected GPU present under `contract`'s names and younger than two
    scrape intervals."""
    try:
        pc = prometheus(config)
        interval = scrape_interval_s(pc)
        answer = query(pc, validation.dcgm_coverage_query())
    except PrometheusUnreachable as exc:
        return [CheckResult("dcgm-metrics", "prometheus", ERROR, str(exc))]
    return validation.dcgm_coverage(answer, expected, time.time(), max_age_s=2 * interval, contract=contract)


def evaluate_fleet(
    pc: PrometheusConnect,
    expected: dict[str, int | None],
    table: dict[str, Thresholds],
    queries: dict[str, str] | None = None,
    concurrency: int = 1,
    contract: Contract = metric_contract.PINNED,
    closely: Iterable[str] = (),
) -> tuple[FleetHealth, int]:
    """The fleet's health: the summarising fleet queries (`concurrency` at a time), then, about the nodes they
    cannot call healthy (and those in `closely`) alone, the per-GPU values, freshness and exact XIDs; returns
    (health, queries sent).

    One at a time by default, so that a shared Prometheus evaluates one of them at a time; bench/health_bench.py
    measures it side by side with all at once.

    Raises PrometheusUnreachable when any query cannot be answered."""
    queries = queries or health.fleet_queries(table, contract)
    results = _ask_all(pc, queries, concurrency)
    look = health.closer_look(results, expected, table, contract, closely)
    results.update(_ask_all(pc, look.queries, concurrency))
    return health.fleet_health(results, look, expected, table, time.time()), len(queries) + len(look.queries)


def _ask_all(pc: PrometheusConnect, queries: dict[str, str], concurrency: int) -> dict[str, list[dict]]:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {name: pool.submit(query, pc, q) for name, q in queries.items()}
        return {name: f.result() for name, f in futures.items()}
