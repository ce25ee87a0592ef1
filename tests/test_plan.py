"""`plan` renders what the install applies, from the config alone, and touches nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml as yaml_1_1
from ruamel.yaml import YAML

from gpuforge import desired, render
from gpuforge.config import parse_config
from gpuforge.plan import alert_rules

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "deployments" / "prod" / "config.yml"
VENV_BIN = Path(sys.executable).parent

MIXED = """
cluster_name: ml
k8s_cluster_nodes:
  - { ip: "10.0.0.1", role: [control-plane, etcd] }
  - { ip: "10.0.0.2", role: [gpu-worker, schedulable], gpu_count: 8, gpu_model: H100,
      labels: { team: vision }, taints: [{ key: dedicated, value: gpu, effect: NoSchedule }] }
  - { ip: "10.0.0.3", role: [gpu-worker, schedulable], gpu_count: 8 }
  - { ip: "10.0.0.4", role: [gpu-worker, schedulable], gpu_count: 4 }
  - { ip: "10.0.0.5", role: [cpu-worker, schedulable] }
deepops_services:
  gpu-operator:
    enabled: true
    releases:
      gpu-operator: { version: v26.3.3, values: { driver: { enabled: false } } }
  monitoring_stack: { enabled: true }
  slurm: { enabled: true }
  k8s-dashboard: { enabled: false }
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "gpuforge"), *args], capture_output=True, text=True, cwd=REPO)


def test_plan_on_seed_writes_inventory_that_ansible_parses(tmp_path):
    result = run_cli("plan", "--config", str(SEED), "--out", str(tmp_path / "plan"))
    assert result.returncode == 0, result.stderr
    inv = subprocess.run(
        [str(VENV_BIN / "ansible-inventory"), "-i", str(tmp_path / "plan" / "hosts.yaml"), "--list"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(inv.stdout)
    assert data["kube_control_plane"]["hosts"] == ["cp-1"]
    assert data["etcd"]["hosts"] == ["cp-1"]
    assert sorted(data["kube_node"]["hosts"]) == ["cp-1", "cpu-1", "gpu-1"]
    gpu = data["_meta"]["hostvars"]["gpu-1"]
    assert gpu["ansible_host"] == gpu["ip"] == gpu["access_ip"] == "192.168.1.12"
    assert gpu["node_labels"]["gpuforge.io/gpu-worker"] == "true"
    # group_vars beside hosts.yaml are picked up, with real booleans
    assert gpu["kube_version"] == "1.35.4" and gpu["kubeconfig_localhost"] is True
    assert gpu["container_manager"] == "containerd"
    files = sorted(str(p.relative_to(tmp_path / "plan")) for p in (tmp_path / "plan").rglob("*") if p.is_file())
    assert "values/gpu-operator.yaml" in files and "values/slurm.yaml" not in files  # slurm disabled in the seed
    assert "dashboards/gpuforge-gpus.json" in files and "rules/gpuforge-gpu-alerts.yaml" in files
    assert "Skipped (disabled in the config): slurm" in result.stdout


def test_plan_json_summary(tmp_path):
    result = run_cli("plan", "--config", str(SEED), "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["kubespray"] == {
        "version": "v2.31.0",
        "kube_version": "1.35.4",
        "container_manager": "containerd",
        "network_plugin": "calico",
    }
    assert [r["release"] for r in summary["releases"]] == [
        "kube-prometheus-stack",
        "gpu-operator",
        "kubernetes-dashboard",
    ]
    assert len(summary["files"]) == 11


def test_bad_config_touches_nothing(tmp_path):
    bad = tmp_path / "config.yml"
    bad.write_text(SEED.read_text().replace("gpu-operator: { enabled: true }", "gpu-operator: { enabled: yes }"))
    out = tmp_path / "out"
    result = run_cli("plan", "--config", str(bad), "--out", str(out))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"{bad}:15:28: deepops_services.gpu-operator.enabled: must be true or false, not 'yes'; "
        'write an unquoted YAML boolean ("yes"/"no"/"on" are strings)'
    ]
    assert not out.exists()


def test_usage_errors_are_one_line():
    result = run_cli("plan", "--bogus")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpuforge plan: error: No such option '--bogus'. Did you mean '--out'? (see 'gpuforge plan --help')"
    ]
    missing = run_cli("plan", "--config", "/nonexistent.yml", "--out", "/tmp/x")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "/nonexistent.yml:1:1: config file not found; check the --config path"


