"""drift (hourly): compare the cluster with the config, read-only.

Reads with a constant number of calls whatever the node count -- one node list, one Helm release list (plus
Helm's reads of each gpuforge release: status, chart and values), one ClusterPolicy get, one NodeSet list, one
slurmd pod list and one `sinfo` -- and hands everything to gpuforge.drift. Never changes the cluster.

Exit codes in the report (helm-diff / Terraform): 0 no drift, 2 drift found, 1 error (something could not
be read: the items found are still listed). The run fails (and notifies) unless the exit code is 0.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.common import ClusterParams, desired_state, publish_markdown, publish_table, run_name
from flows.notify import notify_failure
from gpuforge import checks, desired
from gpuforge import drift as core
from gpuforge.config import Config
from gpuforge.desired import SLURM_RELEASE
from gpuforge.pins import release_namespace
from tasks import kube
from tasks import slurm as slurm_tasks


class DriftFound(RuntimeError):
    """Drift was found (exit 2) or something could not be read (exit 1); `report` is the full report."""

    def __init__(self, report: dict[str, Any], message: str):
        self.report = report
        super().__init__(message)


def _node_dicts(kubeconfig: Path) -> dict[str, dict[str, Any]]:
    """Every node in one list call, as the plain fields drift compares (tasks.kube.NodeState's)."""
    return {fields["name"]: fields for fields in kube.list_node_fields(kubeconfig)}


def read_live(config: Config, *, nodes_reader=_node_dicts) -> tuple[core.LiveState, dict[str, int], list[str]]:
    """Everything drift compares, in a fixed number of calls: (live state, calls per kind, errors).

    A part that cannot be read stays None in the live state (not compared) and its error is returned."""
    kubeconfig = config.kubeconfig_path()
    calls = {"kubernetes": 0, "helm": 0, "slurm": 0}
    errors: list[str] = []

    def attempt(kind: str, what: str, fn):
        calls[kind] += 1
        try:
            return fn(), True
        except Exception as exc:  # noqa: BLE001 - reported as an error (exit 1), the rest is still compared
            errors.append(
                f"{what}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}"
            )
            return None, False

    nodes, ok = attempt("kubernetes", "list nodes", lambda: nodes_reader(kubeconfig))
    if not ok:
        return core.LiveState(nodes={}), calls, errors
    live = core.LiveState(nodes=nodes)
    if any(config.enabled(service) for service in config.deepops_services.by_key()):
        from tasks.helm import read_releases

        # One list of Helm's release records (the Secrets Helm stores them in) answers every release.
        live.releases, _ = attempt("helm", "helm releases", lambda: read_releases(kubeconfig))
    if config.enabled("gpu-operator"):
        live.cluster_policy, live.cluster_policy_read = attempt(
            "kubernetes",
            "get ClusterPolicy",
            lambda: kube.get_custom(kubeconfig, *checks.CLUSTER_POLICY_API, checks.CLUSTER_POLICY),
        )
    if config.enabled("slurm"):
        ns = release_namespace(SLURM_RELEASE)
        live.nodesets, _ = attempt(
            "kubernetes",
            "list NodeSets",
            lambda: kube.list_custom(kubeconfig, *slurm_tasks.NODESET_API, ns),
        )
        pods, ok = attempt("kubernetes", "list slurmd pods", lambda: _slurmd_pods(kubeconfig, ns))
        live.slurm_pods = pods or []
        live.slurm_nodes, _ = attempt("slurm", "sinfo", lambda: slurm_tasks.Slurm(config, kubeconfig).nodes())
    return live, calls, errors


def _slurmd_pods(kubeconfig: Path, namespace: str) -> list[dict[str, str]]:
    from tasks.kube import slurm_pods

    return slurm_pods(kubeconfig, namespace)


def evaluate(config: Config, **kwargs) -> dict[str, Any]:
    """Read and compare (no Prefect needed): the report dict the flow returns."""
    started = time.monotonic()
    live, calls, errors = read_live(config, **kwargs)
    report = core.detect(desired.build(config, desired.learned_gpu_counts(config, live.nodes)), live)
    report["errors"] = errors
    report["api_calls"] = calls
    if errors:
        report["exit_code"] = core.EXIT_ERROR
        report["summary"] = f"{report['summary']}; could not read: {'; '.join(errors)}"
    report["seconds"] = round(time.monotonic() - started, 3)
    return report


@flow(name="drift", flow_run_name=run_name("drift"), on_failure=[notify_failure], on_crashed=[notify_failure])
def drift(params: ClusterParams) -> dict:
    logger = get_run_logger()
    config = desired_state(params).config
    report = evaluate(config)
    publish_table(
        "drift-report", core.table_rows(report["items"]), f"Drift of {config.cluster_name}: {report['summary']}"
    )
    publish_markdown("drift-summary", summary_markdown(report), f"Drift of {config.cluster_name}")
    logger.info("drift: %s (%s)", report["summary"], report["api_calls"])
    if report["exit_code"] != core.EXIT_NO_DRIFT:
        lines = [f"{config.cluster_name}: {report['summary']}"]
        lines += [f"{i['path']}: desired {i['desired']!r}, live {i['live']!r}" for i in report["items"][:5]]
        raise DriftFound(report, "\n".join(lines))
    return report


def summary_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Drift of `{report['cluster']}`", "", f"**exit {report['exit_code']}** -- {report['summary']}", ""]
    if report["errors"]:
        lines += ["## Could not read", "", *(f"- {e}" for e in report["errors"]), ""]
    if report["items"]:
        lines += ["| severity | path | desired | live |", "|---|---|---|---|"]
        for row in core.table_rows(report["items"]):
            lines.append(f"| {row['severity']} | `{row['path']}` | {row['desired']} | {row['live']} |")
    if report["ignored"]:
        lines += ["", f"{len(report['ignored'])} ignored by `drift.ignore`:"]
        lines += [f"- `{i['path']}`" for i in report["ignored"]]
    lines += ["", f"API calls: {report['api_calls']}"]
    return "\n".join(lines) + "\n"
