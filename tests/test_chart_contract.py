"""Contract tests: gpuforge's rendered values against the real upstream charts and Kubespray at gpuforge's pins.

For a prod-like config (the seed with Slurm on and two GPU workers of 8 and 4 GPUs) every pinned chart is
rendered with `helm template` from the chart mirror `../shared/upstream/charts` (real, unmodified upstream
packages; test data, never copied into the project), and each test asserts one thing a real cluster needs. No lab
and no network: Helm, promtool and the Kubespray v2.31.0 tarball only. The shared folder is always beside the
project in CI, so a missing chart fails these tests instead of skipping them.
"""

from __future__ import annotations

import functools
import re
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from gpuforge import checks, desired, pins, plan, render
from gpuforge.config import load_config, parse_config
from gpuforge.plan import alert_rules

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO.parent / "shared" / "upstream"
CHARTS = UPSTREAM / "charts"
KUBESPRAY_TARBALL = UPSTREAM / f"kubespray-{pins.KUBESPRAY_VERSION}.tar.gz"
SEED = REPO / "deployments" / "prod" / "config.yml"
PROMTOOL = Path("/usr/bin/promtool")

SEED_GPU_NODE = '  - { ip: "192.168.1.12", role: ["gpu-worker", "schedulable"] }\n'
PROD_GPU_NODES = (
    '  - { ip: "192.168.1.12", role: ["gpu-worker", "schedulable"], gpu_count: 8 }\n'
    '  - { ip: "192.168.1.14", role: ["gpu-worker", "schedulable"], gpu_count: 4 }\n'
)


# ------------------------------------------------------------------------------------------------- fixtures


class ManifestLoader(yaml.SafeLoader):
    """YAML 1.1 as Kubernetes reads it, except that a plain `=` (in some CRDs' enums) is the string "=": PyYAML
    resolves it to the 1.1 `value` tag, which it then cannot construct."""


ManifestLoader.add_constructor("tag:yaml.org,2002:value", yaml.SafeLoader.construct_yaml_str)


@pytest.fixture(scope="session")
def prod_config(tmp_path_factory):
    """The seed with Slurm on and GPU workers of 8 (gpu-1) and 4 (gpu-2) GPUs, its charts served by the mirror."""
    text = SEED.read_text()
    assert SEED_GPU_NODE in text and "slurm: { enabled: false }" in text
    text = text.replace(SEED_GPU_NODE, PROD_GPU_NODES).replace("slurm: { enabled: false }", "slurm: { enabled: true }")
    path = tmp_path_factory.mktemp("prod") / "config.yml"
    path.write_text(f"chart_mirror: {CHARTS}\n{text}")
    return load_config(path)


@pytest.fixture(scope="session")
def plan_files(prod_config) -> dict[str, str]:
    return plan.plan_files(desired.build(prod_config))


@pytest.fixture(scope="session")
def releases(prod_config) -> dict[str, render.Release]:
    return {r.name: r for r in render.render_releases(prod_config)}


@pytest.fixture(scope="session")
def helm() -> str:
    from tasks.helm import helm_executable

    return helm_executable()


