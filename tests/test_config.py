"""The config model: the seed loads verbatim; every bad config gets its exact one-line message."""

from __future__ import annotations

import shutil
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML

from gpuforge import pins
from gpuforge.config import ConfigError, Role, load_config, node_access_problems, parse_config
from gpuforge_cli.app import app

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO.parent / "shared" / "upstream"
BAD = Path(__file__).parent / "configs" / "bad"
SEED = REPO / "deployments" / "prod" / "config.yml"

# file stem -> every line `gpuforge plan` must print, exactly ({file} is the path given to --config).
EXPECTED = {
    "ansible_user_empty": [
        "{file}:1:15: ansible_user: '' is not a user name: at most 32 lowercase letters, digits, '_' and '-', starting with a letter or '_'; write the login name on the nodes, such as \"ubuntu\""
    ],
    "ansible_user_injection": [
        "{file}:1:15: ansible_user: 'ubuntu; rm -rf /' is not a user name: at most 32 lowercase letters, digits, '_' and '-', starting with a letter or '_'; write the login name on the nodes, such as \"ubuntu\""
    ],
    "ansible_user_number": ["{file}:1:15: ansible_user: must be a string, not 1000; quote it"],
    "ansible_user_space": [
        "{file}:1:15: ansible_user: 'deploy user' is not a user name: at most 32 lowercase letters, digits, '_' and '-', starting with a letter or '_'; write the login name on the nodes, such as \"ubuntu\""
    ],
    "ansible_user_too_long": [
        "{file}:1:15: ansible_user: 'a_very_long_service_account_name_x' is not a user name: at most 32 lowercase letters, digits, '_' and '-', starting with a letter or '_'; write the login name on the nodes, such as \"ubuntu\""
    ],
    "ansible_user_uppercase": [
        "{file}:1:15: ansible_user: 'Ubuntu' is not a user name: at most 32 lowercase letters, digits, '_' and '-', starting with a letter or '_'; write the login name on the nodes, such as \"ubuntu\""
    ],
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
    "bom_crlf_then_latin1": ["{file}:2:4: byte 0xe9 is not UTF-8; save the file as UTF-8"],
    "cidr_host_bits": [
        "{file}:5:13: kubespray.pod_cidr: '10.233.64.1/18' is not a valid IPv4 CIDR (10.233.64.1/18 has host bits set); write it like \"10.233.0.0/18\""
    ],
    "container_manager_unknown": [
        "{file}:5:22: kubespray.container_manager: 'podman' is not allowed; use one of 'containerd', 'crio' or 'docker'"
    ],
    "drift_ignore_pointer": ["{file}:5:3: drift.ignore: 'helm/gpu-operator' must be a JSON pointer starting with '/'"],
    "duplicate_derived_name": [
        "{file}:4:5: k8s_cluster_nodes[2]: duplicate node name 'gpu-1' (also node 1); a node without a name is named from its role (cp-1, gpu-1, cpu-1, ...); give it a distinct name"
    ],
    "duplicate_derived_name_first": [
        "{file}:4:27: k8s_cluster_nodes[2].name: duplicate node name 'gpu-1' (also node 1); a node without a name is named from its role (cp-1, gpu-1, cpu-1, ...); give it a distinct name"
    ],
    "duplicate_ip": [
        "{file}:3:7: k8s_cluster_nodes[1].ip: duplicate IP 192.168.1.11 (also node 0); give each node its own IP, and list a node once with all its roles"
    ],
    "duplicate_key": ["{file}:2:1: duplicate key 'ansible_user' in the same mapping; keep one of them"],
    "duplicate_name": [
        "{file}:3:27: k8s_cluster_nodes[1].name: duplicate node name 'node-a' (also node 0); names must be unique"
    ],
    "empty_file": ["{file}:1:1: the config file is empty; list k8s_cluster_nodes in it"],
    "empty_nodes": ["{file}:1:1: k8s_cluster_nodes: must not be empty; list at least one entry"],
    "empty_roles": ["{file}:2:27: k8s_cluster_nodes[0].role: must not be empty; list at least one entry"],
    "enabled_missing": ["{file}:5:3: deepops_services.slurm.enabled: is required; add it"],
    "even_etcd": ["{file}:1:1: k8s_cluster_nodes: 2 etcd nodes: etcd needs an odd number for quorum; use 1, 3 or 5"],
    "gpu_and_cpu_worker": [
        "{file}:2:27: k8s_cluster_nodes[0].role: a node cannot be both gpu-worker and cpu-worker; pick one"
    ],
    "gpu_count_float": ["{file}:3:60: k8s_cluster_nodes[1].gpu_count: must be a whole number, not 8.5"],
    "gpu_count_on_cpu": [
        "{file}:3:64: k8s_cluster_nodes[1].gpu_count: gpu_count is set on a node without the gpu-worker role; add gpu-worker to its roles or remove the field"
    ],
    "gpu_count_string": ["{file}:3:60: k8s_cluster_nodes[1].gpu_count: must be a whole number, not '8'"],
    "gpu_count_too_many": [
        "{file}:3:60: k8s_cluster_nodes[1].gpu_count: 65 is out of range: input should be less than or equal to 64"
    ],
    "gpu_count_words": ["{file}:3:60: k8s_cluster_nodes[1].gpu_count: must be a whole number, not '8 GPUs'"],
    "gpu_count_zero": [
        "{file}:3:60: k8s_cluster_nodes[1].gpu_count: 0 is out of range: input should be greater than or equal to 1"
    ],
    "gpu_model_on_cpu": [
        "{file}:2:60: k8s_cluster_nodes[0].gpu_model: gpu_model is set on a node without the gpu-worker role; add gpu-worker to its roles or remove the field"
    ],
    "invalid_ip": [
        "{file}:2:11: k8s_cluster_nodes[0].ip: '192.168.1.300' is not an IPv4 address; write it as four numbers like \"192.168.1.11\""
    ],
    "invalid_utf8_mid_line": ["{file}:2:36: byte 0xff is not UTF-8; save the file as UTF-8"],
    "ip_hostname": [
        "{file}:2:11: k8s_cluster_nodes[0].ip: 'node1.example.com' is not an IPv4 address; write it as four numbers like \"192.168.1.11\""
    ],
    "ip_not_string": ["{file}:2:11: k8s_cluster_nodes[0].ip: must be a string, not 192.168; quote it"],
    "ip_with_port": [
        "{file}:2:11: k8s_cluster_nodes[0].ip: '192.168.1.11:22' is not an IPv4 address; write it as four numbers like \"192.168.1.11\""
    ],
    "ipv6_address": [
        "{file}:2:11: k8s_cluster_nodes[0].ip: 'fd00::11' is an IPv6 address; gpuforge installs IPv4 clusters only: give the node's IPv4 address"
    ],
    "ipv6_bracketed": [
        "{file}:2:11: k8s_cluster_nodes[0].ip: '[2001:db8::11]' is not an IPv4 address; write it as four numbers like \"192.168.1.11\""
    ],
    "key_and_secret": [
        "{file}:5:1: ansible_ssh_private_key_secret: set either ansible_ssh_private_key_file or this, not both"
    ],
    "key_trailing_space": [
        "{file}:1:1: ansible_user : unknown key 'ansible_user ': the spaces around it are part of the key; write 'ansible_user'"
    ],
    "kube_version_newer": [
        "{file}:5:17: kubespray.kube_version: 1.36.0 is not supported by Kubespray v2.31.0 (it supports 1.33.0-1.33.11, 1.34.0-1.34.7, 1.35.0-1.35.4); use one of those, such as 1.35.4"
    ],
    "kube_version_old": [
        "{file}:5:17: kubespray.kube_version: 1.20.0 is not supported by Kubespray v2.31.0 (it supports 1.33.0-1.33.11, 1.34.0-1.34.7, 1.35.0-1.35.4); use one of those, such as 1.35.4"
    ],
    "kube_version_patch_unknown": [
        "{file}:5:17: kubespray.kube_version: 1.33.12 is not supported by Kubespray v2.31.0 (it supports 1.33.0-1.33.11, 1.34.0-1.34.7, 1.35.0-1.35.4); use one of those, such as 1.35.4"
    ],
    "kube_version_two_parts": [
        "{file}:5:17: kubespray.kube_version: '1.35' must look like \"1.35.4\" (no leading 'v', as Kubespray wants)"
    ],
    "kube_version_v": [
        "{file}:5:17: kubespray.kube_version: 'v1.35.4' must look like \"1.35.4\" (no leading 'v', as Kubespray wants)"
    ],
    "label_value_number": ["{file}:4:21: k8s_cluster_nodes[0].labels.rack: must be a string, not 12; quote it"],
    "latin1_comment": ["{file}:2:6: byte 0xe9 is not UTF-8; save the file as UTF-8"],
    "missing_nodes": ["{file}:1:1: k8s_cluster_nodes: is required; add it"],
    "missing_role": ["{file}:2:5: k8s_cluster_nodes[0].role: is required; add it"],
    "no_control_plane": [
        "{file}:1:1: k8s_cluster_nodes: no node has the control-plane role; add control-plane to at least one node's roles"
    ],
    "no_etcd": ["{file}:1:1: k8s_cluster_nodes: no node has the etcd role; give it to 1, 3 or 5 nodes"],
    "node_in_pod_cidr": [
        "{file}:2:7: k8s_cluster_nodes[0].ip: node IP 10.233.70.5 lies inside the service or pod CIDR; change one of them"
    ],
    "node_key_trailing_space": [
        "{file}:2:27: k8s_cluster_nodes[0].role : unknown key 'role ': the spaces around it are part of the key; write 'role'"
    ],
    "node_not_mapping": ["{file}:2:5: k8s_cluster_nodes[0]: must be a mapping (key: value), not str"],
    "node_twice_other_roles": [
        "{file}:3:7: k8s_cluster_nodes[1].ip: duplicate IP 192.168.1.11 (also node 0); give each node its own IP, and list a node once with all its roles"
    ],
    "nodes_as_mapping": ["{file}:1:1: k8s_cluster_nodes: must be a list, not dict"],
    "not_a_mapping": ["{file}:1:1: the config must be a YAML mapping with k8s_cluster_nodes at the top"],
    "overlapping_cidrs": [
        "{file}:6:3: kubespray.pod_cidr: pod_cidr 10.233.64.0/18 overlaps service_cidr 10.233.0.0/16; choose ranges that don't overlap"
    ],
    "playbook_not_yml": [
        "{file}:5:13: kubespray.playbook: 'cluster' is not a playbook; name a .yml file such as \"cluster.yml\""
    ],
    "remediation_fraction_zero": [
        "{file}:4:27: remediation_max_fraction: 0 is out of range: input should be greater than 0"
    ],
    "role_listed_twice": ["{file}:2:27: k8s_cluster_nodes[0].role: a role is listed twice; list each role once"],
    "roles_as_string": [
        "{file}:3:33: k8s_cluster_nodes[1].role: must be a list, not the string 'gpu-worker'; write it as [gpu-worker]"
    ],
    "services_as_list": ["{file}:4:1: deepops_services: must be a mapping (key: value), not list"],
    "slurm_flag_string": [
        '{file}:3:56: k8s_cluster_nodes[1].slurm: must be true or false, not \'no\'; write an unquoted YAML boolean ("yes"/"no"/"on" are strings)'
    ],
    "slurm_namespace_moved": [
        "{file}:4:3: validation.slurm_namespace: Slurm runs in the slurm release's namespace 'slurm'; remove this key"
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
    "tab_in_indent": [
        "{file}:3:3: YAML syntax error: found character '\\t' that cannot start any token; fix the YAML there"
    ],
    "tab_nested_key": [
        "{file}:4:1: YAML syntax error: found character '\\t' that cannot start any token; fix the YAML there"
    ],
    "taint_missing_effect": ["{file}:4:14: k8s_cluster_nodes[0].taints[0].effect: is required; add it"],
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
        "{file}:5:12: deepops_services.slurm.enabeld: unknown key 'enabeld'; did you mean 'enabled'?"
    ],
    "unknown_threshold": [
        "{file}:6:13: health.thresholds.H100.max_temp: unknown key 'max_temp'; did you mean 'max_gpu_temp_c'?"
    ],
    "unknown_top_key": ["{file}:1:1: ansible_usr: unknown key 'ansible_usr'; did you mean 'ansible_user'?"],
    "utf16_bom": ["{file}:1:1: the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"],
    "yaml_syntax": ["{file}:5:1: YAML syntax error: expected ',' or '}', but got '<stream end>'; fix the YAML there"],
    "yaml_tab": [
        "{file}:3:1: YAML syntax error: found character '\\t' that cannot start any token; fix the YAML there"
    ],
}


