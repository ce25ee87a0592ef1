"""Render everything an install applies, from the config alone: inventory, group_vars, Helm values,
the Grafana GPU dashboard, GPU alert rules and a human summary.

Pure domain code: no Prefect, no clients. `plan` writes these files; `install` applies the same objects;
`drift` compares the cluster against them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gpuforge import health, pins
from gpuforge.config import Config, NamedNode, Role, _to_plain, parse_yaml
from gpuforge.health import FAMILY_REGEX, Thresholds

# Node labels gpuforge owns (drift compares only these keys plus the user's own `labels`).
LABEL_PREFIX = "gpuforge.io/"
DCGM_CONFIGMAP = "gpuforge-dcgm-metrics"
DASHBOARD_CONFIGMAP = "gpuforge-gpu-dashboard"
ALERTS_RULE = "gpuforge-gpu-alerts"
MONITORING_RELEASE = "kube-prometheus-stack"
# fullnameOverride makes the Prometheus Service name predictable: <this>-prometheus in `monitoring`.
PROMETHEUS_FULLNAME = "kube-prometheus-stack"
PROMETHEUS_SERVICE = f"{PROMETHEUS_FULLNAME}-prometheus"
# The Grafana sidecar loads ConfigMaps carrying this label (set in kube-prometheus-stack's values below).
DASHBOARD_SIDECAR_LABEL = ("grafana_dashboard", "1")
# dcgm-exporter's node label. It is spelled `Hostname` up to dcgm-exporter 4.5.x and `hostname` from 4.6.0-4.8.3,
# the exporter GPU Operator v26.7.0 (gpuforge's pin) ships; health.node_of reads either spelling.
DCGM_NODE_LABEL = "hostname"
# dcgm-exporter's GPU model label (every release): the alert rules pick each GPU's thresholds by it, as the probe
# and the fleet evaluation pick them by the model name.
DCGM_MODEL_LABEL = "modelName"
# Kubespray's local-path provisioner StorageClass, enabled in group_vars: a Kubespray cluster has no StorageClass
# otherwise, and slurmctld's state volume (a PVC of the slurm chart) must bind.
LOCAL_PATH_STORAGE_CLASS = "local-path"
# Packaged charts named as `helm pull` names them (<chart>-<version>.tgz); the config's `chart_mirror` wins.
CHART_MIRROR_ENV = "GPUFORGE_CHART_MIRROR"


class DesiredNodeView(Protocol):
    """What the summary reads of a node (gpuforge.desired.DesiredNode)."""

    name: str
    ip: str
    roles: tuple[str, ...]
    is_gpu: bool
    expected_gpus: int | None
    gpu_model: str | None


@dataclass(frozen=True)
class Release:
    """One Helm release as gpuforge will install it."""

    service: str
    name: str
    namespace: str
    repo: str | None
    chart: str
    version: str
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def chart_ref(self) -> str:
        return f"{self.repo}/{self.chart}" if self.repo and self.repo.startswith("oci://") else self.chart


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Override wins; mappings merge key by key; lists are replaced, not concatenated."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ------------------------------------------------------------------------------------------------ inventory


def node_labels(node: NamedNode, cluster: str) -> dict[str, str]:
    """The labels gpuforge sets on a node (Kubespray `node_labels`), the user's own last."""
    labels = {f"{LABEL_PREFIX}cluster": cluster}
    if node.spec.is_gpu:
        labels[f"{LABEL_PREFIX}gpu-worker"] = "true"
        if node.spec.slurm:
            labels[f"{LABEL_PREFIX}nodeset"] = nodeset_name(node)
        if node.spec.gpu_count:
            labels[f"{LABEL_PREFIX}gpu-count"] = str(node.spec.gpu_count)
    if Role.CPU_WORKER in node.spec.role:
        labels[f"{LABEL_PREFIX}cpu-worker"] = "true"
    labels.update(node.spec.labels)
    return labels


def node_taints(node: NamedNode) -> list[str]:
    taints = [t.kubespray() for t in node.spec.taints]
    # Kubespray taints control-plane nodes itself unless they are also workers; say so explicitly.
    if node.spec.is_control_plane and not node.spec.is_worker:
        taints.append("node-role.kubernetes.io/control-plane:NoSchedule")
    return taints


