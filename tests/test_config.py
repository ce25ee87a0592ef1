"""The config model: the seed loads verbatim; every bad config gets its exact one-line message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gpuforge.config import ConfigError, Role, load_config, node_access_problems, parse_config

REPO = Path(__file__).resolve().parents[1]
BAD = Path(__file__).parent / "configs" / "bad"
SEED = REPO / "deployments" / "prod" / "config.yml"

# file stem -> every line the loader must print, exactly ({file} is the path given to load_config).
EXPECTED = {
    "bad_cidr": [
        "{file}:5:17: kubespray.service_cidr: '10.233.0.0/33' is not a valid IPv4 CIDR ('33' is not a valid netmask); write it like \"10.233.0.0/18\""
    ],
    "bad_cluster_name": [
        "{file}:4:15: cluster_name: 'My_Cluster' must be lowercase letters, digits and '-', at most 40 characters"
    ],
    "bad_label_key": [
        "{file}:4:5: k8s_cluster_nodes[0].labels: label key '-bad-key' is invalid: the name part must be 1-63 characters of letters, digits, '-', '_', '.', starting and ending with a letter or digit"
    ],
    "bad_label_prefix": [
        "{file}:4:5: k8s_cluster_nodes[0].labels: label key prefix 'Example.COM' is not a DNS subdomain (lowercase letters, digits, '-', '.')"
    ],
    "bad_label_value": [
        "{file}:4:5: k8s_cluster_nodes[0].labels: label value 'ml research' is invalid: at most 63 characters of letters, digits, '-', '_', '.', starting and ending with a letter or digit (or empty)"
    ],
    "bad_network_plugin": [
        "{file}:5:19: kubespray.network_plugin: 'weave' is not allowed; use one of 'calico', 'cilium', 'flannel', 'kube-ovn', 'kube-router', 'custom_cni' or 'cni'"
    ],
    "bad_node_name": [
        "{file}:2:33: k8s_cluster_nodes[0].name: 'Node_A' must be a DNS label: lowercase letters, digits and '-', at most 63 characters"
    ],
    "bad_prometheus_url": [
        "{file}:4:17: prometheus_url: 'prometheus:9090' must be an http(s) URL like \"http://127.0.0.1:9090\""
    ],
    "bad_remediate": [
        "{file}:4:12: remediate: 'drain' is not allowed; use one of 'off', 'cordon' or 'cordon+drain-slurm'"
    ],
    "bad_taint_effect": [
        "{file}:4:52: k8s_cluster_nodes[0].taints[0].effect: 'NoScheduling' is not allowed; use one of 'NoSchedule', 'PreferNoSchedule' or 'NoExecute'"
    ],
    "bad_timezone": [
        '{file}:4:11: timezone: \'Mars/Olympus\' is not an IANA time zone such as "Europe/Berlin" or "UTC"'
    ],
    "cidr_host_bits": [
        "{file}:5:13: kubespray.pod_cidr: '10.233.64.1/18' is not a valid IPv4 CIDR (10.233.64.1/18 has host bits set); write it like \"10.233.0.0/18\""
    ],
    "drift_ignore_pointer": ["{file}:5:3: drift.ignore: 'helm/gpu-operator' must be a JSON pointer starting with '/'"],
    "duplicate_ip": [
        "{file}:3:7: k8s_cluster_nodes[1].ip: duplicate IP 192.168.1.11 (also node 0); give each node its own IP"
    ],
    "duplicate_key": ["{file}:2:1: duplicate key 'ansible_user' in the same mapping; keep one of them"],
    "duplicate_name": [
        "{file}:3:27: k8s_cluster_nodes[1].name: duplicate node name 'node-a' (also node 0); names must be unique"
    ],
    "empty_nodes": ["{file}:1:1: k8s_cluster_nodes: must not be empty; list at least one entry"],
    "empty_roles": ["{file}:2:27: k8s_cluster_nodes[0].role: must not be empty; list at least one entry"],
    "enabled_missing": ["{file}:5:3: deepops_services.slurm.enabled: is required; add it"],
    "even_etcd": ["{file}:1:1: k8s_cluster_nodes: 2 etcd nodes: etcd needs an odd number for quorum; use 1, 3 or 5"],
    "gpu_and_cpu_worker": [
        "{file}:2:27: k8s_cluster_nodes[0].role: a node cannot be both gpu-worker and cpu-worker; pick one"
    ],
    "gpu_count_on_cpu": [
        "{file}:3:64: k8s_cluster_nodes[1].gpu_count: gpu_count is set on a node without the gpu-worker role; add gpu-worker to its roles or remove the field"
    ],
    "gpu_count_string": ["{file}:3:60: k8s_cluster_nodes[1].gpu_count: must be a whole number, not '8'"],
    "gpu_count_zero": [
        "{file}:3:60: k8s_cluster_nodes[1].gpu_count: 0 is out of range: input should be greater than or equal to 1"
    ],
    "gpu_model_on_cpu": [
        "{file}:2:60: k8s_cluster_nodes[0].gpu_model: gpu_model is set on a node without the gpu-worker role; add gpu-worker to its roles or remove the field"
    ],
    "invalid_ip": [
        "{file}:2:11: k8s_cluster_nodes[0].ip: '192.168.1.300' is not an IPv4 address; write it as four numbers like \"192.168.1.11\""
    ],
    "ip_not_string": ["{file}:2:11: k8s_cluster_nodes[0].ip: must be a string, not 192.168; quote it"],
    "key_and_secret": [
        "{file}:5:1: ansible_ssh_private_key_secret: set either ansible_ssh_private_key_file or this, not both"
    ],
    "kube_version_v": [
        "{file}:5:17: kubespray.kube_version: 'v1.35.4' must look like \"1.35.4\" (no leading 'v', as Kubespray wants)"
    ],
    "missing_nodes": ["{file}:1:1: k8s_cluster_nodes: is required; add it"],
    "missing_role": ["{file}:2:5: k8s_cluster_nodes[0].role: is required; add it"],
    "no_control_plane": [
        "{file}:1:1: k8s_cluster_nodes: no node has the control-plane role; add control-plane to at least one node's roles"
    ],
    "no_etcd": ["{file}:1:1: k8s_cluster_nodes: no node has the etcd role; give it to 1, 3 or 5 nodes"],
    "node_in_pod_cidr": [
        "{file}:2:7: k8s_cluster_nodes[0].ip: node IP 10.233.70.5 lies inside the service or pod CIDR; change one of them"
    ],
    "not_a_mapping": ["{file}:1:1: the config must be a YAML mapping with k8s_cluster_nodes at the top"],
    "overlapping_cidrs": [
        "{file}:6:3: kubespray.pod_cidr: pod_cidr 10.233.64.0/18 overlaps service_cidr 10.233.0.0/16; choose ranges that don't overlap"
    ],
    "slurm_without_gpu_node": [
        "{file}:7:5: deepops_services.slurm.enabled: Slurm is enabled but no GPU node is in Slurm; add a gpu-worker node, remove `slurm: false` from one, or set enabled: false"
    ],
    "slurm_without_gpu_worker": [
        "{file}:5:12: deepops_services.slurm.enabled: Slurm is enabled but no GPU node is in Slurm; add a gpu-worker node, remove `slurm: false` from one, or set enabled: false"
    ],
    "string_bool_quoted": [
        '{file}:5:21: deepops_services.slurm.enabled: must be true or false, not \'true\'; write an unquoted YAML boolean ("yes"/"no"/"on" are strings)'
    ],
    "string_bool_yes": [
        '{file}:5:28: deepops_services.gpu-operator.enabled: must be true or false, not \'yes\'; write an unquoted YAML boolean ("yes"/"no"/"on" are strings)'
    ],
    "timeout_negative": [
        "{file}:5:14: timeouts.kubespray: -5 is out of range: input should be greater than or equal to 1"
    ],
    "unknown_node_key": ["{file}:2:60: k8s_cluster_nodes[0].rol: unknown key 'rol'; did you mean 'role'?"],
    "unknown_release": [
        "{file}:8:7: deepops_services.gpu-operator.releases.gpu-operater: unknown release 'gpu-operater'; did you mean 'gpu-operator'?"
    ],
    "unknown_role": [
        "{file}:2:59: k8s_cluster_nodes[0].role[2]: 'master' is not allowed; use one of 'control-plane', 'etcd', 'schedulable', 'gpu-worker' or 'cpu-worker'"
    ],
    "unknown_service": [
        "{file}:5:3: deepops_services.gpu-operater: unknown key 'gpu-operater'; did you mean 'gpu-operator'?"
    ],
    "unknown_service_key": [
        "{file}:5:3: deepops_services.slurm.enabled: is required; add it",
        "{file}:5:12: deepops_services.slurm.enabeld: unknown key 'enabeld'; did you mean 'enabled'?",
    ],
    "unknown_threshold": [
        "{file}:6:13: health.thresholds.H100.max_temp: unknown key 'max_temp'; did you mean 'max_gpu_temp_c'?"
    ],
    "unknown_top_key": ["{file}:1:1: ansible_usr: unknown key 'ansible_usr'; did you mean 'ansible_user'?"],
    "yaml_syntax": ["{file}:5:1: YAML syntax error: expected ',' or '}', but got '<stream end>'; fix the YAML there"],
    "yaml_tab": [
        "{file}:3:1: YAML syntax error: found character '\\t' that cannot start any token; fix the YAML there"
    ],
}


def test_corpus_is_complete():
    assert sorted(p.stem for p in BAD.glob("*.yml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 30


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_bad_config_exact_message(stem):
    path = str(BAD / f"{stem}.yml")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert [str(i) for i in exc.value.issues] == [line.replace("{file}", path) for line in EXPECTED[stem]]


def test_seed_config_loads_verbatim_and_means_what_deepops_means():
    config = load_config(SEED)
    assert config.ansible_user == "ubuntu"
    assert config.ansible_ssh_private_key_file == "~/.ssh/id_rsa"
    assert [(n.name, n.spec.ip) for n in config.nodes] == [
        ("cp-1", "192.168.1.11"),
        ("gpu-1", "192.168.1.12"),
        ("cpu-1", "192.168.1.13"),
    ]
    cp, gpu, cpu = (n.spec for n in config.nodes)
    assert cp.is_control_plane and cp.is_etcd and cp.is_worker
    assert gpu.is_gpu and gpu.gpu_count is None and not gpu.is_control_plane
    assert Role.CPU_WORKER in cpu.role and not cpu.is_gpu
    assert [k for k, s in config.deepops_services.by_key().items() if s.enabled] == [
        "monitoring_stack",
        "gpu-operator",
        "k8s-dashboard",
    ]
    assert not config.enabled("slurm")


def test_extensions_have_defaults_and_names_are_derived_per_role():
    config = parse_config(
        """