def test_gpu_operator_values_select_servicemonitor_and_user_values_win():
    config = parse_config(MIXED)
    releases = {r.name: r for r in render.render_releases(config)}
    gpu_op = releases["gpu-operator"]
    assert gpu_op.version == "v26.3.3"
    sm = gpu_op.values["dcgmExporter"]["serviceMonitor"]
    assert sm["enabled"] is True and sm["additionalLabels"] == {"release": "kube-prometheus-stack"}
    assert gpu_op.values["driver"] == {"enabled": False}
    assert "operator" not in gpu_op.values  # operator.defaultRuntime is gone from v26.7.0's chart
    kps = releases["kube-prometheus-stack"].values["prometheus"]["prometheusSpec"]
    assert kps["serviceMonitorSelectorNilUsesHelmValues"] is False
    # the ServiceMonitor CRD must exist before the GPU Operator needs it
    assert list(releases).index("kube-prometheus-stack") < list(releases).index("gpu-operator")
    assert "kubernetes-dashboard" not in releases


def test_slurm_nodesets_follow_gpu_counts():
    config = parse_config(MIXED)
    slurm = next(r for r in render.render_releases(config) if r.name == "slurm").values
    assert set(slurm["nodesets"]) == {"gpu-8", "gpu-4"}
    assert slurm["nodesets"]["gpu-8"]["replicas"] == 2
    assert slurm["nodesets"]["gpu-8"]["extraConfMap"] == {"Gres": ["gpu:8"]}
    assert slurm["nodesets"]["gpu-4"]["slurmd"]["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert slurm["partitions"]["gpu"]["nodesets"] == ["gpu-4", "gpu-8"]
    assert slurm["controller"]["extraConfMap"] == {"GresTypes": ["gpu"]}  # Slinky >= 1.2.0 leaves it out
    inv = render.render_inventory(config)["all"]["hosts"]
    assert inv["gpu-1"]["node_labels"]["gpuforge.io/nodeset"] == "gpu-8"
    assert inv["gpu-1"]["node_labels"]["team"] == "vision"
    assert inv["gpu-1"]["node_taints"] == ["dedicated=gpu:NoSchedule"]
    assert inv["cp-1"]["node_taints"] == ["node-role.kubernetes.io/control-plane:NoSchedule"]


def test_alert_rules_and_dashboard_cover_the_gpu_faults():
    config = parse_config(MIXED)
    rule = alert_rules(desired.build(config))
    names = [r["alert"] for r in rule["spec"]["groups"][0]["rules"]]
    assert names == [
        "GPUFatalXid",
        "GPUEccDoubleBit",
        "GPURowRemapFailure",
        "GPURemappedRowsUncorrectable",
        "GPUTemperatureHigh",
        "GPUMemoryTemperatureHigh",
        "GPUMetricsTargetDown",
        "GPUMissing",
    ]
    assert "|79|" in rule["spec"]["groups"][0]["rules"][0]["expr"]  # err_code=~"48|...|79|..."
    missing = rule["spec"]["groups"][0]["rules"][-1]["expr"]
    # dcgm-exporter 4.6.0-4.8.3 (GPU Operator v26.7.0) spells its node label `hostname`
    assert missing.count("count by (hostname)") == 3 and "< 4" in missing
    assert '{hostname=~"(?i)gpu-3"}) < 4' in missing  # exact node names, valid PromQL strings
    dash = render.render_dashboard()
    assert {p["targets"][0]["expr"].split("{")[0] for p in dash["panels"]} >= {
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_XID_ERRORS",
    }


def test_rendered_yaml_round_trips(tmp_path):
    from gpuforge.plan import plan_files

    files = plan_files(desired.build(parse_config(MIXED)))
    yaml = YAML(typ="safe")
    assert yaml.load(files["values/slurm.yaml"]) == next(
        r.values for r in render.render_releases(parse_config(MIXED)) if r.name == "slurm"
    )
    assert "ansible_ssh_private_key_file" not in files["group_vars/all.yml"]  # none configured here
    # Helm and Ansible read YAML 1.1, where an unquoted YES is a boolean
    assert yaml_1_1.safe_load(files["values/slurm.yaml"])["partitions"]["gpu"]["configMap"] == {"Default": "YES"}
    assert 'Default: "YES"' in files["values/slurm.yaml"]


def test_kubespray_keeps_its_dns_domain_and_provisions_volumes():
    k8s = render.render_group_vars(parse_config(MIXED))["k8s_cluster"]
    assert "cluster_name" not in k8s  # Kubespray's cluster_name is the DNS domain: cluster.local stays
    assert k8s["local_path_provisioner_enabled"] is True
    assert k8s["local_path_provisioner_storage_class"] == render.LOCAL_PATH_STORAGE_CLASS
    asked = parse_config(MIXED + "kubespray: { extra_vars: { cluster_name: ml.example } }\n")
    assert render.render_group_vars(asked)["k8s_cluster"]["cluster_name"] == "ml.example"
