"""Host keys: known_hosts parsing and the verdict on an offered key (pure), the config keys, the ssh settings."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from gpuforge import preflight as rules
from gpuforge.config import ConfigError, node_access_problems, parse_config
from gpuforge.hostkeys import HostKey, judge_host_key, parse_keyscan, parse_known_hosts
from tasks.ansible import host_key_env

NODES = 'k8s_cluster_nodes:\n  - { ip: "10.0.0.1", name: cp-1, role: [control-plane, etcd] }\n'


def make_key(tmp_path: Path, name: str, kind: str = "ed25519") -> tuple[HostKey, str]:
    """A real host key and its fingerprint as `ssh-keygen -lf` prints it."""
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    key_type, blob = path.with_suffix(".pub").read_text().split()[:2]
    printed = subprocess.run(["ssh-keygen", "-lf", str(path)], capture_output=True, text=True, check=True)
    return HostKey(key_type, blob), printed.stdout.split()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    return {name: make_key(tmp, name, kind) for name, kind in (("a", "ed25519"), ("b", "ed25519"), ("r", "rsa"))}


def line(host: str, key: HostKey) -> str:
    return f"{host} {key.type} {key.blob}\n"


def test_fingerprint_is_what_ssh_keygen_prints(keys):
    for key, printed in keys.values():
        assert key.fingerprint == printed and printed.startswith("SHA256:")


def test_new_host_is_trusted_on_first_use_under_accept_new_and_refused_under_strict(keys):
    a, fp = keys["a"]
    known = parse_known_hosts(line("10.0.0.9", keys["b"][0]))  # another host's key only
    verdict = judge_host_key("gpu-1", "10.0.0.1", [a], known, "accept-new")
    assert (verdict.status, verdict.refused) == ("new", False)
    strict = judge_host_key("gpu-1", "10.0.0.1", [a], known, "strict")
    assert strict.refused and strict.status == "unknown"
    assert strict.message == (
        f"gpu-1: host key of 10.0.0.1 not known, and ssh_host_key_checking is strict; it offers ssh-ed25519 {fp}. "
        "Check that fingerprint out of band (on the host: ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), then add "
        "the key to the file ssh_known_hosts names (ssh-keyscan -t ssh-ed25519 10.0.0.1)"
    )


def test_same_key_is_known(keys):
    a, fp = keys["a"]
    known = parse_known_hosts("# pinned by gpuforge\n\n" + line("10.0.0.1", a), "/s/known_hosts")
    for policy in ("accept-new", "strict"):
        verdict = judge_host_key("gpu-1", "10.0.0.1", [a], known, policy)
        assert (verdict.status, verdict.refused, verdict.detail) == (
            "known",
            False,
            f"10.0.0.1: pinned ssh-ed25519 {fp}",
        )


def test_changed_key_is_refused_naming_host_and_both_fingerprints(keys):
    (a, fp_a), (b, fp_b) = keys["a"], keys["b"]
    known = parse_known_hosts(line("10.0.0.2", b) + line("10.0.0.1", a), "/s/known_hosts")
    for policy in ("accept-new", "strict"):
        verdict = judge_host_key("gpu-1", "10.0.0.1", [b], known, policy)
        assert verdict.refused and verdict.status == "changed"
        assert verdict.message == (
            f"gpu-1: HOST KEY CHANGED for 10.0.0.1: pinned ssh-ed25519 {fp_a} (/s/known_hosts:2), offered now "
            f"ssh-ed25519 {fp_b}; nothing runs on this host. If it was reinstalled, check the new fingerprint out "
            "of band, then remove the old key: ssh-keygen -R 10.0.0.1 -f /s/known_hosts"
        )
    assert not judge_host_key("gpu-1", "10.0.0.1", [b], known, "off").refused


def test_pinned_key_type_no_longer_offered_is_a_change(keys):
    (a, fp_a), (r, fp_r) = keys["a"], keys["r"]
    known = parse_known_hosts(line("10.0.0.1", a))
    verdict = judge_host_key("gpu-1", "10.0.0.1", [r], known, "accept-new")
    assert verdict.refused and fp_a in verdict.message and f"offered now ssh-rsa {fp_r}" in verdict.message
    # a second key type beside the pinned one is fine; a pinned type with another key is not
    assert not judge_host_key("gpu-1", "10.0.0.1", [a, r], known, "accept-new").refused
    both = parse_known_hosts(line("10.0.0.1", a) + line("10.0.0.1", keys["r"][0]))
    assert not judge_host_key("gpu-1", "10.0.0.1", [r, a], both, "strict").refused


def test_hashed_wildcard_and_negated_entries(keys, tmp_path):
    (a, _), (b, _) = keys["a"], keys["b"]
    kh = tmp_path / "known_hosts"
    kh.write_text(line("10.0.0.1", a))
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(kh)], check=True, capture_output=True)
    assert kh.read_text().startswith("|1|")
    known = parse_known_hosts(kh.read_text())
    assert judge_host_key("n", "10.0.0.1", [a], known, "strict").status == "known"
    assert judge_host_key("n", "10.0.0.11", [a], known, "strict").status == "unknown"
    assert judge_host_key("n", "10.0.0.1", [b], known, "accept-new").status == "changed"
    pattern = parse_known_hosts(line("10.0.0.*,!10.0.0.7", a))
    assert judge_host_key("n", "10.0.0.5", [a], pattern, "strict").status == "known"
    assert judge_host_key("n", "10.0.0.7", [a], pattern, "strict").status == "unknown"


def test_revoked_key_is_refused(keys):
    a, fp = keys["a"]
    known = parse_known_hosts(f"@revoked * {a.type} {a.blob}\n")
    verdict = judge_host_key("gpu-1", "10.0.0.1", [a], known, "accept-new")
    assert verdict.refused and verdict.status == "revoked" and fp in verdict.message


def test_silent_host_is_left_to_ssh_to_report_unreachable(keys):
    verdict = judge_host_key("gpu-1", "10.0.0.1", [], parse_known_hosts(line("10.0.0.1", keys["a"][0])), "strict")
    assert (verdict.status, verdict.refused) == ("silent", False)


def test_malformed_lines_are_skipped_and_keyscan_output_parsed(keys):
    a, _ = keys["a"]
    assert parse_known_hosts("garbage\n10.0.0.1 ssh-ed25519 !!!notbase64\n" + line("10.0.0.1", a)) != []
    assert len(parse_known_hosts("garbage\n10.0.0.1 ssh-ed25519 !!!notbase64\n")) == 0
    scanned = parse_keyscan(f"# 10.0.0.1:22 SSH-2.0-OpenSSH_9.2\n{line('10.0.0.1', a)}")
    assert scanned == {"10.0.0.1": [a]}


def test_preflight_refused_host_runs_nothing_and_is_a_blocking_failure(keys):
    (a, _), (b, _) = keys["a"], keys["b"]
    config = parse_config(NODES + '  - { ip: "10.0.0.2", name: cpu-1, role: [cpu-worker] }\n')
    known = parse_known_hosts(line("10.0.0.1", a))
    verdicts = {
        "cp-1": judge_host_key("cp-1", "10.0.0.1", [b], known, "accept-new"),
        "cpu-1": judge_host_key("cpu-1", "10.0.0.2", [], known, "accept-new"),
    }
    results = rules.judge_preflight(config, {"cp-1": None, "cpu-1": None}, verdicts)
    assert list(results["cp-1"]) == ["host_key"]
    assert results["cpu-1"]["reachable"].detail == "unreachable over SSH"
    failures = rules.blocking_failures(results)
    assert failures[0].startswith("cp-1: host_key: HOST KEY CHANGED for 10.0.0.1: pinned ssh-ed25519")
    assert failures[1] == "cpu-1: reachable: unreachable over SSH"
    assert rules.table_rows(results)[1]["host_key"].startswith("ok (10.0.0.2 offered no host key")


def test_config_keys_default_and_one_line_errors(tmp_path):
    assert parse_config(NODES).ssh_host_key_checking == "accept-new"
    assert parse_config(NODES + "ssh_host_key_checking: strict\n").ssh_host_key_checking == "strict"
    with pytest.raises(ConfigError) as err:
        parse_config(NODES + "ssh_host_key_checking: no\n", source="c.yml")
    assert str(err.value) == (
        "c.yml:3:24: ssh_host_key_checking: 'no' is not allowed; use one of 'accept-new', 'strict' or 'off'"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(NODES + "ssh_host_key_checking: 'off'\nssh_known_hosts: kh\n", source="c.yml")
    assert str(err.value) == (
        "c.yml:4:1: ssh_known_hosts: ssh_host_key_checking is off, so these keys would never be checked; use strict"
    )
    config = parse_config(NODES + "ssh_known_hosts: kh\nansible_ssh_private_key_secret: k\n", "c.yml", tmp_path)
    [problem] = node_access_problems(config)
    assert str(problem).endswith(
        f"ssh_known_hosts: known_hosts file {tmp_path / 'kh'} is missing or not readable; "
        "point to the file of the hosts' keys"
    )
    (tmp_path / "kh").write_text("")
    assert node_access_problems(config) == []


def test_ansible_ssh_settings_per_policy(tmp_path):
    files = [tmp_path / "state dir" / "known_hosts", tmp_path / "kh"]
    env = host_key_env("accept-new", files)
    args = shlex.split(env["ANSIBLE_SSH_ARGS"])
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True"
    assert "StrictHostKeyChecking=accept-new" in args and f'UserKnownHostsFile="{files[0]}" "{files[1]}"' in args
    # what ssh itself makes of these options (ssh -G prints the resolved configuration, connects nowhere)
    resolved = subprocess.run(["ssh", "-G", *args, "10.0.0.1"], capture_output=True, text=True, check=True).stdout
    assert f"userknownhostsfile {files[0]} {files[1]}" in resolved.replace('"', "")
    assert "stricthostkeychecking accept-new" in resolved
    assert "GlobalKnownHostsFile=/dev/null" in args and "ServerAliveInterval=2" in args
    assert "StrictHostKeyChecking=yes" in shlex.split(host_key_env("strict", files[:1])["ANSIBLE_SSH_ARGS"])
    off = host_key_env("off")
    assert off["ANSIBLE_HOST_KEY_CHECKING"] == "False"
    assert {"StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null"} <= set(shlex.split(off["ANSIBLE_SSH_ARGS"]))
    with pytest.raises(ValueError):
        host_key_env("strict")


def test_preflight_says_why_a_host_was_unreachable():
    """A host that accepts TCP and never sends its banner: the row says what ssh said, not only "unreachable"."""
    config = parse_config(NODES + '  - { ip: "10.0.0.2", name: cpu-1, role: [cpu-worker] }\n')
    why = rules.unreachable_reason(
        "Task failed: Failed to connect to the host via ssh: Connection timed out during banner exchange"
    )
    assert why == "Connection timed out during banner exchange"
    results = rules.judge_preflight(config, {"cp-1": None, "cpu-1": None}, None, {"cpu-1": why})
    assert rules.blocking_failures(results) == [
        "cp-1: reachable: unreachable over SSH",
        "cpu-1: reachable: unreachable over SSH (Connection timed out during banner exchange)",
    ]
