"""The host-key policy and the Secret-block SSH key, through the real preflight flow against two lab SSH hosts.

accept-new pins each host's key on the first run; a host whose key then changes is refused by name with both
fingerprints and nothing runs there, while the other host is checked as usual. strict with nothing pinned
refuses every host; off checks nothing. A private key from a Prefect Secret block never reaches logs,
artifacts, the flow's result, the Ansible event stream or any temporary folder left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.common import ClusterParams
from flows.preflight import preflight
from gpuforge.state import known_hosts_path
from lab import procs
from lab.sshhosts import HostSpec, SshHosts, free_lab_ips

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("sshd") or not shutil.which("ip"), reason="needs root, sshd, iproute2"
    ),
    pytest.mark.usefixtures("prefect_server"),
]

RUN = f"thk{os.getpid() % 100000}"
CP, CPU = f"{RUN}-cp", f"{RUN}-cpu"
CP_IP, CPU_IP = free_lab_ips(2, first=180 + os.getpid() % 40)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two lab SSH hosts and a private GPUFORGE_STATE (restored afterwards)."""
    folder = tmp_path_factory.mktemp("hostkeys")
    hosts = SshHosts(folder / "lab")
    env = pytest.MonkeyPatch()
    env.setenv("GPUFORGE_STATE", str(folder / "state"))
    try:
        hosts.up([HostSpec(CP, CP_IP, 0), HostSpec(CPU, CPU_IP, 0)])
        yield folder, hosts
    finally:
        hosts.down()
        env.undo()


def write_config(folder: Path, cluster: str, key: str, extra: str = "") -> Path:
    path = folder / f"{cluster}.yml"
    path.write_text(
        f"cluster_name: {cluster}\nansible_user: root\nansible_python_interpreter: /usr/bin/python3\n{key}\n"
        f"timeouts: {{preflight: 120}}\n{extra}"
        "k8s_cluster_nodes:\n"
        f'  - {{ip: "{CP_IP}", name: {CP}, role: [control-plane, etcd, schedulable]}}\n'
        f'  - {{ip: "{CPU_IP}", name: {CPU}, role: [cpu-worker, schedulable]}}\n'
    )
    return path


def run_preflight(config: Path):
    state = preflight(ClusterParams(config=str(config)), return_state=True)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["preflight-report"])))
        logs = client.read_logs()
    data = max(found, key=lambda a: a.created).data
    rows = {r["node"]: r for r in (json.loads(data) if isinstance(data, str) else data)}
    run_id = state.state_details.flow_run_id
    return state, rows, [log.message for log in logs if log.flow_run_id == run_id]


def fingerprint(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout.split()[1]


def new_host_key(hosts: SshHosts, name: str) -> str:
    """The host is reinstalled (or impersonated): a new ed25519 host key, same name and address."""
    hostkey = hosts.workdir / "hosts" / name / "ssh_host_ed25519_key"
    for f in (hostkey, hostkey.with_suffix(".pub")):
        f.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True)
    hosts.kill(name)
    hosts.revive(name)
    return fingerprint(hostkey.with_suffix(".pub"))