def render_inventory(config: Config) -> dict[str, Any]:
    """Kubespray's YAML inventory: hosts with ansible_host/ip/access_ip, the three groups, node labels."""
    hosts: dict[str, Any] = {}
    for node in config.nodes:
        host = {"ansible_host": node.spec.ip, "ip": node.spec.ip, "access_ip": node.spec.ip}
        host["node_labels"] = node_labels(node, config.cluster_name)
        if taints := node_taints(node):
            host["node_taints"] = taints
        if node.spec.is_etcd:
            host["etcd_member_name"] = f"etcd-{node.name}"
        hosts[node.name] = host

    def group(pred) -> dict[str, Any]:
        return {"hosts": {n.name: None for n in config.nodes if pred(n.spec)}}

    return {
        "all": {
            "hosts": hosts,
            "children": {
                "kube_control_plane": group(lambda s: s.is_control_plane),
                "etcd": group(lambda s: s.is_etcd),
                "kube_node": group(lambda s: s.is_worker),
                "k8s_cluster": {"children": {"kube_control_plane": None, "kube_node": None}},
                "gpu_workers": group(lambda s: s.is_gpu),
            },
        }
    }


# containerd drop-in imports keep the NVIDIA runtime that the GPU Operator's toolkit adds, when a Kubespray
# re-run rewrites /etc/containerd/config.toml (kubespray#12277).
CONTAINERD_IMPORTS = 'imports = ["/etc/containerd/conf.d/*.toml"]'


def render_group_vars(config: Config) -> dict[str, dict[str, Any]]:
    """group_vars files by name. Booleans are real booleans: Kubespray's validate_inventory asserts it."""
    ks = config.kubespray
    all_vars: dict[str, Any] = {"ansible_user": config.ansible_user, "ansible_become": True}
    if config.ansible_python_interpreter:
        all_vars["ansible_python_interpreter"] = config.ansible_python_interpreter
    if config.ansible_ssh_private_key_file:
        # The path only: the key itself never enters a rendered file.
        all_vars["ansible_ssh_private_key_file"] = str(config.path(config.ansible_ssh_private_key_file))
    # No `cluster_name` here: Kubespray's cluster_name is the cluster DNS domain (default cluster.local), not
    # gpuforge's cluster name; a site that wants another domain sets it in kubespray.extra_vars.
    k8s = {
        "kube_version": ks.kube_version,
        "container_manager": ks.container_manager,
        "kube_network_plugin": ks.network_plugin,
        "kube_service_addresses": ks.service_cidr,
        "kube_pods_subnet": ks.pod_cidr,
        "kubeconfig_localhost": True,
        "kubectl_localhost": False,
        "helm_enabled": False,
        "containerd_extra_args": CONTAINERD_IMPORTS,
        "local_path_provisioner_enabled": True,
        "local_path_provisioner_storage_class": LOCAL_PATH_STORAGE_CLASS,
    }
    k8s.update(ks.extra_vars)
    return {"all": all_vars, "k8s_cluster": k8s}


# ----------------------------------------------------------------------------------------------- Helm values


def nodeset_name(node: NamedNode) -> str:
    """GPU nodes with the same GPU count share a Slurm NodeSet (a NodeSet has one gres)."""
    return f"gpu-{node.spec.gpu_count}" if node.spec.gpu_count else "gpu"


