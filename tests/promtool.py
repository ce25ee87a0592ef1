"""Evaluate PromQL and alert rules for real, without a server: `promtool test rules` loads synthetic series into
Prometheus's own engine. promtool reports only what differs from the expectation, so each expression and alert is
expected to give nothing, and what it gave is read back from the report."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

PROMTOOL = Path("/usr/bin/promtool")

_SAMPLE = re.compile(r"\{([^{}]*)\} ([^\s,]+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _labels(text: str) -> dict[str, str]:
    return {k: json.loads(f'"{v}"') for k, v in _LABEL.findall(text)}


def evaluate(
    tmp: Path,
    series: dict[str, str],
    exprs: list[str],
    eval_time: str,
    *,
    groups: list[dict[str, Any]] | None = None,
    interval: str = "15s",
) -> tuple[dict[str, list[dict]], dict[str, list[dict[str, str]]]]:
    """Load `series` (promtool's series -> values notation, one sample per `interval`), then at `eval_time` evaluate
    each expression and, where `groups` are given, every alert rule in them. Returns (the answer of each expression
    in the shape of Prometheus's instant-query API, the labels of every alert firing per alert name)."""
    rules = tmp / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups or []}))
    alertnames = [r["alert"] for g in groups or [] for r in g["rules"] if "alert" in r]
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": interval,
        "tests": [
            {
                "interval": interval,
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "promql_expr_test": [{"expr": e, "eval_time": eval_time, "exp_samples": []} for e in exprs],
                "alert_rule_test": [{"eval_time": eval_time, "alertname": a, "exp_alerts": []} for a in alertnames],
            }
        ],
    }
    path = tmp / "test.yml"
    path.write_text(yaml.safe_dump(test, width=1 << 20))
    run = subprocess.run([str(PROMTOOL), "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    report = out.partition("FAILED:")[2]
    if run.returncode != 0 and not re.match(r"\n    (expr|alertname): ", report):
        raise AssertionError(f"promtool could not run the test:\n{out}")
    answers: dict[str, list[dict]] = {e: [] for e in exprs}
    alerts: dict[str, list[dict[str, str]]] = {a: [] for a in alertnames}
    # The report: one block per failed expectation, "expr: <Go-quoted>, time: ..." or "alertname: X, time: ...".
    for block in re.split(r"\n    (?=expr: |alertname: )", report)[1:]:
        head, _, body = block.partition("\n")
        if head.startswith("expr: "):
            expr = json.loads(head[len("expr: ") : head.rindex(", time:")])
            got = body.split("got:", 1)[1]
            answers[expr] = [{"metric": _labels(m), "value": [0, v]} for m, v in _SAMPLE.findall(got)]
        else:
            name = head[len("alertname: ") : head.index(",")]
            got = body.split("got:", 1)[1]
            alerts[name] = [_labels(m) for m in re.findall(r"Labels:\{([^{}]*)\}", got)]
    return answers, alerts