def test_accept_new_pins_then_a_changed_host_key_is_refused_by_name_with_both_fingerprints(site):
    folder, hosts = site
    config = write_config(folder, f"{RUN}-tofu", f"ansible_ssh_private_key_file: {hosts.key_path}")
    old_fp = fingerprint(hosts.workdir / "hosts" / CPU / "ssh_host_ed25519_key.pub")

    first, rows, _ = run_preflight(config)
    assert first.is_completed(), first.message
    pinned = known_hosts_path(f"{RUN}-tofu").read_text().splitlines()
    assert sorted(line.split()[0] for line in pinned) == sorted([CP_IP, CPU_IP])
    assert rows[CPU]["host_key"] == f"ok ({CPU_IP}: new host key ssh-ed25519 {old_fp})"

    again, rows, _ = run_preflight(config)
    assert again.is_completed() and rows[CPU]["host_key"] == f"ok ({CPU_IP}: pinned ssh-ed25519 {old_fp})"

    new_fp = new_host_key(hosts, CPU)
    sshd_log = procs.log_file(hosts.workdir, f"sshd-{CPU}")
    logins = sshd_log.read_text().count("Accepted publickey")
    refused, rows, logs = run_preflight(config)
    assert refused.is_failed()
    message = str(refused.result(raise_on_failure=False))
    assert (
        f"{CPU}: host_key: HOST KEY CHANGED for {CPU_IP}: pinned ssh-ed25519 {old_fp} "
        f"({known_hosts_path(f'{RUN}-tofu')}:" in message
    )
    assert f"offered now ssh-ed25519 {new_fp}; nothing runs on this host" in message
    assert "preflight found 1 blocking problem(s)" in message and f"{CP}:" not in message
    # nothing ran on the refused host; the other one was checked as usual
    assert set(rows[CPU]) - {"node"} == set(rows[CP]) - {"node"}
    assert rows[CPU]["host_key"].startswith("FAIL: HOST KEY CHANGED") and rows[CPU]["sudo"] == "-"
    assert rows[CP]["sudo"] == "ok" and rows[CP]["host_key"].startswith(f"ok ({CP_IP}: pinned")
    assert sshd_log.read_text().count("Accepted publickey") == logins  # no SSH session ever opened there
    assert [m for m in logs if m.startswith(f"{CPU}: HOST KEY CHANGED for {CPU_IP}")]
    # the pinned key is not replaced behind the operator's back
    assert known_hosts_path(f"{RUN}-tofu").read_text().splitlines() == pinned


def test_unreachable_host_is_reported_unreachable_not_as_a_key_problem(site):
    folder, hosts = site
    config = write_config(folder, f"{RUN}-dark", f"ansible_ssh_private_key_file: {hosts.key_path}")
    hosts.kill(CP)
    try:
        state, rows, _ = run_preflight(config)
    finally:
        hosts.revive(CP)
    message = str(state.result(raise_on_failure=False))
    assert state.is_failed() and f"{CP}: reachable: unreachable over SSH" in message
    assert "host_key" not in message and rows[CPU]["sudo"] == "ok"


def test_strict_refuses_unknown_keys_and_accepts_keys_from_ssh_known_hosts(site):
    folder, hosts = site
    key = f"ansible_ssh_private_key_file: {hosts.key_path}"
    config = write_config(folder, f"{RUN}-strict", key, "ssh_host_key_checking: strict\n")
    state, rows, _ = run_preflight(config)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "preflight found 2 blocking problem(s)" in message
    for name, ip in ((CP, CP_IP), (CPU, CPU_IP)):
        fp = fingerprint(hosts.workdir / "hosts" / name / "ssh_host_ed25519_key.pub")
        assert f"{name}: host_key: host key of {ip} not known, and ssh_host_key_checking is strict; " in message
        assert f"it offers ssh-ed25519 {fp}" in message and rows[name]["sudo"] == "-"
    assert not known_hosts_path(f"{RUN}-strict").exists()  # strict pins nothing

    # The operator's file of checked keys (here from the hosts' own public key files).
    trusted = folder / "trusted_known_hosts"
    trusted.write_text(
        "".join(
            f"{ip} {(hosts.workdir / 'hosts' / name / 'ssh_host_ed25519_key.pub').read_text().split()[0]} "
            f"{(hosts.workdir / 'hosts' / name / 'ssh_host_ed25519_key.pub').read_text().split()[1]}\n"
            for name, ip in ((CP, CP_IP), (CPU, CPU_IP))
        )
    )
    extra = f"ssh_host_key_checking: strict\nssh_known_hosts: {trusted}\n"
    state, rows, _ = run_preflight(write_config(folder, f"{RUN}-strict", key, extra))
    assert state.is_completed(), state.message
    assert rows[CP]["host_key"].startswith(f"ok ({CP_IP}: pinned ssh-ed25519") and rows[CP]["sudo"] == "ok"


