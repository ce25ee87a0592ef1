"""Real Slurm 22.05 on lab hosts: slurmctld and slurmd in host namespaces, fake GPUs as gres."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lab import procs
from lab.slurm import SlurmLab
from lab.sshhosts import HostSpec, SshHosts, free_lab_ips

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("slurmctld") or not shutil.which("munged") or not shutil.which("sshd"),
    reason="needs root, slurm-wlm, munge, openssh-server",
)

# Names and addresses unique per run: other test runs may use the lab on the same machine at the same time.
RUN = f"tsl{os.getpid() % 100000}"
_IPS = free_lab_ips(5, first=100 + (os.getpid() + 20) % 120)
CTL = (f"{RUN}-ctl", _IPS[0])
G1, G2, D1 = f"{RUN}-g1", f"{RUN}-g2", f"{RUN}-d1"
NODES = [(G1, _IPS[1], 2), (G2, _IPS[2], 1)]


@pytest.fixture(scope="module")
def lab_hosts(tmp_path_factory):
    hosts = SshHosts(tmp_path_factory.mktemp("slurmhosts"))
    hosts.up([HostSpec(CTL[0], CTL[1], 0)] + [HostSpec(n, ip, g) for n, ip, g in NODES])
    yield hosts
    hosts.down()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, lab_hosts):
    slurm = SlurmLab(tmp_path_factory.mktemp("slurmlab"), "tslurm")
    try:
        t0 = time.monotonic()
        slurm.up(CTL, NODES)
        print(f"slurm up in {time.monotonic() - t0:.2f}s")
        yield slurm
    finally:
        slurm.down()


def test_sinfo_shows_gpu_partition_with_gres(cluster):
    out = cluster.run("sinfo", "-N", "-h", "-o", "%N %P %t %G").stdout.split("\n")
    rows = {line.split()[0]: line.split()[1:] for line in out if line.strip()}
    assert rows[G1] == ["gpu*", "idle", "gpu:2"]
    assert rows[G2] == ["gpu*", "idle", "gpu:1"]
    assert CTL[0] not in rows
    assert cluster.status() == {"controller": True, "nodes": {G1: "idle", G2: "idle"}}


def test_client_env_is_enough_for_plain_clients(cluster):
    env = {**os.environ, **cluster.client_env()}
    proc = subprocess.run(["scontrol", "show", "partition", "gpu"], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert f"Nodes={RUN}-g[1-2]" in proc.stdout and "TotalNodes=2" in proc.stdout
    proc = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0


def test_one_gpu_job_completes_and_sees_cuda_visible_devices(cluster):
    out = cluster.workdir / "jobs" / "cvd-%j.out"
    job = cluster.run(
        "sbatch", "--parsable", "--gres=gpu:1", "-w", G1, "-o", str(out), "--chdir", str(cluster.workdir),
        "--wrap", 'echo "CVD=$CUDA_VISIBLE_DEVICES host=$(hostname) node=$SLURMD_NODENAME"',
    ).stdout.strip().split(";")[0]  # fmt: skip
    assert job.isdigit()
    assert cluster.wait_job(job, timeout=60) == "COMPLETED"
    text = Path(str(out).replace("%j", job)).read_text()
    assert "CVD=0 " in text
    assert f"host={G1} node={G1}" in text


def test_srun_runs_from_inside_a_lab_host(cluster):
    # srun listens for the job's I/O on 0.0.0.0, so it runs inside a lab namespace, never in the root one
    proc = cluster.run("srun", "-w", G1, "--gres=gpu:1", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES $(hostname)",
                       netns=CTL[0], timeout=60)  # fmt: skip
    assert proc.stdout.split() == ["0", G1]


def test_two_gpu_job_gets_both_devices(cluster):
    out = cluster.workdir / "jobs" / "two-%j.out"
    job = cluster.run(
        "sbatch", "--parsable", "--gres=gpu:2", "-o", str(out), "--wrap", 'echo "CVD=$CUDA_VISIBLE_DEVICES"'
    ).stdout.strip()  # fmt: skip
    assert cluster.wait_job(job, timeout=60) == "COMPLETED"
    assert Path(str(out).replace("%j", job)).read_text().strip() == "CVD=0,1"


def test_asking_for_more_gpus_than_a_node_has_is_rejected(cluster):
    proc = cluster.run("sbatch", "--gres=gpu:3", "--wrap", "true", check=False)
    assert proc.returncode != 0
    assert "Requested node configuration is not available" in proc.stderr
    proc = cluster.run("sbatch", "--gres=gpu:2", "-w", G2, "--wrap", "true", check=False)
    assert proc.returncode != 0


def test_controller_stop_and_start(cluster):
    cluster.stop_controller()
    try:
        assert cluster.status()["controller"] is False
        proc = cluster.run("sinfo", check=False, timeout=30)
        assert proc.returncode != 0
    finally:
        cluster.start_controller()
    cluster.wait_idle(timeout=60)
    assert cluster.status()["controller"] is True


def test_killed_host_takes_its_slurmd_and_comes_back(cluster, lab_hosts):
    lab_hosts.kill(G2)
    try:
        assert not procs.is_running(cluster.workdir, f"slurmd-tslurm-{G2}")
        proc = cluster.run("sbatch", "--parsable", "--gres=gpu:1", "-w", G2, "-o", "/dev/null",
                           "--wrap", "true")  # fmt: skip
        job = proc.stdout.strip()
        time.sleep(2)
        # no slurmd to run it: the job waits (or is believed launched) but cannot finish
        assert cluster.job_state(job) in ("PENDING", "CONFIGURING", "RUNNING")
    finally:
        lab_hosts.revive(G2)
        cluster.start_node(G2)
    final = cluster.wait_job(job, timeout=60)
    print("job state after revive:", final)
    assert final == "COMPLETED"
    cluster.wait_idle(timeout=30)


def test_daemons_stay_off_the_root_namespace(cluster):
    # slurmctld/slurmd listen on 0.0.0.0, but only inside their host namespaces
    ss = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
    assert ":6817 " not in ss and ":6818 " not in ss
    ss = subprocess.run(["ip", "netns", "exec", f"gf-{CTL[0]}", "ss", "-Hltn"], capture_output=True, text=True).stdout
    assert ":6817 " in ss


def test_up_again_is_a_no_op_and_refuses_non_lab_controllers(cluster, tmp_path):
    pid = procs.read_pid(cluster.workdir, "slurmctld-tslurm")
    cluster.up(CTL, NODES)
    assert procs.read_pid(cluster.workdir, "slurmctld-tslurm") == pid
    # refuse a controller that is not a lab host (no namespace: it would listen on 0.0.0.0 in the root)
    other = SlurmLab(tmp_path / "other", "other")
    with pytest.raises(ValueError, match="namespace"):
        other.up((f"{RUN}-nohost", _IPS[3]), NODES)
    with pytest.raises(ValueError):
        other.up((CTL[0], "10.1.2.3"), NODES)


def test_down_stops_every_daemon(tmp_path_factory):
    work = tmp_path_factory.mktemp("slurmdown")
    hosts = SshHosts(work / "hosts")
    hosts.up([HostSpec(D1, _IPS[4], 1)])
    slurm = SlurmLab(work / "slurm", "tdown")
    try:
        slurm.up((D1, _IPS[4]), [(D1, _IPS[4], 1)])
        # leave a job running: down() must end its slurmstepd and the job too
        job = slurm.run("sbatch", "--parsable", "--gres=gpu:1", "-o", "/dev/null", "--wrap", "sleep 300").stdout
        deadline = time.monotonic() + 30
        while slurm.job_state(job.strip()) != "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert slurm.job_state(job.strip()) == "RUNNING"
        pids = [procs.read_pid(slurm.workdir, n) for n in ("munged-tdown", "slurmctld-tdown", f"slurmd-tdown-{D1}")]
        assert all(pids)
    finally:
        slurm.down()
    try:
        for pid in pids:
            assert not _alive(pid)
        ns_pids = subprocess.run(["ip", "netns", "pids", f"gf-{D1}"], capture_output=True, text=True).stdout
        leftover = [_cmd(int(p)) for p in ns_pids.split() if _alive(int(p))]
        # only the host's sshd may be left in the namespace: no slurmstepd, no `sleep 300`
        assert leftover and all("sshd" in cmd for cmd in leftover), leftover
    finally:
        hosts.down()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