def gpu_nodesets(config: Config, learned: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """NodeSet name -> {nodes, gpus}. `learned` gives counts found at install for nodes the config leaves open."""
    sets: dict[str, dict[str, Any]] = {}
    for node in config.slurm_gpu_nodes:
        name = nodeset_name(node)
        count = node.spec.gpu_count or (learned or {}).get(node.name)
        entry = sets.setdefault(name, {"nodes": [], "gpus": count})
        entry["nodes"].append(node.name)
        if count is not None:
            entry["gpus"] = min(entry["gpus"] or count, count)
    return sets


def _default_values(config: Config, release: str, learned: dict[str, int] | None) -> dict[str, Any]:
    if release == "kube-prometheus-stack":
        return {
            "fullnameOverride": PROMETHEUS_FULLNAME,
            "prometheus": {
                "prometheusSpec": {
                    # Select ServiceMonitors/rules of every release, not only this one's (the `release` trap).
                    "serviceMonitorSelectorNilUsesHelmValues": False,
                    "podMonitorSelectorNilUsesHelmValues": False,
                    "ruleSelectorNilUsesHelmValues": False,
                    "scrapeInterval": "15s",
                }
            },
            "grafana": {
                "sidecar": {
                    "dashboards": {
                        "enabled": True,
                        "label": DASHBOARD_SIDECAR_LABEL[0],
                        "labelValue": DASHBOARD_SIDECAR_LABEL[1],
                        "searchNamespace": "ALL",
                    }
                }
            },
        }
    if release == "gpu-operator":
        # No operator.defaultRuntime: v26.7.0's chart dropped it; the operator reads each node's container runtime.
        return {
            "driver": {"enabled": True},
            "toolkit": {"enabled": True},
            "devicePlugin": {"enabled": True},
            "nfd": {"enabled": True},
            "dcgmExporter": {
                "enabled": True,
                # The counters gpuforge's health rules read (ECC, remaps, throttling) are off by default.
                "config": {"name": DCGM_CONFIGMAP},
                # Off by default through v26.3.3; labelled so kube-prometheus-stack selects it either way.
                "serviceMonitor": {
                    "enabled": True,
                    "honorLabels": True,
                    "additionalLabels": {"release": MONITORING_RELEASE},
                },
            },
        }
    if release == "cert-manager":
        return {"crds": {"enabled": True}}
    if release == "slurm-operator-crds":
        return {}
    if release == "slurm-operator":
        return {"crds": {"enabled": False}, "certManager": {"enabled": True}}
    if release == "slurm":
        nodesets: dict[str, Any] = {}
        for name, ns in gpu_nodesets(config, learned).items():
            gpus = ns["gpus"] or 1
            nodesets[name] = {
                "enabled": True,
                "replicas": len(ns["nodes"]),
                "slurmd": {"resources": {"limits": {"nvidia.com/gpu": gpus}}},
                "extraConfMap": {"Gres": [f"gpu:{gpus}"]},
                "podSpec": {"nodeSelector": {f"{LABEL_PREFIX}nodeset": name}},
                "partition": {"enabled": False},
            }
        return {
            "clusterName": config.cluster_name,
            "configFiles": {"gres.conf": "AutoDetect=nvidia\n"},
            "controller": {
                # Slinky >= 1.2.0 no longer writes GresTypes into slurm.conf; without it `--gres=gpu` is refused.
                "extraConfMap": {"GresTypes": ["gpu"]},
                "persistence": {"storageClassName": LOCAL_PATH_STORAGE_CLASS},
            },
            "nodesets": nodesets,
            "partitions": {"gpu": {"enabled": True, "nodesets": sorted(nodesets), "configMap": {"Default": "YES"}}},
        }
    if release == "kubernetes-dashboard":
        return {"app": {"ingress": {"enabled": False}}}
    raise KeyError(release)


def render_releases(config: Config, learned: dict[str, int] | None = None) -> list[Release]:
    """The Helm releases of every enabled service, in install order, with merged values."""
    releases = []
    for service in ("monitoring_stack", "gpu-operator", "slurm", "k8s-dashboard"):
        svc = config.deepops_services.by_key()[service]
        if not svc.enabled:
            continue
        for name, namespace, repo, chart, version in pins.CHARTS[service]:
            pin = svc.releases.get(name)
            values = _default_values(config, name, learned)
            if pin and pin.values_file:
                values = deep_merge(values, _load_values_file(config, pin.values_file))
            if pin:
                values = deep_merge(values, pin.values)
            if pin and pin.path:
                repo_ref, chart_ref = None, str(config.path(pin.path))
            else:
                repo_ref = pin.repo if pin and pin.repo else repo
                chart_ref = pin.chart if pin and pin.chart else chart
            releases.append(
                Release(
                    service,
                    name,
                    namespace,
                    repo_ref,
                    chart_ref,
                    (pin.version if pin and pin.version else version),
                    values,
                )
            )
    return releases


def chart_mirror(config: Config, environ: Mapping[str, str]) -> Path | None:
    """The chart mirror folder: the config's `chart_mirror` (relative to the config file), else $GPUFORGE_CHART_MIRROR
    (relative to the working directory), else none. The config wins: it is the reviewed, per-cluster setting."""
    if config.chart_mirror:
        return config.path(config.chart_mirror)
    if from_env := environ.get(CHART_MIRROR_ENV):
        return Path(from_env).expanduser()
    return None


def mirror_file(release: Release, mirror: Path) -> Path:
    """Where a release's chart sits in a mirror: `helm pull`'s file name, <chart>-<version>.tgz."""
    return mirror / f"{release.chart.rsplit('/', 1)[-1]}-{release.version}.tgz"


def chart_archive(release: Release, mirror: Path | None) -> Path | None:
    """The mirror file that serves a release, or None when the chart comes from elsewhere: a release with a local
    chart `path` (repo None) uses that path, and a mirror without the file leaves the release to its repository."""
    if release.repo is None or mirror is None:
        return None
    archive = mirror_file(release, mirror)
    return archive if archive.is_file() else None


def _load_values_file(config: Config, path: str) -> dict[str, Any]:
    p = config.path(path)
    data = _to_plain(parse_yaml(p.read_text(), str(p)))
    return data or {}


# ------------------------------------------------------------------------------------ DCGM counters, alerts


# dcgm-exporter counters CSV: the defaults plus what gpuforge's health rules need.
DCGM_COUNTERS = [
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz)."),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz)."),
    ("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C)."),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C)."),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)."),
    ("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", "gauge", "Current power limit for the device (in W)."),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", "Total energy consumption since boot (in mJ)."),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries."),
    ("DCGM_FI_DEV_PCIE_LINK_GEN", "gauge", "PCIe current link generation."),
    ("DCGM_FI_DEV_PCIE_LINK_WIDTH", "gauge", "PCIe current link width."),
    ("DCGM_FI_DEV_PCIE_MAX_LINK_GEN", "gauge", "PCIe max link generation."),
    ("DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH", "gauge", "PCIe max link width."),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)."),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %)."),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered."),
    ("DCGM_EXP_XID_ERRORS_COUNT", "gauge", "Count of XID errors within the user-specified time window."),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB)."),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB)."),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "Total number of single-bit volatile ECC errors."),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors."),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for uncorrectable errors"),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for correctable errors"),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed"),
    ("DCGM_FI_DEV_ROW_REMAP_PENDING", "gauge", "Whether remapping of rows is pending"),
    ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "gauge", "Current clock throttle reasons (bitmask)."),
    ("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink flow-control CRC errors."),
    ("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink data CRC errors."),
    ("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink retries."),
    ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink recovery errors."),
]


