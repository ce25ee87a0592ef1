"""The upgrade plan: what moving a live cluster to gpuforge's pins changes, read-only.

An upgrade is changing pins, so it is planned like an install: from the live state (Kubernetes server and kubelet
versions, each Helm release's chart and values, the CRDs the API server holds) and the targets (the config's
Kubernetes/Kubespray pins and the rendered Helm releases with their chart archives), :func:`plan` lists

* per component the live and the target version;
* the Kubernetes path, one minor at a time, each step through a Kubespray release that has checksums for its
  target and accepts its starting version (Kubespray refuses a cluster older than its ``kube_version_min_required``,
  the oldest key of its checksums);
* the CRDs that change between the cluster and the target charts (new CRDs, served/storage versions, schemas),
  and whether Helm applies them (a chart's ``crds/`` folder is installed once and never upgraded by Helm);
* API versions the target Kubernetes no longer serves that live objects (Helm manifests) still use, and CRD
  versions the target stops serving while objects may still be stored at them (``status.storedVersions``);
* the risks it knows: GPU driver/toolkit/device-plugin restarts on GPU nodes, dcgm-exporter metric-contract
  changes (:mod:`gpuforge.metric_contract`), Slinky CRD changes, node drains for Kubernetes steps.

Everything here is a plain function of plain data; :func:`chart_facts` reads a chart archive from disk (the
same `helm pull` file a chart mirror holds). Exit codes follow `gpuforge drift`: 0 nothing to do, 2 changes,
1 something could not be planned.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpuforge import metric_contract, pins
from gpuforge.render import Release, deep_merge

# The Kubernetes versions each Kubespray release has checksums for (the keys of kubelet_checksums in
# roles/kubespray_defaults/vars/main/checksums.yml of its release tarball; tests/test_upgrade.py reads both
# tarballs). The oldest key is also its `kube_version_min_required`: it upgrades nothing older.
KUBESPRAY_RELEASES: dict[str, tuple[str, ...]] = {
    "v2.30.0": (
        "1.34.3", "1.34.2", "1.34.1", "1.34.0",
        "1.33.7", "1.33.6", "1.33.5", "1.33.4", "1.33.3", "1.33.2", "1.33.1", "1.33.0",
        "1.32.11", "1.32.10", "1.32.9", "1.32.8", "1.32.7", "1.32.6", "1.32.5", "1.32.4", "1.32.3", "1.32.2",
        "1.32.1", "1.32.0",
    ),
    pins.KUBESPRAY_VERSION: pins.KUBE_VERSIONS,
}  # fmt: skip

# Built-in API versions each Kubernetes minor stopped serving (Kubernetes' "Deprecated API Migration Guide";
# it lists no removal for 1.33, 1.34 or 1.35). A Kubernetes step into that minor breaks every object and every
# client (Helm release manifests included) still using them.
REMOVED_APIS: dict[int, tuple[tuple[str, str], ...]] = {
    25: (
        ("batch/v1beta1", "CronJob"),
        ("discovery.k8s.io/v1beta1", "EndpointSlice"),
        ("events.k8s.io/v1beta1", "Event"),
        ("autoscaling/v2beta1", "HorizontalPodAutoscaler"),
        ("policy/v1beta1", "PodDisruptionBudget"),
        ("policy/v1beta1", "PodSecurityPolicy"),
        ("node.k8s.io/v1beta1", "RuntimeClass"),
    ),
    26: (
        ("flowcontrol.apiserver.k8s.io/v1beta1", "FlowSchema"),
        ("flowcontrol.apiserver.k8s.io/v1beta1", "PriorityLevelConfiguration"),
        ("autoscaling/v2beta2", "HorizontalPodAutoscaler"),
    ),
    27: (("storage.k8s.io/v1beta1", "CSIStorageCapacity"),),
    29: (
        ("flowcontrol.apiserver.k8s.io/v1beta2", "FlowSchema"),
        ("flowcontrol.apiserver.k8s.io/v1beta2", "PriorityLevelConfiguration"),
    ),
    32: (
        ("flowcontrol.apiserver.k8s.io/v1beta3", "FlowSchema"),
        ("flowcontrol.apiserver.k8s.io/v1beta3", "PriorityLevelConfiguration"),
    ),
}

SLINKY_GROUP = "slinky.slurm.net"
GPU_OPERATOR_RELEASE = "gpu-operator"
# GPU Operator values whose change restarts an operand on every GPU node, and what that restart does there.
GPU_NODE_OPERANDS: dict[str, str] = {
    "driver": "the driver DaemonSet unloads and reloads the kernel modules: every GPU process on the node dies",
    "toolkit": "the container-toolkit DaemonSet rewrites the runtime config and restarts containerd",
    "devicePlugin": "the device plugin re-registers: allocatable nvidia.com/gpu drops to 0 until it is back",
}

_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


class PlanError(ValueError):
    """Something the plan cannot be made past (no upgrade path, a downgrade, an unreadable chart)."""


def kube_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of "v1.35.4", "1.35.4" or a build's "v1.35.4+abc"."""
    m = _VERSION.match(text.strip())
    if not m:
        raise PlanError(f"{text!r} is not a Kubernetes version (v1.MINOR.PATCH)")
    return int(m[1]), int(m[2]), int(m[3])


