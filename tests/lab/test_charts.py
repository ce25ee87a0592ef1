"""The lab's stand-in Helm charts: `helm lint` and `helm template` pass for each, with gpuforge's own rendered
values (releases pointed at lab/charts through the config's `path:` pins), and the objects install/validation code
looks for carry upstream's names, namespaces and labels."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from gpuforge import pins
from gpuforge.config import load_config
from gpuforge.render import render_releases

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "lab" / "charts"
BIN_DIR = Path(os.environ.get("GPUFORGE_BIN_DIR", Path.home() / ".cache" / "gpuforge" / "bin"))
HELM = BIN_DIR / "helm-v3.19.0"
KUBE_VERSION = pins.KUBE_VERSION  # the Helm build's default (1.20) is below every chart's kubeVersion

# Release name -> chart directory, for every release gpuforge installs.
RELEASE_CHARTS = {name: chart for entries in pins.CHARTS.values() for name, _ns, _repo, chart, _v in entries}


@pytest.fixture(scope="module")
def helm() -> Path:
    if not HELM.exists():
        pytest.skip(f"helm not built: {HELM}")
    return HELM


def _run(helm: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _index(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """gpuforge's releases for a config with 2 GPU nodes (8 and 4 GPUs) and every service on."""
    d = tmp_path_factory.mktemp("cfg")
    pins_yaml = {
        svc: {"enabled": True, "releases": {name: {"path": str(CHARTS / chart)} for name, _, _, chart, _ in rel}}
        for svc, rel in pins.CHARTS.items()
    }
    cfg = {
        "cluster_name": "labc",
        "k8s_cluster_nodes": [
            {"ip": "10.0.0.1", "role": ["control-plane", "etcd"], "name": "cp01"},
            {"ip": "10.0.0.2", "role": ["gpu-worker"], "name": "gpu01", "gpu_count": 8},
            {"ip": "10.0.0.3", "role": ["gpu-worker"], "name": "gpu02", "gpu_count": 4},
            {"ip": "10.0.0.4", "role": ["cpu-worker"], "name": "cpu01"},
        ],
        "deepops_services": pins_yaml,
    }
    (d / "config.yml").write_text(yaml.safe_dump(cfg))
    rels = render_releases(load_config(d / "config.yml"))
    assert {r.name for r in rels} == set(RELEASE_CHARTS)
    for r in rels:
        assert r.repo is None and Path(r.chart) == CHARTS / RELEASE_CHARTS[r.name]
    return {r.name: r for r in rels}