def render_dcgm_counters() -> str:
    lines = ["# Format: DCGM FIELD, Prometheus metric type, help message"]
    lines += [f"{name}, {kind}, {help_}" for name, kind, help_ in DCGM_COUNTERS]
    return "\n".join(lines) + "\n"


def render_alert_rules(
    table: Mapping[str, Thresholds], namespace: str, expected_gpus: Mapping[str, int | None]
) -> dict[str, Any]:
    """A PrometheusRule with the GPU alerts: fatal XID, ECC DBE, row-remap failure, uncorrectable remapped rows,
    GPU and memory temperature, missing GPU. Each limit is the config's effective one for the GPU's model
    (:func:`gpuforge.health.resolve_thresholds`, as the probe and the fleet evaluation use), so an alert fires for
    exactly the readings :func:`gpuforge.health.judge` calls unhealthy (critical) or degraded (warning) by these
    rules; the temperatures wait 5 minutes first, so that a short peak pages nobody. `table` is the resolved
    thresholds table; `expected_gpus` (GPU node -> count, None: not known) gives the GPUMissing alert its floors."""
    classes = _model_classes(table)
    longest, _ = health.fleet_window(table)
    node = DCGM_NODE_LABEL
    gpu = "GPU {{ $labels.gpu }} on {{ $labels." + node + " }}"
    value = "{{ $value }}"
    # Only the exact per-value form: the exporters gpuforge deploys (dcgm-exporter, its own probe) label each XID
    # value's series with err_code; the fleet evaluation also reads exporters without it.
    fatal_xid = _per_model(
        classes,
        lambda t: sorted(t.fatal_xids),
        lambda xids, m: health.xid_values_expr(m, longest.xid_window, xids) if xids else "",
    )
    rows = _per_model(
        classes,
        lambda t: t.max_uncorrectable_remapped_rows,
        lambda limit, m: f"{_selector('DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS', m)} > {limit}",
    )
    temp = _per_model(
        classes, lambda t: t.max_gpu_temp_c, lambda limit, m: f"{_selector('DCGM_FI_DEV_GPU_TEMP', m)} > {limit:g}"
    )
    mem_temp = _per_model(
        classes,
        lambda t: t.max_memory_temp_c,
        lambda limit, m: f"{_selector('DCGM_FI_DEV_MEMORY_TEMP', m)} > {limit:g}",
    )
    missing = [
        f"count by ({node}) (DCGM_FI_DEV_GPU_TEMP{{{node}=~{promql_regex('(?i)', name)}}}) < {count}"
        for name, count in expected_gpus.items()
        if count
    ]
    rules = [
        _alert(
            "GPUFatalXid",
            fatal_xid,
            "critical",
            gpu + " reported fatal XID {{ $labels.err_code }} within " + longest.xid_window,
        ),
        _alert(
            "GPUEccDoubleBit",
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL > 0",
            "critical",
            f"{gpu} has {value} double-bit ECC errors",
        ),
        _alert(
            "GPURowRemapFailure",
            "DCGM_FI_DEV_ROW_REMAP_FAILURE > 0",
            "critical",
            f"{gpu} failed to remap rows: replace it",
        ),
        _alert("GPURemappedRowsUncorrectable", rows, "critical", f"{gpu} has {value} uncorrectable remapped rows"),
        _alert("GPUTemperatureHigh", temp, "warning", f"{gpu} at {value} C", for_="5m"),
        _alert("GPUMemoryTemperatureHigh", mem_temp, "warning", f"{gpu} memory at {value} C", for_="5m"),
        _alert(
            "GPUMetricsTargetDown",
            'up{job=~".*dcgm.*|gpu-metrics"} == 0',
            "warning",
            "GPU metrics target {{ $labels.instance }} is down",
            for_="5m",
        ),
    ]
    rules = [r for r in rules if r["expr"]]  # a fatal XID list left empty by the config: no XID alert
    if missing:
        rules.append(
            _alert(
                "GPUMissing",
                " or ".join(missing),
                "critical",
                "{{ $labels." + node + " }} shows fewer GPUs than configured",
                for_="5m",
            )
        )
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": ALERTS_RULE,
            "namespace": namespace,
            "labels": {"release": MONITORING_RELEASE, "app.kubernetes.io/managed-by": "gpuforge"},
        },
        "spec": {"groups": [{"name": "gpuforge-gpu", "rules": rules}]},
    }