@pytest.fixture(scope="session")
def rendered(prod_config, plan_files, releases, helm, tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """Release name -> the objects `helm template` renders from its mirror archive with the plan's values file
    (the file as `gpuforge plan` writes it, so its YAML is what Helm reads), at the pinned Kubernetes version.

    Releases render in install order; the API versions of the CRDs earlier releases install are passed on with
    `--api-versions`, as the API server would report them by the time the later release installs."""
    mirror = render.chart_mirror(prod_config, {})
    work = tmp_path_factory.mktemp("values")
    api_versions: list[str] = []
    out = {}
    for release in releases.values():
        archive = render.chart_archive(release, mirror)
        assert archive is not None, (
            f"{render.mirror_file(release, mirror)} missing: the mirror must serve {release.name}"
        )
        values = work / f"{release.name}.yaml"
        values.write_text(plan_files[f"values/{release.name}.yaml"])
        cmd = [helm, "template", release.name, str(archive), "--namespace", release.namespace, "--values", str(values)]
        cmd += ["--kube-version", pins.KUBE_VERSION, "--include-crds"]
        cmd += [arg for version in api_versions for arg in ("--api-versions", version)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"helm template {release.name}: {result.stderr}"
        objects = [o for o in yaml.load_all(result.stdout, Loader=ManifestLoader) if o]
        out[release.name] = objects
        for crd in (o for o in objects if o["kind"] == "CustomResourceDefinition"):
            api_versions += [f"{crd['spec']['group']}/{v['name']}" for v in crd["spec"]["versions"] if v.get("served")]
    return out


@pytest.fixture(scope="session")
def chart_dirs(tmp_path_factory) -> Path:
    """The mirror's archives unpacked, for their values.yaml, Chart.yaml and templates."""
    root = tmp_path_factory.mktemp("charts")
    for archive in CHARTS.glob("*.tgz"):
        with tarfile.open(archive) as tar:
            tar.extractall(root / archive.name.removesuffix(".tgz"), filter="data")
    return root


@pytest.fixture(scope="session")
def kubespray_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kubespray")
    with tarfile.open(KUBESPRAY_TARBALL) as tar:
        tar.extractall(root, filter="data")
    return root / f"kubespray-{pins.KUBESPRAY_VERSION}"


def objects_of(rendered, release: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in rendered[release] if o["kind"] == kind]


def promtool_check_rules(groups: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL.is_file(), f"{PROMTOOL} missing: install Debian's prometheus package (make setup)"
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    return subprocess.run([str(PROMTOOL), "check", "rules", str(rules)], capture_output=True, text=True)


# -------------------------------------------------------------------------------------------- the charts


def test_every_pinned_chart_renders_from_the_mirror(rendered):
    assert list(rendered) == [name for service in pins.CHARTS.values() for name, *_ in service]
    assert all(rendered.values())


# Which values a chart consumes. Rendering with and without each key and diffing the output is unreliable:
# a key set to its default changes nothing, and a consumed key may only change output in combination with
# others. A chart's values.yaml is its documented interface instead: a key gpuforge sets must exist there (the
# values of a subchart under its name or alias), or be read by a template as `.Values.<path>` (keys a chart
# documents only in comments, like the GPU Operator's dcgmExporter.config). Under a free-form map any key is fine.
FREE_FORM = {
    "additionalLabels",
    "annotations",
    "configFiles",
    "configMap",
    "extraConfMap",
    "labels",
    "nodeSelector",
    "resources",
}
# Maps of named entries whose entries take the keys of a defaults entry (Slinky's slurm chart).
NAMED_ENTRIES = {("slurm", "nodesets"): ("nodesetDefaults",), ("slurm", "partitions"): ("partitions", "all")}


@functools.cache
def chart_defaults(chart: Path) -> dict[str, Any]:
    """A chart's default values with each enabled-or-not subchart's own defaults under its name or alias."""
    values = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    for dep in meta.get("dependencies") or []:
        key = dep.get("alias") or dep["name"]
        sub = chart / "charts" / dep["name"]
        if (sub / "values.yaml").is_file():
            values[key] = render.deep_merge(chart_defaults(sub), values.get(key) or {})
    return values


@functools.cache
def chart_templates(chart: Path) -> str:
    return "\n".join(p.read_text() for p in chart.rglob("templates/*") if p.is_file())


def leaf_paths(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in values.items():
        path = prefix + (str(key),)
        paths += leaf_paths(value, path) if isinstance(value, dict) and value else [path]
    return paths


def unconsumed(release: str, chart: Path, path: tuple[str, ...]) -> bool:
    defaults = chart_defaults(chart)
    node: Any = defaults
    for i, key in enumerate(path):
        if i == 1 and (release, path[0]) in NAMED_ENTRIES:
            node = defaults
            for step in NAMED_ENTRIES[(release, path[0])]:
                node = node[step]
            continue
        if not isinstance(node, dict) or key not in node:
            return f".Values.{'.'.join(path)}" not in chart_templates(chart)
        if key in FREE_FORM:
            return False
        node = node[key]
    return False


def test_every_value_gpuforge_sets_is_consumed_by_its_chart(releases, chart_dirs):
    ignored = []
    for release in releases.values():
        [chart] = (chart_dirs / render.mirror_file(release, Path()).name.removesuffix(".tgz")).iterdir()
        ignored += [
            f"{release.name}: {'.'.join(p)}" for p in leaf_paths(release.values) if unconsumed(release.name, chart, p)
        ]
    assert ignored == []


def test_dcgm_servicemonitor_is_selected_by_the_rendered_prometheus(rendered, releases):
    [policy] = objects_of(rendered, "gpu-operator", "ClusterPolicy")
    monitor = policy["spec"]["dcgmExporter"]["serviceMonitor"]
    assert monitor["enabled"] is True
    # The operator, not the chart, creates this ServiceMonitor: in its own namespace, named after the exporter's
    # Service, labelled app=nvidia-dcgm-exporter plus serviceMonitor.additionalLabels.
    service_monitor = {
        "metadata": {
            "name": "nvidia-dcgm-exporter",
            "namespace": releases["gpu-operator"].namespace,
            "labels": {"app": "nvidia-dcgm-exporter", **(monitor.get("additionalLabels") or {})},
        }
    }
    [prometheus] = objects_of(rendered, "kube-prometheus-stack", "Prometheus")
    assert checks.prometheus_selects(prometheus, "serviceMonitor", service_monitor)
    assert checks.servicemonitor_problems([prometheus], [service_monitor]) == []


def test_gpu_alert_rule_is_selected_and_passes_promtool(rendered, prod_config, tmp_path):
    rule = alert_rules(desired.build(prod_config))
    [prometheus] = objects_of(rendered, "kube-prometheus-stack", "Prometheus")
    assert checks.prometheus_selects(prometheus, "rule", rule)
    result = promtool_check_rules(rule["spec"]["groups"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    missing = next(r for r in rule["spec"]["groups"][0]["rules"] if r["alert"] == "GPUMissing")["expr"]
    assert f'{render.DCGM_NODE_LABEL}=~"(?i)gpu-1"}}) < 8' in missing
    assert f'{render.DCGM_NODE_LABEL}=~"(?i)gpu-2"}}) < 4' in missing


def test_every_dashboard_expression_parses(tmp_path):
    # promtool parses expressions only inside rules: each panel's query becomes a recording rule, with the
    # $node variable as Grafana interpolates "All".
    dashboard = render.render_dashboard()
    exprs = [t["expr"].replace("$node", ".*") for p in dashboard["panels"] for t in p["targets"]]
    rules = [{"record": f"gpuforge:panel_{i}", "expr": e} for i, e in enumerate(exprs)]
    result = promtool_check_rules([{"name": "dashboard", "rules": rules}], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # every series of every panel follows the node picker, whose values come from the exporter's node label
    selector = f'{{{render.DCGM_NODE_LABEL}=~"$node"}}'
    assert all(t["expr"].count("DCGM_") == t["expr"].count(selector) for p in dashboard["panels"] for t in p["targets"])
    node_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "node")
    assert node_var["query"] == f"label_values(DCGM_FI_DEV_GPU_TEMP, {render.DCGM_NODE_LABEL})"


def test_dashboard_label_is_the_one_the_grafana_sidecar_watches(rendered):
    deployments = objects_of(rendered, "kube-prometheus-stack", "Deployment")
    containers = [c for d in deployments for c in d["spec"]["template"]["spec"]["containers"]]
    [sidecar] = [c for c in containers if c["name"] == "grafana-sc-dashboard"]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert (env["LABEL"], env["LABEL_VALUE"]) == render.DASHBOARD_SIDECAR_LABEL
    assert env["NAMESPACE"] == "ALL"


def test_slurm_conf_declares_gpu_gres_and_a_default_gpu_partition(rendered):
    # Slinky's operator writes slurm.conf itself; the chart hands it the extra lines in Controller.spec.extraConf.
    [controller] = objects_of(rendered, "slurm", "Controller")
    lines = controller["spec"]["extraConf"].splitlines()
    assert "GresTypes=gpu" in lines
    assert "PartitionName=gpu Nodes=gpu-4,gpu-8 Default=YES" in lines


LINUX = {"kubernetes.io/os": "linux"}  # kubelet's own label on every Linux node


def test_nodesets_match_each_gpu_group(rendered, prod_config):
    hosts = render.render_inventory(prod_config)["all"]["hosts"]
    found = {}
    for nodeset in objects_of(rendered, "slurm", "NodeSet"):
        selector = nodeset["spec"]["template"]["spec"]["nodeSelector"]
        selected = sorted(n for n, h in hosts.items() if selector.items() <= {**h["node_labels"], **LINUX}.items())
        limits = nodeset["spec"]["slurmd"]["resources"]["limits"]
        found[nodeset["metadata"]["name"]] = (nodeset["spec"]["extraConf"], limits["nvidia.com/gpu"], selected)
    assert found == {
        "slurm-worker-gpu-8": ("Gres=gpu:8", 8, ["gpu-1"]),
        "slurm-worker-gpu-4": ("Gres=gpu:4", 4, ["gpu-2"]),
    }


def test_slurmctld_state_volume_binds_on_the_cluster_gpuforge_builds(rendered, prod_config):
    [controller] = objects_of(rendered, "slurm", "Controller")
    persistence = controller["spec"]["persistence"]
    assert persistence["enabled"] is True
    k8s = render.render_group_vars(prod_config)["k8s_cluster"]
    assert k8s["local_path_provisioner_enabled"] is True
    assert persistence["storageClassName"] == k8s["local_path_provisioner_storage_class"]
    assert persistence["storageClassName"] == render.LOCAL_PATH_STORAGE_CLASS


# ------------------------------------------------------------------------------------------------- Kubespray

# Ansible's own connection variables, not Kubespray's.
ANSIBLE_VARS = {
    "ansible_user",
    "ansible_become",
    "ansible_host",
    "ansible_python_interpreter",
    "ansible_ssh_private_key_file",
}


def test_every_group_and_host_var_is_a_kubespray_variable(prod_config, kubespray_tree):
    # A variable is Kubespray's when a role's defaults or the sample inventory define it (commented or not), or
    # docs/ansible/vars.md documents it (host vars such as ip and node_labels are only documented there).
    sources = [*kubespray_tree.glob("roles/**/defaults/**/*.yml"), *kubespray_tree.glob("inventory/sample/**/*.yml")]
    defined = {m for p in sources for m in re.findall(r"^#?\s*([a-z_][a-z0-9_]*):", p.read_text(), re.MULTILINE)}
    documented = (kubespray_tree / "docs" / "ansible" / "vars.md").read_text()
    defined |= set(re.findall(r"^\* \*([a-z_][a-z0-9_]*)\*", documented, re.MULTILINE))
    group_vars = render.render_group_vars(prod_config)
    host_vars = render.render_inventory(prod_config)["all"]["hosts"].values()
    names = {k for v in group_vars.values() for k in v} | {k for h in host_vars for k in h}
    assert sorted(names - ANSIBLE_VARS - defined) == []
    assert "cluster_name" not in group_vars["k8s_cluster"]  # Kubespray's cluster_name is the DNS domain


# --------------------------------------------------------------------------------------- selectors, mirror


def prometheus(namespace: str = "monitoring", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "k8s", "namespace": namespace}, "spec": spec}


def monitor(namespace: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": "sm", "namespace": namespace, "labels": labels}}


def test_selection_needs_labels_and_namespace():
    everything = prometheus(serviceMonitorSelector={}, serviceMonitorNamespaceSelector={})
    assert checks.prometheus_selects(everything, "serviceMonitor", monitor("gpu-operator"))
    # no namespace selector: the Prometheus's own namespace only (prometheus-operator's rule)
    own = prometheus(serviceMonitorSelector={})
    assert not checks.prometheus_selects(own, "serviceMonitor", monitor("gpu-operator"))
    assert checks.prometheus_selects(own, "serviceMonitor", monitor("monitoring"))
    by_name = prometheus(
        serviceMonitorSelector={"matchLabels": {"release": "kps"}},
        serviceMonitorNamespaceSelector={"matchLabels": {"kubernetes.io/metadata.name": "gpu-operator"}},
    )
    assert checks.prometheus_selects(by_name, "serviceMonitor", monitor("gpu-operator", release="kps"))
    assert not checks.prometheus_selects(by_name, "serviceMonitor", monitor("gpu-operator"))
    team = prometheus(serviceMonitorSelector={}, serviceMonitorNamespaceSelector={"matchLabels": {"team": "ml"}})
    assert not checks.prometheus_selects(team, "serviceMonitor", monitor("gpu-operator"))
    assert checks.prometheus_selects(team, "serviceMonitor", monitor("gpu-operator"), {"gpu-operator": {"team": "ml"}})
    [problem] = checks.servicemonitor_problems([own], [monitor("gpu-operator", release="kps")])
    assert problem.startswith("ServiceMonitor gpu-operator/sm (labels {'release': 'kps'}) is selected by no Prometheus")


MIRRORED = """
k8s_cluster_nodes: [{ ip: "10.0.0.1", role: [control-plane, etcd, gpu-worker] }]
deepops_services:
  gpu-operator: { enabled: true }
  monitoring_stack:
    enabled: true
    releases:
      kube-prometheus-stack: { path: charts/kube-prometheus-stack }
"""


def test_chart_mirror_resolution(tmp_path):
    config = parse_config(f"chart_mirror: mirror\n{MIRRORED}", base_dir=tmp_path)
    env = {render.CHART_MIRROR_ENV: "/srv/charts"}
    assert render.chart_mirror(config, env) == tmp_path / "mirror"  # the config wins, relative to its folder
    unset = parse_config(MIRRORED, base_dir=tmp_path)
    assert render.chart_mirror(unset, env) == Path("/srv/charts")
    assert render.chart_mirror(unset, {}) is None
    releases = {r.name: r for r in render.render_releases(config)}
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    assert render.chart_archive(releases["gpu-operator"], mirror) is None  # not mirrored: pulled from the repo
    (mirror / "gpu-operator-v26.7.0.tgz").write_bytes(b"")
    assert render.chart_archive(releases["gpu-operator"], mirror) == mirror / "gpu-operator-v26.7.0.tgz"
    assert render.chart_archive(releases["gpu-operator"], None) is None
    (mirror / "kube-prometheus-stack-88.5.3.tgz").write_bytes(b"")
    assert render.chart_archive(releases["kube-prometheus-stack"], mirror) is None  # a local path wins


class FakeHelm:
    """pyhelm3's Client, recording how the chart was asked for."""

    def __init__(self):
        self.asked: list[tuple[Any, dict[str, Any]]] = []

    async def get_chart(self, chart_ref, **kwargs):
        self.asked.append((chart_ref, kwargs))
        return SimpleNamespace(metadata=SimpleNamespace(version="v26.7.0"))

    async def get_proceedable_revision(self, name, namespace):
        return SimpleNamespace(revision=3)

    async def should_install_or_upgrade_release(self, current, chart, values):
        return False


@pytest.mark.parametrize("mirrored", [True, False])
def test_helm_task_installs_the_mirror_file_else_pulls_from_the_repo(monkeypatch, tmp_path, mirrored):
    import asyncio

    from tasks import helm

    fake = FakeHelm()
    monkeypatch.setattr(helm, "helm_client", lambda kubeconfig: fake)
    config = parse_config(MIRRORED, base_dir=tmp_path)
    release = next(r for r in render.render_releases(config) if r.name == "gpu-operator")
    if mirrored:
        (tmp_path / "gpu-operator-v26.7.0.tgz").write_bytes(b"")
    archive = render.chart_archive(release, tmp_path)
    outcome = asyncio.run(helm._converge(release, tmp_path / "kubeconfig", 60, True, archive))
    assert outcome.action == "unchanged"
    if mirrored:
        assert fake.asked == [(tmp_path / "gpu-operator-v26.7.0.tgz", {})]
    else:
        assert fake.asked == [("gpu-operator", {"repo": "https://helm.ngc.nvidia.com/nvidia", "version": "v26.7.0"})]
