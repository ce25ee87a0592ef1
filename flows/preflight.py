"""Phase 1, preflight: run playbooks/preflight.yml over SSH on every node and judge what it found."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.common import ClusterParams, desired_state, publish_table, run_name, state_dir
from gpuforge import preflight as rules
from gpuforge.plan import write_plan
from tasks.ansible_tasks import collect_preflight_facts, verify_host_keys


@flow(name="preflight", flow_run_name=run_name("preflight"), log_prints=False)
def preflight(params: ClusterParams) -> str:
    logger = get_run_logger()
    state = desired_state(params, connects=True)
    config = state.config
    inventory_dir = state_dir(config) / "inventory"
    write_plan(state, inventory_dir)

    host_keys = verify_host_keys(config)
    refused = [name for name, verdict in host_keys.items() if verdict.refused]
    facts, why_unreachable = collect_preflight_facts(config, inventory_dir / "hosts.yaml", skip=refused)
    results = rules.judge_preflight(config, facts, host_keys, why_unreachable)
    publish_table("preflight-report", rules.table_rows(results), f"Preflight of {config.cluster_name}: a row per node")

    unreachable = [name for name, f in facts.items() if f is None and name not in refused]
    if unreachable:
        logger.error("unreachable: %s", ", ".join(unreachable))
    if failures := rules.blocking_failures(results):
        raise RuntimeError(f"preflight found {len(failures)} blocking problem(s): " + "; ".join(failures))
    warnings = sum(1 for checks in results.values() for c in checks.values() if not c.ok)
    return f"{len(results)} nodes passed" + (f", {warnings} warning(s)" if warnings else "")