# RE2's metacharacters, as Go's regexp.QuoteMeta escapes them. Python's re.escape escapes more ('-' among them),
# and a backslash written as is into a PromQL string is an escape of that string: `"\-"` is invalid PromQL.
_RE2_META = re.compile(r"([\\.+*?()|\[\]{}^$])")


def promql_regex(flags: str, *literals: str) -> str:
    """A PromQL string literal holding an RE2 regex that matches any of `literals` exactly (after `flags` such as
    "(?i)"). JSON's string syntax is a subset of PromQL's, so json.dumps doubles the backslashes the string needs."""
    return json.dumps(flags + "|".join(_RE2_META.sub(r"\\\1", literal) for literal in literals))


def _model_classes(table: Mapping[str, Thresholds]) -> list[tuple[Thresholds, str]]:
    """Each thresholds section of a resolved table with the model-label matchers of the GPUs it judges, picked as
    :func:`gpuforge.health.thresholds_for` picks them: an exact model name (any case) first, then each family in
    :data:`~gpuforge.health.FAMILY_REGEX` order, then the default for every other model (or none)."""
    m = DCGM_MODEL_LABEL
    exact = health.exact_model_keys(table)
    classes = [(table[k], f"{m}=~{promql_regex('(?i)', k)}") for k in exact]
    taken = [f"{m}!~{promql_regex('(?i)', *exact)}"] if exact else []
    for family, regex in FAMILY_REGEX.items():
        classes.append((table[family], ", ".join([f"{m}=~{json.dumps(regex)}", *taken])))
        taken.append(f"{m}!~{json.dumps(regex)}")
    classes.append((table["default"], ", ".join(taken)))
    return classes


def _per_model(
    classes: list[tuple[Thresholds, str]], limit: Callable[[Thresholds], Any], expr: Callable[[Any, str], str]
) -> str:
    """One alert expression over every GPU: `expr(limit, matchers)` for each class of :func:`_model_classes`,
    joined with `or` (an empty part is left out); one part with no model matcher where every class has the same
    limit."""
    if len({repr(limit(t)) for t, _ in classes}) == 1:
        return expr(limit(classes[0][0]), "")
    return " or ".join(f"({part})" for t, matchers in classes if (part := expr(limit(t), matchers)))


def _selector(metric: str, matchers: str) -> str:
    return f"{metric}{{{matchers}}}" if matchers else metric


def _alert(name: str, expr: str, severity: str, summary: str, for_: str = "0m") -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {"summary": summary},
    }


