"""The desired cluster, worked out once from the validated config: what every consumer reads instead of deriving
it again -- `plan`, each install phase, `validate`, `drift`, `gpu-health` (fleet check and release), the alert rules
and `gpuforge probe --config`.

Pure domain code (no Prefect, no clients). A flow run builds one :class:`DesiredState` and hands it down; the node
facts are also plain functions of the config (:func:`desired_nodes`, :func:`expected_gpu_counts`), for code that
needs one fact without the rest.

Where each fact is computed (the one place):

    node names                        config.name_nodes
    roles, Kubespray groups           config.Node (is_control_plane, is_etcd, is_worker, is_gpu)
    expected GPUs per node            expected_gpu_counts: the configured gpu_count, else the count recorded
                                      on the node at install (INSTALLED_GPU_COUNT, read by
                                      learned_gpu_counts), else None ("at least one")
    Slurm membership                  desired_nodes (in_slurm: slurm enabled, a GPU node, not `slurm: false`)
    Slurm NodeSets                    render.nodeset_name, render.gpu_nodesets
    labels, taints gpuforge owns      render.node_labels, render.node_taints
    releases: chart, version, values  render.render_releases (pins + the config's overrides)
    release namespaces                pins.release_namespace (the config cannot move a release)
    thresholds per GPU family         health.resolve_thresholds
    the GPU alert rules               plan.alert_rules (thresholds, namespace, expected GPUs of one state)
    "the GPU Operator is ready"       checks.cluster_policy_ready
    install phases                    phases.INSTALL_PHASES

Why the recorded count, not the live allocatable one, for a node the config leaves open: the gpu-operator phase
records what it found when the node first offered its GPUs; that is the count install rendered Slurm's NodeSet
with, and the count drift and health compare against. The live allocatable count is an observation to compare
with it: were it the source, a GPU lost after install would silently shrink the node's Slurm gres on the next
install and vanish from drift and health.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpuforge import health, render
from gpuforge.config import Config, NamedNode
from gpuforge.health import Thresholds
from gpuforge.pins import release_namespace

# The GPU count the gpu-operator phase found on a node whose config leaves it open, recorded on the node.
INSTALLED_GPU_COUNT = "gpuforge.io/installed-gpu-count"
MONITORING_RELEASE = render.MONITORING_RELEASE
GPU_OPERATOR_RELEASE = "gpu-operator"
SLURM_RELEASE = "slurm"


@dataclass(frozen=True)
class DesiredNode:
    name: str
    ip: str
    roles: tuple[str, ...]
    is_gpu: bool
    is_control_plane: bool
    is_etcd: bool
    is_worker: bool
    # GPUs the node must offer: configured, else recorded at install; None: at least one (not learned yet).
    expected_gpus: int | None
    gpu_model: str | None
    # A GPU node in a Slurm NodeSet (the config's `slurm: false` keeps it out), and that NodeSet's chart key.
    in_slurm: bool
    nodeset: str | None
    labels: Mapping[str, str]
    taints: tuple[str, ...]


@dataclass(frozen=True)
class NodeSet:
    """One Slinky NodeSet: GPU nodes with the same GPU count (a NodeSet has one gres)."""

    name: str
    nodes: tuple[str, ...]
    # GPUs per node in its gres; None while no node of it has a known count (rendered as gpu:1).
    gpus: int | None


def _annotations(node: Any) -> Mapping[str, str]:
    """A live node's annotations: tasks.kube.NodeState and the drift flow's node dicts both carry them."""
    notes = node.get("annotations") if isinstance(node, Mapping) else getattr(node, "annotations", None)
    return notes or {}


def learned_gpu_counts(config: Config, live_nodes: Mapping[str, Any]) -> dict[str, int]:
    """GPU counts of the nodes the config leaves open, as the gpu-operator phase recorded them on the nodes.
    `live_nodes` maps node names to objects or dicts with `annotations`."""
    out = {}
    for gpu in config.gpu_nodes:
        recorded = str(_annotations(live_nodes.get(gpu.name)).get(INSTALLED_GPU_COUNT, ""))
        if gpu.spec.gpu_count is None and recorded.isdigit():
            out[gpu.name] = int(recorded)
    return out


def expected_gpu_counts(config: Config, learned: Mapping[str, int] | None = None) -> dict[str, int | None]:
    """GPU node -> GPUs it must offer: the configured count, else the learned one, else None (at least one)."""
    return {g.name: g.spec.gpu_count or (learned or {}).get(g.name) for g in config.gpu_nodes}


def desired_nodes(config: Config, learned: Mapping[str, int] | None = None) -> tuple[DesiredNode, ...]:
    """Every node of the config, in file order, with the facts gpuforge derives for it."""
    expected = expected_gpu_counts(config, learned)
    slurm = config.enabled("slurm")

    def node(named: NamedNode) -> DesiredNode:
        spec = named.spec
        in_slurm = slurm and spec.is_gpu and spec.slurm
        return DesiredNode(
            name=named.name,
            ip=spec.ip,
            roles=tuple(str(r) for r in spec.role),
            is_gpu=spec.is_gpu,
            is_control_plane=spec.is_control_plane,
            is_etcd=spec.is_etcd,
            is_worker=spec.is_worker,
            expected_gpus=expected.get(named.name),
            gpu_model=spec.gpu_model,
            in_slurm=in_slurm,
            nodeset=render.nodeset_name(named) if in_slurm else None,
            labels=render.node_labels(named, config.cluster_name),
            taints=tuple(render.node_taints(named)),
        )

    return tuple(node(n) for n in config.nodes)


@dataclass(frozen=True)
class DesiredState:
    """The desired cluster. Build it with :func:`build`; read it, never re-derive what it holds."""

    config: Config
    nodes: tuple[DesiredNode, ...]
    # GPU counts recorded at install for nodes the config leaves open (what the releases were rendered with).
    learned_gpus: Mapping[str, int]
    # Helm releases of the enabled services, in install order, with their final values.
    releases: tuple[render.Release, ...]
    # Health thresholds per GPU model family, the config's overrides applied.
    thresholds: Mapping[str, Thresholds]
    nodesets: Mapping[str, NodeSet]

    @property
    def cluster(self) -> str:
        return self.config.cluster_name

    def node(self, name: str) -> DesiredNode | None:
        return next((n for n in self.nodes if n.name == name), None)

    @property
    def gpu_nodes(self) -> tuple[DesiredNode, ...]:
        return tuple(n for n in self.nodes if n.is_gpu)

    @property
    def slurm_nodes(self) -> tuple[DesiredNode, ...]:
        """GPU nodes in a Slurm NodeSet (none when the slurm service is disabled)."""
        return tuple(n for n in self.nodes if n.in_slurm)

    def expected_gpus(self) -> dict[str, int | None]:
        """GPU node -> GPUs it must offer (None: at least one)."""
        return {n.name: n.expected_gpus for n in self.gpu_nodes}

    def release(self, name: str) -> render.Release | None:
        return next((r for r in self.releases if r.name == name), None)

    def service_releases(self, service: str) -> list[render.Release]:
        return [r for r in self.releases if r.service == service]

    def namespace(self, release: str) -> str:
        return release_namespace(release)


def build(config: Config, learned: Mapping[str, int] | None = None) -> DesiredState:
    """The desired state of a validated config. `learned`: GPU counts recorded at install for nodes the config
    leaves open (:func:`learned_gpu_counts`); without it (plan, before install) such a node expects >= 1 GPU."""
    learned = dict(learned or {})
    nodesets = {
        name: NodeSet(name, tuple(entry["nodes"]), entry["gpus"])
        for name, entry in render.gpu_nodesets(config, learned).items()
    }
    return DesiredState(
        config=config,
        nodes=desired_nodes(config, learned),
        learned_gpus=learned,
        releases=tuple(render.render_releases(config, learned)),
        thresholds=health.resolve_thresholds(config.health.thresholds),
        nodesets=nodesets if config.enabled("slurm") else {},
    )