k8s_cluster_nodes:
  - { ip: "10.0.0.1", role: [control-plane, etcd] }
  - { ip: "10.0.0.2", role: [gpu-worker], gpu_count: 8, gpu_model: H100 }
  - { ip: "10.0.0.3", role: [gpu-worker] }
  - { ip: "10.0.0.4", role: [cpu-worker], name: big-cpu }
"""
    )
    assert [n.name for n in config.nodes] == ["cp-1", "gpu-1", "gpu-2", "big-cpu"]
    assert config.kubespray.kube_version == "1.35.4" and config.kubespray.version == "v2.31.0"
    assert config.remediate == "off" and config.cluster_name == "gpuforge"


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        parse_config('k8s_cluster_nodes:\n  - { ip: "1.2.3.999", role: [etcd] }\nremediate: maybe\n', source="c.yml")
    lines = [str(i) for i in exc.value.issues]
    assert len(lines) == 2
    assert lines[0].startswith("c.yml:2:11: k8s_cluster_nodes[0].ip:")
    assert lines[1].startswith("c.yml:3:12: remediate:")


def test_key_file_checked_only_for_commands_that_connect(tmp_path):
    cfg = tmp_path / "config.yml"
    cfg.write_text(SEED.read_text().replace("~/.ssh/id_rsa", "keys/id_lab"))
    config = load_config(cfg)  # loading alone does not need the key
    [problem] = node_access_problems(config)
    assert str(problem) == (
        f"{cfg}:5:31: ansible_ssh_private_key_file: key file {tmp_path}/keys/id_lab does not exist; "
        "create it or point to the right file"
    )
    key = tmp_path / "keys" / "id_lab"
    key.parent.mkdir()
    key.write_text("not a real key")
    assert node_access_problems(config) == []


def test_key_path_that_is_a_directory_is_not_readable(tmp_path):
    config = parse_config(
        f'ansible_ssh_private_key_file: "{tmp_path}"\nk8s_cluster_nodes: [{{ip: "10.0.0.1", role: [control-plane, etcd]}}]\n'
    )
    [problem] = node_access_problems(config)
    assert "is not readable" in str(problem)


def test_copy_of_seed_elsewhere_resolves_relative_paths_from_its_folder(tmp_path):
    shutil.copy(SEED, tmp_path / "config.yml")
    (tmp_path / "config.yml").write_text(SEED.read_text().replace("~/.ssh/id_rsa", "id"))
    config = load_config(tmp_path / "config.yml")
    assert config.path("id") == tmp_path / "id"
