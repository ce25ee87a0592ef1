"""Validation rules as plain functions: what "the platform works" means, check by check.

The validate flow reads the cluster, Prometheus and Slurm and hands the raw answers here. Each function
returns CheckResult rows (check, target, result, detail); nothing is `ok` that could not be checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from gpuforge.gres import GresError, gpu_count
from gpuforge.health import node_of
from gpuforge.remediation import SlurmNode

PASS, FAIL, SKIP, ERROR = "pass", "fail", "skipped", "error"

# Series every GPU must export for monitoring, the dashboard and the health rules to work.
REQUIRED_DCGM_METRICS = (
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_MEMORY_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE",
)
PASSED_MARKER = "Test PASSED"


@dataclass(frozen=True)
class CheckResult:
    check: str
    target: str
    result: str
    detail: str = ""

    def row(self) -> dict[str, str]:
        return asdict(self)


def report(results: list[CheckResult]) -> dict[str, Any]:
    """The --json shape: {ok, failures, checks}; ok only when nothing failed and nothing errored."""
    checks = [r.row() for r in results]
    failures = [r.row() for r in results if r.result in (FAIL, ERROR)]
    return {"ok": bool(results) and not failures, "failures": failures, "checks": checks}


def counts(results: list[CheckResult]) -> dict[str, int]:
    """How many checks ended in each result, every result named (0 included): pass, fail, skipped, error."""
    return {k: sum(r.result == k for r in results) for k in (PASS, FAIL, SKIP, ERROR)}


def summary(results: list[CheckResult]) -> str:
    """'17 checks: 16 passed, 0 failed, 1 skipped, 0 could not run': a skipped check is no failure."""
    n = counts(results)
    return f"{len(results)} checks: {n[PASS]} passed, {n[FAIL]} failed, {n[SKIP]} skipped, {n[ERROR]} could not run"


def exit_code(results: list[CheckResult]) -> int:
    """0 all passed, 2 the environment prevented checking, 1 a check failed."""
    if any(r.result == ERROR for r in results):
        return 2
    return 1 if any(r.result == FAIL for r in results) else 0


def dcgm_coverage_query(metrics: tuple[str, ...] = REQUIRED_DCGM_METRICS) -> str:
    """One PromQL query for every GPU of every node: the timestamp of each required series' last sample.

    timestamp() drops the metric name, so each metric's timestamps carry it back in the `metric` label.
    """
    return " or ".join(f'label_replace(timestamp({m}), "metric", "{m}", "", "")' for m in metrics)


def dcgm_coverage(
    result: list[dict[str, Any]],
    expected: dict[str, int],
    now: float,
    max_age_s: float,
    metrics: tuple[str, ...] = REQUIRED_DCGM_METRICS,
) -> list[CheckResult]:
    """Judge the coverage query's answer: every expected node/GPU/metric present and fresh.

    `expected` maps node -> GPU count. Node names match the `Hostname`/`hostname` label case-insensitively,
    also when relabelled to `exported_*`. One row per node; the detail lists exactly what is missing/stale.
    """
    seen: dict[tuple[str, str, str], float] = {}
    lower = {n.lower(): n for n in expected}
    for item in result:
        labels = item.get("metric", {})
        node = lower.get((node_of(labels) or "").lower())
        if node is None:
            continue
        gpu = str(labels.get("gpu", labels.get("exported_gpu", "")))
        name = labels.get("metric", "")
        ts = float(item["value"][1])
        key = (node, gpu, name)
        seen[key] = max(ts, seen.get(key, 0.0))
    rows = []
    for node, count in expected.items():
        missing, stale = [], []
        for gpu in range(count):
            for metric in metrics:
                ts = seen.get((node, str(gpu), metric))
                if ts is None:
                    missing.append(f"gpu {gpu} {metric}")
                elif now - ts > max_age_s:
                    stale.append(f"gpu {gpu} {metric} ({now - ts:.0f}s old)")
        if not missing and not stale:
            rows.append(CheckResult("dcgm-metrics", node, PASS, f"{count} GPUs x {len(metrics)} series fresh"))
            continue
        parts = []
        if missing:
            parts.append(f"missing: {_compact(missing)}")
        if stale:
            parts.append(f"stale (> {max_age_s:.0f}s): {_compact(stale)}")
        rows.append(CheckResult("dcgm-metrics", node, FAIL, "; ".join(parts)))
    return rows


def _compact(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def smoke_result(node: str, phase: str, log: str, events: list[str]) -> CheckResult:
    """A CUDA smoke pod passed when it Succeeded and its log says `Test PASSED`."""
    if phase == "Succeeded" and PASSED_MARKER in log:
        return CheckResult("cuda-smoke", node, PASS, "vectorAdd: Test PASSED")
    tail = " | ".join(log.strip().splitlines()[-5:]) or "(empty log)"
    why = f"phase {phase}" + ("" if phase != "Succeeded" else f", no '{PASSED_MARKER}' in the log")
    ev = ("; events: " + " | ".join(events[-5:])) if events else ""
    return CheckResult("cuda-smoke", node, FAIL, f"{why}; log: {tail}{ev}")


AVAILABLE_STATES = ("idle", "mixed", "allocated", "completing")


def slurm_node_results(nodes: Mapping[str, SlurmNode], expected: dict[str, int]) -> list[CheckResult]:
    """A row per expected Slurm node (from remediation.parse_sinfo): usable, and its gres holds exactly the
    expected GPUs."""
    rows = []
    for node, gpus in expected.items():
        if node not in nodes:
            rows.append(CheckResult("slurm-node", node, FAIL, "not known to Slurm (sinfo)"))
            continue
        state, gres = nodes[node].state, nodes[node].gres
        problems = []
        if state.rstrip("*~#!%$@^-") not in AVAILABLE_STATES:
            problems.append(f"state {state}")
        try:
            found = gpu_count(gres)
        except GresError as exc:
            problems.append(str(exc))
        else:
            if found != gpus:
                problems.append(f"gres {gres or 'none'} holds {found} GPUs, expected {gpus}")
        rows.append(
            CheckResult("slurm-node", node, FAIL if problems else PASS, "; ".join(problems) or f"{state}, gres {gres}")
        )
    return rows
