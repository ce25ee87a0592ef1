"""The fleet: one set of Prefect deployments per cluster folder, generated into prefect.yaml.

Every `deployments/<env>/config.yml` is a cluster. WORKFLOWS is the one table of what gpuforge deploys for
each of them (flow, entrypoint, schedule, concurrency); `prefect_yaml()` crosses the two into the deployments
`<flow>/<env>` of prefect.yaml, which `prefect deploy --all` registers. Adding a cluster = adding a folder,
then regenerating:

    python -m gpuforge.fleet            # rewrite prefect.yaml from deployments/*/config.yml
    python -m gpuforge.fleet --check    # exit 1 when the committed prefect.yaml is not the generated one

No Prefect import here: this is data turned into YAML; a test deploys the result against a real server.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from gpuforge.config import ConfigError, load_config

WORK_POOL = "gpuforge"
ENV_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


@dataclass(frozen=True)
class Workflow:
    """What gpuforge deploys once per cluster."""

    flow: str  # the Prefect flow name: its deployments are `<flow>/<env>`
    entrypoint: str
    tag: str
    description: str  # {cluster}, {env}, {timezone} are filled in
    cron: str | None = None  # in the cluster's own time zone (config.yml `timezone`)
    concurrency: int = 1  # runs of one deployment at a time
    collision: str = "CANCEL_NEW"  # what a run beyond the limit does (Prefect: ENQUEUE or CANCEL_NEW)


WORKFLOWS: tuple[Workflow, ...] = (
    Workflow(
        "install",
        "flows/install.py:install",
        "install",
        "Install (or converge) cluster {cluster} from deployments/{env}/config.yml; one install per cluster "
        "at a time (Prefect limit cluster-{cluster}).",
    ),
    Workflow("validate", "flows/validate.py:validate", "validate", "Validate cluster {cluster} on demand."),
    Workflow(
        "upgrade",
        "flows/upgrade.py:upgrade",
        "upgrade",
        "Upgrade cluster {cluster} to the pins (deployments/{env}/config.yml), one validated step at a time "
        "(charts, then Kubernetes node by node); a failed chart step is rolled back, a failed node stays out of "
        "service. Shares the Prefect limit cluster-{cluster} with install.",
    ),
    Workflow(
        "gpu-health",
        "flows/gpu_health.py:gpu_health",
        "health",
        "Nightly GPU health check of cluster {cluster}, at 02:00 {timezone}.",
        cron="0 2 * * *",
    ),
    Workflow(
        "drift",
        "flows/drift.py:drift",
        "drift",
        "Hourly drift detection of cluster {cluster} (read-only).",
        cron="0 * * * *",
    ),
)


@dataclass(frozen=True)
class Cluster:
    env: str  # the folder name: deployment name and tag
    config: str  # path of its config.yml as the deployment passes it (relative to the repository root)
    name: str  # config.yml cluster_name: run names, the cluster lock, a tag
    timezone: str


class FleetError(ValueError):
    pass


def clusters(config_paths: list[Path], root: Path) -> list[Cluster]:
    """Each config read and validated (a broken config gets no deployments, and says why)."""
    found, problems, names = [], [], {}
    for path in config_paths:
        env = path.parent.name
        if not ENV_NAME.match(env):
            problems.append(f"{path}: folder name {env!r} must be lowercase letters, digits and '-' (a tag)")
            continue
        try:
            config = load_config(path)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if config.cluster_name in names:
            problems.append(
                f"{path}: cluster_name {config.cluster_name!r} is also the cluster of {names[config.cluster_name]}; "
                "each cluster needs its own name (it names the cluster lock, the runs and the state folder)"
            )
            continue
        names[config.cluster_name] = path
        try:
            shown = path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            shown = str(path.resolve())
        found.append(Cluster(env, shown, config.cluster_name, config.timezone))
    envs = [c.env for c in found]
    for env in sorted({e for e in envs if envs.count(e) > 1}):
        problems.append(f"two cluster folders are named {env!r}; deployment names would collide")
    if problems:
        raise FleetError("\n".join(problems))
    return found


def discover(root: Path) -> list[Path]:
    return sorted((root / "deployments").glob("*/config.yml"))


def _q(value) -> str:
    return json.dumps(value)  # JSON scalars and flow collections are YAML


def deployment(workflow: Workflow, cluster: Cluster) -> list[str]:
    desc = workflow.description.format(cluster=cluster.name, env=cluster.env, timezone=cluster.timezone)
    lines = [
        f"  - name: {cluster.env}",
        f"    entrypoint: {workflow.entrypoint}",
        f"    description: {_q(desc)}",
        f"    parameters: {{params: {{config: {_q(cluster.config)}}}}}",
        f"    tags: [{workflow.tag}, {_q(cluster.env)}, {_q('cluster:' + cluster.name)}]",
    ]
    if workflow.cron:
        lines.append(f"    schedules: [{{cron: {_q(workflow.cron)}, timezone: {_q(cluster.timezone)}, active: true}}]")
    lines += [
        f"    concurrency_limit: {{limit: {workflow.concurrency}, collision_strategy: {workflow.collision}}}",
        "    work_pool: *pool",
    ]
    return lines


HEADER = """\
# GENERATED by `python -m gpuforge.fleet` from deployments/*/config.yml and gpuforge/fleet.py (WORKFLOWS):
# edit those and regenerate; tests/test_fleet.py fails when this file is stale.
# One deployment set per cluster folder: install/<env>, validate/<env>, upgrade/<env>, gpu-health/<env> (02:00
# in the cluster's time zone), drift/<env> (hourly). Each deployment allows one run at a time (CANCEL_NEW); the
# install and upgrade flows also hold the cluster-wide Prefect concurrency limit cluster-<cluster_name>.
#   prefect work-pool create gpuforge --type process
#   prefect worker start --pool gpuforge            (from the repository root, on every worker host)
#   prefect deploy --all
#   prefect deployment run install/prod --watch
# Runs execute in the folder `prefect deploy` ran in (pull is omitted: Prefect adds set_working_directory).
name: gpuforge
prefect-version: 3.9.1
build: null
push: null

definitions:
  work_pool: &pool
    name: {pool}
    work_queue_name: default

deployments:
"""


def prefect_yaml(found: list[Cluster]) -> str:
    out = HEADER.format(pool=WORK_POOL)
    for cluster in found:
        out += f"  # --- cluster {cluster.name} (deployments/{cluster.env}) ---\n"
        for workflow in WORKFLOWS:
            out += "\n".join(deployment(workflow, cluster)) + "\n"
    return out


def generate(root: Path) -> str:
    return prefect_yaml(clusters(discover(root), root))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuforge.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--check", action="store_true", help="exit 1 if prefect.yaml is not the generated one")
    args = parser.parse_args(argv)
    try:
        text = generate(args.root)
    except FleetError as exc:
        print(exc, file=sys.stderr)
        return 2
    target = args.root / "prefect.yaml"
    if args.check:
        if not target.exists() or target.read_text() != text:
            print(f"{target} is stale: run `python -m gpuforge.fleet`", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target}: {text.count('  - name: ')} deployments", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