def _plain(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


# --------------------------------------------------------------------------------------------------
# Facts: CRDs and charts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrdVersion:
    served: bool
    storage: bool
    schema: str  # sha256 of the version's openAPIV3Schema as canonical JSON ("" when it has none)


@dataclass(frozen=True)
class Crd:
    name: str
    group: str
    kind: str
    versions: dict[str, CrdVersion]
    stored_versions: tuple[str, ...] = ()  # live only: versions objects may still be stored at
    helm_upgrades_it: bool = True  # False for a chart's crds/ folder: installed once, never upgraded by Helm

    @property
    def served(self) -> tuple[str, ...]:
        return tuple(sorted(v for v, f in self.versions.items() if f.served))

    @property
    def storage(self) -> str | None:
        return next((v for v, f in self.versions.items() if f.storage), None)


def _schema_hash(version: Mapping[str, Any]) -> str:
    schema = (version.get("schema") or {}).get("openAPIV3Schema")
    if schema is None:
        return ""
    return hashlib.sha256(json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def crd_from_object(obj: Mapping[str, Any], *, helm_upgrades_it: bool = True) -> Crd:
    """A CustomResourceDefinition (as the API server returns it, or as a chart file holds it) as plain facts."""
    spec = obj.get("spec") or {}
    return Crd(
        name=obj["metadata"]["name"],
        group=spec.get("group", ""),
        kind=(spec.get("names") or {}).get("kind", ""),
        versions={
            v["name"]: CrdVersion(bool(v.get("served")), bool(v.get("storage")), _schema_hash(v))
            for v in spec.get("versions") or []
        },
        stored_versions=tuple((obj.get("status") or {}).get("storedVersions") or ()),
        helm_upgrades_it=helm_upgrades_it,
    )


@dataclass(frozen=True)
class ChartFacts:
    """What the plan needs from one chart archive."""

    name: str
    version: str
    values: dict[str, Any]  # the chart's own values.yaml
    crds: dict[str, tuple[str | None, Crd]]  # CRD name -> (subchart condition or None, facts)
    # CRD name -> the object as a crds/ folder writes it (what an upgrade applies itself: Helm never does)
    crd_objects: dict[str, dict[str, Any]] = field(default_factory=dict)

    def crds_for(self, values: Mapping[str, Any]) -> dict[str, Crd]:
        """The CRDs an install with `values` (the user-supplied ones) applies: a subchart's only when its
        Chart.yaml condition holds (e.g. slurm-operator's `crds.enabled`, false by default)."""
        effective = deep_merge(self.values, dict(values))
        return {
            name: crd
            for name, (condition, crd) in self.crds.items()
            if condition is None or _lookup(effective, condition) is not False
        }


def _lookup(values: Mapping[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


class _ChartYamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML 1.1's `=` (the "value" type) is a plain string in a CRD (kube-prometheus-stack's enums hold it)."""


_ChartYamlLoader.add_constructor("tag:yaml.org,2002:value", yaml.SafeLoader.construct_yaml_str)


def chart_facts(archive: Path) -> ChartFacts:
    """Read a packaged chart (`helm pull`'s .tgz): Chart.yaml, values.yaml and every CRD it can apply, from its
    `crds/` folders (its own and its subcharts') and from plain (untemplated) template files (Slinky ships its
    CRDs as templates, which Helm does upgrade). Templated CRD files (kube-prometheus-stack's upgrade Job) are
    not read: they are rendered at install time, not CRDs as written."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            files = {
                m.name: tar.extractfile(m).read().decode()  # type: ignore[union-attr]
                for m in tar.getmembers()
                if m.isfile() and m.name.endswith((".yaml", ".yml"))
            }
    except (OSError, tarfile.TarError, UnicodeDecodeError) as exc:
        raise PlanError(f"{archive}: not a readable chart archive: {exc}") from None
    top = next((n.split("/", 1)[0] for n in files if n.count("/") == 1 and n.endswith("/Chart.yaml")), None)
    if top is None:
        raise PlanError(f"{archive}: no Chart.yaml at the top of the archive")
    chart = yaml.safe_load(files[f"{top}/Chart.yaml"]) or {}
    conditions = {d["name"]: d.get("condition") for d in chart.get("dependencies") or []}
    crds: dict[str, tuple[str | None, Crd]] = {}
    crd_objects: dict[str, dict[str, Any]] = {}
    for path in sorted(files):
        parts = path.split("/")
        # <top>/[charts/<sub>/]{crds,templates}/...: which chart owns the file, and which folder it sits in.
        sub = parts[2] if len(parts) > 3 and parts[1] == "charts" else None
        folder = parts[3] if sub else parts[1]
        text = files[path]
        if folder not in ("crds", "templates") or "CustomResourceDefinition" not in text:
            continue
        if folder == "templates" and "{{" in text:
            continue
        for doc in yaml.load_all(text, Loader=_ChartYamlLoader):  # noqa: S506 - a safe loader, one type added
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crd = crd_from_object(doc, helm_upgrades_it=folder == "templates")
                crds[crd.name] = (conditions.get(sub) if sub else None, crd)
                if folder == "crds":
                    crd_objects[crd.name] = doc
    return ChartFacts(
        name=chart.get("name", ""),
        version=str(chart.get("version", "")),
        values=yaml.safe_load(files.get(f"{top}/values.yaml", "")) or {},
        crds=crds,
        crd_objects=crd_objects,
    )


# --------------------------------------------------------------------------------------------------
# Live state and targets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveRelease:
    name: str
    namespace: str
    chart: str
    version: str
    status: str
    chart_values: dict[str, Any]  # the deployed chart's own values.yaml, as Helm stored it with the release
    values: dict[str, Any]  # user-supplied values
    objects: tuple[tuple[str, str, str], ...] = ()  # (apiVersion, kind, name) of its manifest

    def value(self, dotted: str) -> Any:
        return _lookup(deep_merge(self.chart_values, self.values), dotted)


@dataclass
class LiveState:
    server_version: str | None
    kubelets: dict[str, str]  # node -> kubelet version
    releases: dict[str, LiveRelease]  # by release name
    crds: dict[str, Crd]  # by CRD name


@dataclass(frozen=True)
class TargetRelease:
    release: Release
    facts: ChartFacts | None  # None: the chart archive is not at hand (no mirror file, no local path)

    def value(self, dotted: str) -> Any:
        base = self.facts.values if self.facts else {}
        return _lookup(deep_merge(base, self.release.values), dotted)


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KubeStep:
    start: str
    to: str
    kubespray: str


@dataclass(frozen=True)
class Component:
    component: str
    live: str
    target: str
    detail: str = ""

    @property
    def changes(self) -> bool:
        return self.live != self.target


@dataclass(frozen=True)
class CrdChange:
    crd: str
    release: str
    change: str  # "new", "versions", "schema"
    detail: str
    helm_upgrades_it: bool


@dataclass
class UpgradePlan:
    components: list[Component] = field(default_factory=list)
    kube_path: list[KubeStep] = field(default_factory=list)
    crd_changes: list[CrdChange] = field(default_factory=list)
    removed_apis: list[str] = field(default_factory=list)
    contract: metric_contract.ContractDiff | None = None
    risks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def has_changes(self) -> bool:
        return bool(any(c.changes for c in self.components) or self.kube_path or self.crd_changes or self.removed_apis)

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 2 if self.has_changes else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "components": [
                {"component": c.component, "live": c.live, "target": c.target, "changes": c.changes, "detail": c.detail}
                for c in self.components
            ],
            "kubernetes_path": [{"from": s.start, "to": s.to, "kubespray": s.kubespray} for s in self.kube_path],
            "crd_changes": [c.__dict__ for c in self.crd_changes],
            "removed_apis": self.removed_apis,
            "metric_contract": (
                {"from": self.contract.old, "to": self.contract.new, "changes": self.contract.lines()}
                if self.contract
                else None
            ),
            "risks": self.risks,
            "errors": self.errors,
        }


def kube_path(
    live: str,
    target: str,
    kubespray: str = pins.KUBESPRAY_VERSION,
    releases: Mapping[str, Iterable[str]] = KUBESPRAY_RELEASES,
) -> list[KubeStep]:
    """Kubernetes from `live` to `target` one minor at a time (Kubernetes supports no skipped minor). Each step
    goes to the target itself when it is the last, else to the newest patch of its minor, through the pinned
    Kubespray when it can take it (it has checksums for the step's version and the start is not older than its
    oldest), else through the newest Kubespray release that can."""
    start, end = kube_version(live), kube_version(target)
    if start == end:
        return []
    if start > end:
        raise PlanError(f"Kubernetes {_plain(start)} is newer than the pin {_plain(end)}: gpuforge does not downgrade")
    if start[0] != end[0]:
        raise PlanError(f"Kubernetes {_plain(start)} -> {_plain(end)} crosses a major version")
    known = {name: sorted((kube_version(v) for v in versions), reverse=True) for name, versions in releases.items()}
    order = [kubespray, *sorted((n for n in known if n != kubespray), key=kube_version, reverse=True)]
    steps: list[KubeStep] = []
    here = start
    for minor in range(start[1] if start[1] == end[1] else start[1] + 1, end[1] + 1):
        chosen = None
        for name in order:
            versions = known.get(name, [])
            if not versions or here < versions[-1]:
                continue  # older than this Kubespray's kube_version_min_required
            to = end if minor == end[1] else next((v for v in versions if v[1] == minor), None)
            if to is not None and to in versions:
                chosen = (name, to)
                break
        if chosen is None:
            raise PlanError(
                f"no Kubespray release gpuforge knows takes Kubernetes {_plain(here)} to 1.{minor} "
                f"(known: {', '.join(known)})"
            )
        steps.append(KubeStep(_plain(here), _plain(chosen[1]), chosen[0]))
        here = chosen[1]
    return steps


def crd_changes(live: Mapping[str, Crd], release: str, target: Mapping[str, Crd]) -> list[CrdChange]:
    """How the cluster's CRDs differ from the ones a target chart applies."""
    out = []
    for name, want in sorted(target.items()):
        have = live.get(name)
        if have is None:
            out.append(CrdChange(name, release, "new", f"served {', '.join(want.served)}", want.helm_upgrades_it))
            continue
        parts = []
        if have.served != want.served:
            parts.append(f"served {', '.join(have.served) or '-'} -> {', '.join(want.served) or '-'}")
        if have.storage != want.storage:
            parts.append(f"storage {have.storage} -> {want.storage}")
        if parts:
            out.append(CrdChange(name, release, "versions", "; ".join(parts), want.helm_upgrades_it))
            continue
        schema = [v for v in want.served if have.versions[v].schema != want.versions[v].schema]
        if schema:
            out.append(CrdChange(name, release, "schema", f"schema of {', '.join(schema)}", want.helm_upgrades_it))
    return out


def stranded_versions(live: Mapping[str, Crd], target: Mapping[str, Crd]) -> list[str]:
    """CRD versions the target stops serving while objects may still be stored at them: their objects become
    unreadable until they are migrated (rewritten at the new storage version, then storedVersions trimmed)."""
    out = []
    for name, want in sorted(target.items()):
        have = live.get(name)
        for version in have.stored_versions if have else ():
            if version not in want.served:
                out.append(
                    f"{name}: objects may be stored at {version}, which the target no longer serves: migrate them "
                    f"to {want.storage} before the upgrade"
                )
    return out


def removed_api_uses(releases: Iterable[LiveRelease], path: list[KubeStep]) -> list[str]:
    """Objects in live Helm manifests whose apiVersion a Kubernetes minor on the path stops serving."""
    removed: dict[tuple[str, str], int] = {}
    for step in path:
        minor = kube_version(step.to)[1]
        removed.update({api: minor for api in REMOVED_APIS.get(minor, ())})
    return [
        f"{r.namespace}/{r.name}: {kind} {name} uses {api}, removed in Kubernetes 1.{removed[(api, kind)]}"
        for r in releases
        for api, kind, name in r.objects
        if (api, kind) in removed
    ]


def _exporter_contract(tag: Any, where: str, errors: list[str]) -> metric_contract.Contract | None:
    if not tag:
        return None
    try:
        return metric_contract.contract_for(str(tag))
    except metric_contract.UnknownExporter as exc:
        errors.append(f"{where}: {exc}")
        return None


def _gpu_risks(live: LiveRelease, target: TargetRelease) -> list[str]:
    risks = []
    for key, effect in GPU_NODE_OPERANDS.items():
        before, after = live.value(f"{key}.version"), target.value(f"{key}.version")
        if before != after and target.value(f"{key}.enabled") is not False:
            risks.append(f"GPU nodes: {key} {before} -> {after}: {effect}; drain each GPU node (Slurm jobs first)")
    policy = target.value("driver.upgradePolicy") or {}
    if live.value("driver.version") != target.value("driver.version") and policy.get("autoUpgrade"):
        drain = (policy.get("drain") or {}).get("enable")
        risks.append(
            f"GPU Operator driver.upgradePolicy.autoUpgrade=true, maxParallelUpgrades="
            f"{policy.get('maxParallelUpgrades')}, drain.enable={drain}: the operator replaces drivers on its own "
            "schedule as soon as the chart is upgraded"
            + ("" if drain else ", without draining: cordon and drain GPU nodes before the chart step")
        )
    return risks


def plan(
    live: LiveState,
    targets: list[TargetRelease],
    kube_target: str,
    kubespray: str = pins.KUBESPRAY_VERSION,
) -> UpgradePlan:
    """The upgrade plan from `live` to the targets (pure: everything it needs is in its arguments)."""
    p = UpgradePlan()
    # Kubernetes: the server first, then every kubelet (a kubelet newer than the server is unsupported skew).
    try:
        server = _plain(kube_version(live.server_version or ""))
    except PlanError as exc:
        p.errors.append(f"Kubernetes server version: {exc}")
    else:
        p.components.append(Component("kubernetes", server, kube_target, f"Kubespray {kubespray}"))
        try:
            p.kube_path = kube_path(server, kube_target, kubespray)
        except PlanError as exc:
            p.errors.append(str(exc))
        stale = {n: v.lstrip("v") for n, v in sorted(live.kubelets.items()) if v.lstrip("v") != kube_target}
        if stale and not p.kube_path:
            p.components.append(
                Component("kubelets", ", ".join(f"{n} {v}" for n, v in stale.items()), kube_target, "nodes behind")
            )
        if p.kube_path:
            p.risks.append(
                f"Kubernetes {server} -> {kube_target} in {len(p.kube_path)} step(s) "
                f"({', '.join(f'{s.to} via Kubespray {s.kubespray}' for s in p.kube_path)}): upgrade-cluster.yml "
                "node by node; each GPU node drained the Slurm way first and re-validated before it takes work"
            )
    # Helm releases, their CRDs and what the GPU Operator's operands do on GPU nodes.
    for t in targets:
        r = t.release
        have = live.releases.get(r.name)
        p.components.append(Component(f"helm/{r.name}", have.version if have else "absent", r.version, r.chart))
        if t.facts is None:
            if have is None or have.version != r.version:
                p.errors.append(
                    f"helm/{r.name}: chart {r.chart} {r.version} is not at hand (no chart mirror file): its CRDs "
                    "cannot be compared; set chart_mirror or GPUFORGE_CHART_MIRROR"
                )
            continue
        want = t.facts.crds_for(r.values)
        p.crd_changes += crd_changes(live.crds, r.name, want)
        p.risks += stranded_versions(live.crds, want)
        if r.name == GPU_OPERATOR_RELEASE and have is not None:
            p.risks += _gpu_risks(have, t)
            before = _exporter_contract(have.value("dcgmExporter.version"), "live dcgm-exporter", p.errors)
            after = _exporter_contract(t.value("dcgmExporter.version"), "target dcgm-exporter", p.errors)
            tags = (have.value("dcgmExporter.version"), t.value("dcgmExporter.version"))
            p.components.append(Component("dcgm-exporter", str(tags[0]), str(tags[1]), "from the GPU Operator chart"))
            if before and after and before.exporter != after.exporter:
                p.contract = metric_contract.diff(before, after)
                if p.contract.changes:
                    p.risks.append(
                        f"dcgm-exporter {before.exporter} -> {after.exporter} changes the metric contract "
                        f"({'; '.join(p.contract.lines())}): health rules, validation, dashboard and alerts must "
                        f"read {after.exporter}'s names"
                    )
    # Helm applies a chart's crds/ on install only: on an upgrade neither a changed nor a new CRD there arrives.
    upgraded = {r for r, have in ((t.release.name, live.releases.get(t.release.name)) for t in targets) if have}
    for c in p.crd_changes:
        if not c.helm_upgrades_it and c.release in upgraded:
            p.risks.append(
                f"CRD {c.crd} ({c.release}, {c.change}: {c.detail}) sits in the chart's crds/: helm upgrade does not "
                "apply it; apply it explicitly before the chart step"
            )
    slinky = [c for c in p.crd_changes if c.crd.endswith("." + SLINKY_GROUP)]
    slinky_moves = [c for c in p.components if c.component.startswith("helm/slurm") and c.changes]
    if slinky:
        p.risks.append(f"Slinky CRDs change: {', '.join(f'{c.crd} ({c.detail})' for c in slinky)}")
    elif slinky_moves:
        p.risks.append("Slinky charts move but their CRDs do not change (served and storage versions, schemas)")
    p.removed_apis = removed_api_uses(live.releases.values(), p.kube_path)
    return p


def plan_lines(p: UpgradePlan) -> list[str]:
    """The plan as text, one finding a line, for the CLI and the flow's markdown."""
    lines = ["component               live                     target                   "]
    for c in p.components:
        mark = "->" if c.changes else "=="
        lines.append(f"{c.component:<23} {c.live:<24} {mark} {c.target:<22} {c.detail}")
    for s in p.kube_path:
        lines.append(f"kubernetes step: {s.start} -> {s.to} with Kubespray {s.kubespray} (upgrade-cluster.yml)")
    for c in p.crd_changes:
        how = "Helm applies it" if c.helm_upgrades_it else "crds/: apply explicitly"
        lines.append(f"crd {c.change:<8} {c.crd} ({c.release}): {c.detail} [{how}]")
    if p.contract:
        lines += [f"metric contract {p.contract.old} -> {p.contract.new}: {line}" for line in p.contract.lines()]
    lines += [f"removed api: {line}" for line in p.removed_apis]
    lines += [f"risk: {line}" for line in p.risks]
    lines += [f"error: {line}" for line in p.errors]
    changed = sum(c.changes for c in p.components)
    lines.append(
        "nothing to do: the cluster is at the pins"
        if p.exit_code == 0
        else f"{changed} component(s) to change, {len(p.kube_path)} Kubernetes step(s), "
        f"{len(p.crd_changes)} CRD change(s), {len(p.risks)} risk(s), {len(p.errors)} error(s)"
    )
    return lines


def live_state(
    server_version: str | None,
    kubelets: Mapping[str, str],
    releases: Mapping[str, Mapping[str, Any]],
    crds: Iterable[Mapping[str, Any]],
) -> LiveState:
    """The live state from what the read verbs return (tasks.kube.server_version/list_nodes/list_crds,
    tasks.helm.release_details)."""
    return LiveState(
        server_version=server_version,
        kubelets=dict(kubelets),
        releases={
            name: LiveRelease(
                name=name,
                namespace=r["namespace"],
                chart=r["chart"],
                version=r["version"],
                status=r["status"],
                chart_values=dict(r.get("chart_values") or {}),
                values=dict(r.get("values") or {}),
                objects=tuple(tuple(o) for o in r.get("objects") or ()),
            )
            for name, r in releases.items()
        },
        crds={c["metadata"]["name"]: crd_from_object(c) for c in crds},
    )


def targets(releases: Iterable[Release], mirror: Path | None) -> list[TargetRelease]:
    """Each rendered release with the facts of its chart archive from the chart mirror (None when not there)."""
    from gpuforge.render import chart_archive

    out = []
    for r in releases:
        archive = chart_archive(r, mirror)
        out.append(TargetRelease(r, chart_facts(archive) if archive else None))
    return out