def test_corpus_is_complete():
    assert sorted(p.stem for p in BAD.glob("*.yml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 80


def plan(config: Path, out: Path):
    """`gpuforge plan --config CONFIG --out OUT`, in process: the real command line without a Python start."""
    return CliRunner().invoke(app, ["plan", "--config", str(config), "--out", str(out)])


def assert_refused(config: Path, tmp_path: Path, expected: list[str]) -> None:
    """The command prints exactly `expected`, exits 1, and writes nothing: no plan folder, the file unchanged."""
    before = config.read_bytes()
    result = plan(config, tmp_path / "out")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [line.replace("{file}", str(config)) for line in expected]
    assert list(tmp_path.iterdir()) == [] and config.read_bytes() == before


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_bad_config_exact_message(stem, tmp_path):
    assert_refused(BAD / f"{stem}.yml", tmp_path, EXPECTED[stem])


def test_a_huge_file_is_refused_at_once_without_reading_it_all(tmp_path):
    huge = tmp_path / "config.yml"
    huge.write_bytes(SEED.read_bytes() + b"# padding\n" * (10 * 2**20 // 10))
    work = tmp_path / "work"
    work.mkdir()
    started = time.monotonic()
    assert_refused(
        huge,
        work,
        ["{file}:1:1: the file is larger than 4 MiB, too large for a config; check the --config path"],
    )
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.replace("\n", "\r\n").encode(),  # Windows line endings
        lambda text: "\ufeff".encode() + text.encode(),  # a UTF-8 byte-order mark (Notepad)
        lambda text: "\ufeff".encode() + text.replace("\n", "\r\n").encode(),
    ],
    ids=["crlf", "bom", "bom+crlf"],
)
def test_windows_saved_configs_mean_the_same(encode, tmp_path):
    path = tmp_path / "config.yml"
    path.write_bytes(encode(SEED.read_text()))
    assert load_config(path).model_dump() == load_config(SEED).model_dump()
    result = plan(path, tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_kube_versions_are_the_pinned_kubesprays_checksums():
    """pins.KUBE_VERSIONS is what the pinned release tarball (beside the project) has binaries checksums for."""
    tarball = UPSTREAM / f"kubespray-{pins.KUBESPRAY_VERSION}.tar.gz"
    assert tarball.is_file(), f"{tarball} is missing: it is the source of truth for pins.KUBE_VERSIONS"
    with tarfile.open(tarball) as tar:
        member = next(
            m for m in tar.getmembers() if m.name.endswith("/roles/kubespray_defaults/vars/main/checksums.yml")
        )
        checksums = YAML(typ="safe").load(tar.extractfile(member).read())
    for arch in ("amd64", "arm64"):
        for binary in ("kubelet", "kubeadm", "kubectl"):
            assert tuple(checksums[f"{binary}_checksums"][arch]) == pins.KUBE_VERSIONS, (binary, arch)
    assert pins.KUBE_VERSION == pins.KUBE_VERSIONS[0]


def test_kube_version_of_another_kubespray_release_is_left_to_that_release():
    config = parse_config(
        'k8s_cluster_nodes: [{ip: "10.0.0.1", role: [control-plane, etcd]}]\n'
        "kubespray: {version: v2.30.0, kube_version: 1.32.5}\n"
    )
    assert config.kubespray.kube_version == "1.32.5"


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