def test_off_checks_nothing(site):
    folder, hosts = site
    key = f"ansible_ssh_private_key_file: {hosts.key_path}"
    state, rows, _ = run_preflight(write_config(folder, f"{RUN}-off", key, "ssh_host_key_checking: 'off'\n"))
    assert state.is_completed(), state.message
    assert rows[CP]["host_key"] == f"ok ({CP_IP}: not checked (ssh_host_key_checking: off))"
    assert not known_hosts_path(f"{RUN}-off").exists()


def test_secret_block_key_never_reaches_logs_artifacts_events_or_temp_folders(site, tmp_path, monkeypatch, request):
    from prefect.blocks.system import Secret

    folder, hosts = site
    canary = tmp_path / "canary"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "canary", "-f", str(canary)], check=True)
    with (hosts.key_path.parent / "authorized_keys").open("a") as f:
        f.write(canary.with_suffix(".pub").read_text())
    secret_lines = [line for line in canary.read_text().splitlines() if line and not line.startswith("-----")]
    block = f"{RUN}-canary-key"
    Secret(value=canary.read_text()).save(block, overwrite=True)

    # Every temporary folder of this run lands in `scratch`; ansible-runner's private data dir is kept. A short
    # path: ssh's control sockets live in the runner's folder (at most 108 bytes).
    scratch = Path(tempfile.mkdtemp(prefix="gfhk-"))
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    kept: list[Path] = []
    real = tempfile.TemporaryDirectory

    def keep_runner_dir(*args, **kwargs):
        if kwargs.get("prefix") == "gpuforge-ansible-":
            kept.append(Path(tempfile.mkdtemp(prefix="gpuforge-ansible-")))
            return contextlib.nullcontext(str(kept[-1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", keep_runner_dir)
    config = write_config(folder, f"{RUN}-secret", f"ansible_ssh_private_key_secret: {block}")
    state, rows, logs = run_preflight(config)
    assert state.is_completed(), state.message  # the Secret's key is the only key, and it worked
    assert rows[CPU]["sudo"] == "ok"

    [runner_dir] = kept
    assert list((runner_dir / "artifacts").rglob("job_events/*.json")), "the event stream was kept to search"
    leaks = []
    for path in [p for p in scratch.rglob("*") if p.is_file()] + [p for p in Path("/tmp").glob("gpuforge-*/**/*")]:
        with contextlib.suppress(OSError):
            text = path.read_bytes().decode(errors="replace")
            leaks += [str(path) for line in secret_lines if line in text]
    assert leaks == []
    assert not list(scratch.glob("gpuforge-key-*")), "the 0600 key file outlived the run"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        all_logs = [log.message for log in client.read_logs()]
    assert logs and artifacts
    everything = [str(state.result()), *all_logs, *(str(a.data) for a in artifacts)]
    assert not [text for text in everything for line in secret_lines if line in text]


def test_a_long_tmpdir_does_not_make_hosts_unreachable(site, tmp_path, monkeypatch):
    """ssh's control socket must fit a unix socket path (108 bytes): under a long $TMPDIR every host used to be
    'unreachable' (unix_listener: path too long)."""
    folder, hosts = site
    long_tmp = tmp_path / ("t" * 60) / ("m" * 60)
    long_tmp.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(long_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches the folder it chose first
    key = f"ansible_ssh_private_key_file: {hosts.key_path}"
    state, rows, _ = run_preflight(write_config(folder, f"{RUN}-longtmp", key))
    assert state.is_completed(), (state.message, rows)
    assert rows[CP]["reachable"].startswith("ok") and rows[CPU]["reachable"].startswith("ok"), rows