def _template(helm: Path, release, tmp_path: Path, *extra: str) -> list[dict]:
    values = tmp_path / f"{release.name}-values.json"
    values.write_text(json.dumps(release.values))
    out = _run(
        helm, "template", release.name, release.chart, "--namespace", release.namespace,
        "--kube-version", KUBE_VERSION, "--values", str(values), *extra,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return _docs(out.stdout)


@pytest.mark.parametrize("chart", sorted(set(RELEASE_CHARTS.values())))
def test_lint_and_version(helm, chart):
    meta = yaml.safe_load((CHARTS / chart / "Chart.yaml").read_text())
    pin = next(v for entries in pins.CHARTS.values() for _n, _ns, _r, c, v in entries if c == chart)
    assert meta["version"] == f"{pin.removeprefix('v')}-lab"
    out = _run(helm, "lint", str(CHARTS / chart), "--strict", "--kube-version", KUBE_VERSION)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("release", sorted(RELEASE_CHARTS))
def test_template_with_gpuforge_values(helm, releases, release, tmp_path):
    r = releases[release]
    docs = _template(helm, r, tmp_path)
    assert docs, f"{release}: nothing rendered"
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d
        if d["kind"] not in ("CustomResourceDefinition", "ClusterPolicy"):
            assert d["metadata"].get("namespace") == r.namespace, (d["kind"], d["metadata"]["name"])
    # Every pod template uses only what the apiserver accepts from a plain chart: no hostname suffix "-" etc.
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            spec = d["spec"]["template"]["spec"]
            assert spec["containers"] and all(c["image"] for c in spec["containers"])
            assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()


def test_gpu_operator_objects(helm, releases, tmp_path):
    r = releases["gpu-operator"]
    idx = _index(_template(helm, r, tmp_path))
    assert ("Deployment", "gpu-operator") in idx
    cp = idx[("ClusterPolicy", "cluster-policy")]
    assert cp["apiVersion"] == "nvidia.com/v1"
    assert cp["spec"]["dcgmExporter"]["config"]["name"] == "gpuforge-dcgm-metrics"
    assert cp["spec"]["operator"]["defaultRuntime"] == "containerd"
    operands = [
        "nvidia-driver-daemonset",
        "nvidia-container-toolkit-daemonset",
        "nvidia-device-plugin-daemonset",
        "gpu-feature-discovery",
        "nvidia-dcgm-exporter",
        "nvidia-operator-validator",
    ]
    for name in operands:
        sel = idx[("DaemonSet", name)]["spec"]["template"]["spec"]["nodeSelector"]
        assert sel["nvidia.com/gpu.present"] == "true", name
    nfd = idx[("DaemonSet", "gpu-operator-node-feature-discovery-worker")]["spec"]["template"]["spec"]
    assert "nodeSelector" not in nfd  # NFD runs on every node
    svc = idx[("Service", "nvidia-dcgm-exporter")]
    assert svc["spec"]["ports"] == [{"name": "gpu-metrics", "port": 9400, "targetPort": 9400, "protocol": "TCP"}]
    exporter = idx[("DaemonSet", "nvidia-dcgm-exporter")]["spec"]["template"]["spec"]
    assert exporter["volumes"][0]["configMap"]["name"] == "gpuforge-dcgm-metrics"
    # No ServiceMonitor CRD known: skipped quietly, like v26.7.0.
    assert ("ServiceMonitor", "nvidia-dcgm-exporter") not in idx


def test_gpu_operator_servicemonitor_when_crd_exists(helm, releases, tmp_path):
    r = releases["gpu-operator"]
    docs = _template(helm, r, tmp_path, "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    sm = _index(docs)[("ServiceMonitor", "nvidia-dcgm-exporter")]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # additionalLabels
    assert sm["spec"]["endpoints"][0]["port"] == "gpu-metrics"
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True


def test_gpu_operator_fail_readiness_value(helm, releases, tmp_path):
    r = releases["gpu-operator"]
    docs = _template(helm, r, tmp_path, "--set", "lab.failReadiness=true")
    dep = _index(docs)[("Deployment", "gpu-operator")]
    assert dep["spec"]["template"]["spec"]["nodeSelector"] == {"lab.gpuforge.io/unschedulable": "true"}


def test_kube_prometheus_stack_objects(helm, releases, tmp_path):
    r = releases["kube-prometheus-stack"]
    docs = _template(helm, r, tmp_path, "--include-crds")
    idx = _index(docs)
    crds = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert {f"{p}.monitoring.coreos.com" for p in
            ("servicemonitors", "podmonitors", "prometheusrules", "prometheuses", "alertmanagers")} <= crds  # fmt: skip
    svc = idx[("Service", "kube-prometheus-stack-prometheus")]  # = gpuforge.render.PROMETHEUS_SERVICE
    assert svc["spec"]["ports"][0]["port"] == 9090
    prom = idx[("Prometheus", "kube-prometheus-stack-prometheus")]["spec"]
    # serviceMonitorSelectorNilUsesHelmValues: false -> every ServiceMonitor, not only release=<name>
    assert prom["serviceMonitorSelector"] == {} and prom["ruleSelector"] == {}
    assert prom["scrapeInterval"] == "15s"
    grafana = idx[("Deployment", "kube-prometheus-stack-grafana")]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for c in grafana if c["name"] == "grafana-sc-dashboard" for e in c["env"]}
    assert env["LABEL"] == "grafana_dashboard" and env["LABEL_VALUE"] == "1" and env["NAMESPACE"] == "ALL"


def test_kube_prometheus_stack_defaults_keep_release_selector(helm, tmp_path):
    out = _run(helm, "template", "monitoring", str(CHARTS / "kube-prometheus-stack"), "-n", "monitoring",
               "--kube-version", KUBE_VERSION)  # fmt: skip
    assert out.returncode == 0, out.stderr
    idx = _index(_docs(out.stdout))
    # Upstream's 26-character fullname and its release-label default (the trap gpuforge's values avoid).
    prom = idx[("Prometheus", "monitoring-kube-prometheus-prometheus")]["spec"]
    assert prom["serviceMonitorSelector"] == {"matchLabels": {"release": "monitoring"}}
    assert ("Service", "monitoring-kube-prometheus-prometheus") in idx


def test_slurm_objects(helm, releases, tmp_path):
    r = releases["slurm"]
    idx = _index(_template(helm, r, tmp_path))
    assert idx[("Controller", "slurm")]["spec"]["clusterName"] == "labc"
    sts = idx[("StatefulSet", "slurm-controller")]["spec"]["template"]
    assert sts["metadata"]["labels"]["app.kubernetes.io/name"] == "slurmctld"
    assert sts["spec"]["containers"][0]["name"] == "slurmctld"
    nodesets = {name: d for (kind, name), d in idx.items() if kind == "NodeSet"}
    assert set(nodesets) == {"slurm-worker-gpu-8", "slurm-worker-gpu-4"}
    ns8 = nodesets["slurm-worker-gpu-8"]["spec"]
    assert ns8["replicas"] == 1
    assert ns8["slurmd"]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert ns8["template"]["spec"]["nodeSelector"]["gpuforge.io/nodeset"] == "gpu-8"
    assert ns8["partition"]["enabled"] is False  # gpuforge's `partition: {enabled: false}` wins over the default
    conf = idx[("ConfigMap", "slurm-config")]["data"]
    assert "PartitionName=gpu Nodes=gpu-4,gpu-8 Default=YES" in conf["slurm.conf"].splitlines()
    assert conf["gres.conf"] == "AutoDetect=nvidia\n"


def test_slurm_upstream_quickstart_values(helm, tmp_path):
    """`--set-json 'nodesets={"slinky":{}}' --set partitions.all.enabled=true` as in Slinky's docs."""
    out = _run(helm, "template", "slurm", str(CHARTS / "slurm"), "-n", "slurm", "--kube-version", KUBE_VERSION,
               "--set-json", 'nodesets={"slinky":{}}', "--set", "partitions.all.enabled=true")  # fmt: skip
    assert out.returncode == 0, out.stderr
    idx = _index(_docs(out.stdout))
    assert idx[("NodeSet", "slurm-worker-slinky")]["spec"]["replicas"] == 1
    lines = idx[("ConfigMap", "slurm-config")]["data"]["slurm.conf"].splitlines()
    assert "PartitionName=all Nodes=ALL MaxTime=UNLIMITED State=UP" in lines
    assert "PartitionName=slinky Nodes=slinky MaxTime=UNLIMITED State=UP" in lines
    # Without values no NodeSet at all (Slinky 1.2 default).
    out = _run(helm, "template", "slurm", str(CHARTS / "slurm"), "-n", "slurm", "--kube-version", KUBE_VERSION)
    assert out.returncode == 0 and "kind: NodeSet" not in out.stdout


def test_slurm_operator_crds(helm, releases, tmp_path):
    docs = _template(helm, releases["slurm-operator-crds"], tmp_path)
    crds = {d["spec"]["names"]["kind"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert set(crds) == {"Controller", "NodeSet", "LoginSet", "Accounting", "RestApi", "Token"}
    for crd in crds.values():
        assert crd["spec"]["group"] == "slinky.slurm.net"
        assert [v["name"] for v in crd["spec"]["versions"]] == ["v1beta1"]
    nodeset = crds["NodeSet"]["spec"]["versions"][0]
    assert nodeset["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    status = nodeset["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for field in ("replicas", "readyReplicas", "slurmIdle", "slurmAllocated", "slurmDown", "slurmDrain", "conditions"):
        assert field in status


def test_other_charts_objects(helm, releases, tmp_path):
    op = _index(_template(helm, releases["slurm-operator"], tmp_path))
    assert op[("Deployment", "slurm-operator")]["metadata"]["namespace"] == "slinky"
    cm = _template(helm, releases["cert-manager"], tmp_path)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in cm}
    assert ("Deployment", "cert-manager") in kinds
    assert ("CustomResourceDefinition", "certificates.cert-manager.io") in kinds  # crds.enabled: true
    dash = _index(_template(helm, releases["kubernetes-dashboard"], tmp_path))
    assert dash[("Service", "kubernetes-dashboard-kong-proxy")]["spec"]["ports"][0]["port"] == 443
    assert ("Ingress", "kubernetes-dashboard") not in dash  # app.ingress.enabled: false