def render_dashboard() -> dict[str, Any]:
    """gpuforge's own Grafana GPU dashboard (one row per signal the health rules judge)."""
    on_nodes = f'{{{DCGM_NODE_LABEL}=~"$node"}}'  # every series of every panel follows the node picker
    panels = [
        ("GPU temperature (°C)", f"DCGM_FI_DEV_GPU_TEMP{on_nodes}", "celsius"),
        ("Memory temperature (°C)", f"DCGM_FI_DEV_MEMORY_TEMP{on_nodes}", "celsius"),
        ("Power (W)", f"DCGM_FI_DEV_POWER_USAGE{on_nodes}", "watt"),
        ("GPU utilisation (%)", f"DCGM_FI_DEV_GPU_UTIL{on_nodes}", "percent"),
        ("Framebuffer used (MiB)", f"DCGM_FI_DEV_FB_USED{on_nodes}", "decmbytes"),
        ("Last XID", f"DCGM_FI_DEV_XID_ERRORS{on_nodes}", "none"),
        ("ECC double-bit errors", f"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{on_nodes}", "none"),
        (
            "Row remap pending / failure",
            f"DCGM_FI_DEV_ROW_REMAP_PENDING{on_nodes} + DCGM_FI_DEV_ROW_REMAP_FAILURE{on_nodes}",
            "none",
        ),
    ]
    return {
        "title": "gpuforge GPUs",
        "uid": "gpuforge-gpus",
        "schemaVersion": 39,
        "tags": ["gpuforge", "gpu", "dcgm"],
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "node",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": f"label_values(DCGM_FI_DEV_GPU_TEMP, {DCGM_NODE_LABEL})",
                    "includeAll": True,
                    "multi": True,
                },
            ]
        },
        "panels": [
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
                "fieldConfig": {"defaults": {"unit": unit}},
                "targets": [
                    {
                        "expr": expr,
                        "legendFormat": "{{" + DCGM_NODE_LABEL + "}} gpu{{gpu}}",
                    }
                ],
            }
            for i, (title, expr, unit) in enumerate(panels)
        ],
    }


# ------------------------------------------------------------------------------------------------- summary


def render_summary(config: Config, nodes: Iterable[DesiredNodeView], releases: Iterable[Release]) -> dict[str, Any]:
    """What will be installed where, at which versions: the machine-readable plan."""
    summary_nodes = [
        {
            "name": n.name,
            "ip": n.ip,
            "roles": list(n.roles),
            "gpus": n.expected_gpus or ("≥1, learned at install" if n.is_gpu else 0),
            "gpu_model": n.gpu_model,
        }
        for n in nodes
    ]
    services = {key: {"enabled": svc.enabled} for key, svc in config.deepops_services.by_key().items()}
    summary_releases = [
        {
            "service": r.service,
            "release": r.name,
            "namespace": r.namespace,
            "chart": r.chart,
            "repo": r.repo,
            "version": r.version,
        }
        for r in releases
    ]
    return {
        "cluster": config.cluster_name,
        "kubespray": {
            "version": config.kubespray.version,
            "kube_version": config.kubespray.kube_version,
            "container_manager": config.kubespray.container_manager,
            "network_plugin": config.kubespray.network_plugin,
        },
        "nodes": summary_nodes,
        "services": services,
        "releases": summary_releases,
        "notes": [
            "containerd drop-in imports are kept in /etc/containerd/config.toml so a Kubespray re-run does not "
            "drop the NVIDIA runtime (kubespray#12277)",
            f"dcgm-exporter ServiceMonitor enabled and labelled release={MONITORING_RELEASE}; Prometheus selects "
            "ServiceMonitors of every release",
        ],
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    ks = summary["kubespray"]
    lines = [
        f"# gpuforge plan for cluster `{summary['cluster']}`",
        "",
        f"Kubernetes {ks['kube_version']} via Kubespray {ks['version']} ({ks['container_manager']}, "
        f"{ks['network_plugin']})",
        "",
        "| node | ip | roles | GPUs |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n['name']} | {n['ip']} | {', '.join(n['roles'])} | {n['gpus']} |" for n in summary["nodes"]]
    lines += ["", "| service | release | namespace | chart | version |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['service']} | {r['release']} | {r['namespace']} | {r['chart']} | {r['version']} |"
        for r in summary["releases"]
    ]
    skipped = [k for k, v in summary["services"].items() if not v["enabled"]]
    if skipped:
        lines += ["", f"Skipped (disabled in the config): {', '.join(skipped)}"]
    lines += ["", "Notes:"] + [f"- {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"
