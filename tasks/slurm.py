"""Slurm verbs, run inside the Slurm controller pod through the Kubernetes exec API (Slurm on Kubernetes)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client
from kubernetes.stream import stream
from prefect import task
from prefect.cache_policies import NO_CACHE

from gpuforge import remediation, validation
from gpuforge.config import Config
from gpuforge.desired import SLURM_RELEASE
from gpuforge.node_lifecycle import JobWait, drain_verdict
from gpuforge.pins import release_namespace
from gpuforge.remediation import Action, SlurmNode
from gpuforge.validation import FAIL, PASS, CheckResult
from tasks.kube import api_client, pod_phase, slurm_pods

CONTROLLER_POD = "slurm-controller-0"
CONTROLLER_CONTAINER = "slurmctld"
# Slinky's NodeSet custom resource (group, version, plural), as the slurm-operator 1.2 chart serves it.
NODESET_API = ("slinky.slurm.net", "v1beta1", "nodesets")


@dataclass(frozen=True)
class ExecResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


def slurm_exec(
    kubeconfig: Path,
    namespace: str,
    argv: list[str],
    *,
    timeout_s: float = 30,
    pod: str = CONTROLLER_POD,
    container: str = CONTROLLER_CONTAINER,
) -> ExecResult:
    """Run a Slurm client command in the controller pod; every call is bounded by `timeout_s`."""
    command = ["timeout", str(int(timeout_s)), *argv]
    with api_client(kubeconfig) as api:
        resp = stream(
            client.CoreV1Api(api).connect_get_namespaced_pod_exec,
            pod,
            namespace,
            command=command,
            container=container,
            stdin=False,
            stdout=True,
            stderr=True,
            tty=False,
            _preload_content=False,
        )
        out, err = [], []
        resp.run_forever(timeout=timeout_s + 5)
        while resp.peek_stdout():
            out.append(resp.read_stdout())
        while resp.peek_stderr():
            err.append(resp.read_stderr())
        status = resp.read_channel(3)  # the exec status channel: JSON with the exit code
        resp.close()
    return ExecResult(_exit_code(status), "".join(out), "".join(err))


def controller_answers(kubeconfig: Path, namespace: str) -> tuple[bool, str]:
    """A wait_for probe: slurmctld answers `scontrol ping` in the controller pod. Slinky's operator builds that
    pod after Helm returns (from the chart's Controller), so a pod not made or not running yet is "not yet"."""
    phase = pod_phase(kubeconfig, namespace, CONTROLLER_POD)
    if phase != "Running":
        return False, f"pod {namespace}/{CONTROLLER_POD} {phase or 'not created yet'}"
    ping = slurm_exec(kubeconfig, namespace, ["scontrol", "ping"], timeout_s=10)
    return ping.ok and "UP" in ping.stdout, (ping.stdout + ping.stderr).strip() or f"rc {ping.rc}"


def _exit_code(status: str) -> int:
    """The exit code from the exec status channel; no status at all means the stream broke (rc 255)."""
    if status:
        data = json.loads(status)
        if data.get("status") == "Success":
            return 0
        for cause in (data.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                return int(cause.get("message", 1))
        # Some runtimes report the code only in words: "... exit status 3".
        if match := re.search(r"exit (?:status|code):? (\d+)", data.get("message", "")):
            return int(match.group(1))
        return 1
    return 255


class Slurm:
    """The Slurm side of one run: `sinfo` once, then scontrol/sbatch through the controller pod."""

    def __init__(self, config: Config, kubeconfig: Path):
        self.kubeconfig, self.namespace = kubeconfig, release_namespace(SLURM_RELEASE)

    def run(self, *argv: str, timeout: float = 20) -> ExecResult:
        return slurm_exec(self.kubeconfig, self.namespace, list(argv), timeout_s=timeout)

    def nodes(self) -> dict[str, SlurmNode]:
        res = self.run(*remediation.SINFO_ARGV)
        if not res.ok:
            raise RuntimeError(f"sinfo failed (rc {res.rc}): {(res.stderr or res.stdout).strip()[:300]}")
        return remediation.parse_sinfo(res.stdout)

    def update(self, node: str, state: str, reason: str | None = None) -> None:
        argv = ["scontrol", "update", f"nodename={node}", f"state={state}"]
        if reason:
            argv.append(f"reason={reason}")
        res = self.run(*argv)
        if not res.ok:
            raise RuntimeError(f"scontrol update {node} state={state}: {(res.stderr or res.stdout).strip()[:300]}")


JOB_DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def scontrol_field(text: str, key: str) -> str:
    """A `Key=Value` field of one-line `scontrol show ... -o` output ("" when absent)."""
    for token in text.split():
        if token.startswith(f"{key}="):
            return token.split("=", 1)[1]
    return ""


def wait_job(run, job_id: str, timeout_s: float) -> tuple[str, str] | None:
    """Poll `scontrol show job` (through `run(*argv) -> ExecResult`) until the job ends: (JobState, ExitCode),
    or None when it did not end within `timeout_s`. sbatch --wait polls at 2/10/42 s; this polls at 0.5 s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = run("scontrol", "show", "job", job_id, "-o")
        state = scontrol_field(info.stdout, "JobState")
        if state in JOB_DONE_STATES:
            return state, scontrol_field(info.stdout, "ExitCode")
        time.sleep(0.5)
    return None


def slurm_state(
    config: Config, kubeconfig: Path, names: list[str] | None = None
) -> tuple[dict[str, SlurmNode] | None, dict[str, str], str | None]:
    """Slurm nodes (one sinfo), the Slurm names of Kubernetes nodes `names` (default: the config's GPU nodes; one
    slurmd pod list), or why they could not be read."""
    if not config.enabled("slurm"):
        return None, {}, None
    try:
        nodes = Slurm(config, kubeconfig).nodes()
        pods = slurm_pods(kubeconfig, release_namespace(SLURM_RELEASE))
    except Exception as exc:  # noqa: BLE001 - reported; no Slurm action (and no cordon of Slurm nodes) follows
        return None, {}, f"Slurm could not be read: {str(exc).splitlines()[0][:300]}"
    wanted = names if names is not None else [n.name for n in config.gpu_nodes]
    return nodes, remediation.slurm_name_map(wanted, nodes, pods), None


@task(name="slurm-checks", cache_policy=NO_CACHE)
def validate_slurm(config: Config, kubeconfig: Path, expected: dict[str, int]) -> list[CheckResult]:
    """Controller answers, every GPU NodeSet node usable with its gres, a 1-GPU job sees CUDA_VISIBLE_DEVICES
    and exits 0, and a job asking more GPUs than a node has is refused."""
    slurm = Slurm(config, kubeconfig)
    ping = slurm.run("scontrol", "ping")
    if not (ping.ok and "UP" in ping.stdout):
        return [
            CheckResult("slurm-controller", "slurmctld", FAIL, (ping.stdout + ping.stderr).strip() or f"rc {ping.rc}")
        ]
    results = [CheckResult("slurm-controller", "slurmctld", PASS, ping.stdout.strip())]
    results += validation.slurm_node_results(slurm.nodes(), expected)
    job = slurm.run(
        "sbatch", "--parsable", "--gres=gpu:1", "--output=/dev/null", "--wrap", 'test -n "$CUDA_VISIBLE_DEVICES"'
    )
    results.append(_job_result(slurm.run, job))
    too_many = max(expected.values()) + 1
    over = slurm.run("sbatch", "--parsable", f"--gres=gpu:{too_many}", "--wrap", "true")
    results.append(
        CheckResult(
            "slurm-gpu-limit",
            f"gpu:{too_many}",
            FAIL if over.ok else PASS,
            f"accepted as job {over.stdout.strip()}" if over.ok else over.stderr.strip(),
        )
    )
    return results


def _job_id(job: ExecResult) -> str:
    """The id `sbatch --parsable` printed ("id" or "id;cluster")."""
    return job.stdout.strip().split(";")[0]


def _job_ended(run, job_id: str, timeout_s: float) -> tuple[bool, str] | None:
    """Wait for a job: (it COMPLETED with exit 0:0, "STATE, exit CODE"), or None when it did not end in time."""
    ended = wait_job(run, job_id, timeout_s)
    if ended is None:
        return None
    state, code = ended
    return state == "COMPLETED" and code == "0:0", f"{state}, exit {code}"


def _job_result(run, job) -> CheckResult:
    if not job.ok:
        return CheckResult("slurm-gpu-job", "gpu:1", FAIL, f"sbatch refused: {job.stderr.strip()}")
    job_id = _job_id(job)
    ended = _job_ended(run, job_id, 60)
    if ended is None:
        return CheckResult("slurm-gpu-job", f"job {job_id}", FAIL, "did not finish within 60s")
    ok, how = ended
    return CheckResult(
        "slurm-gpu-job",
        f"job {job_id}",
        PASS if ok else FAIL,
        how + ("" if ok else " (CUDA_VISIBLE_DEVICES unset or job failed)"),
    )


def revalidate_with_job(
    config: Config,
    kubeconfig: Path,
    sname: str | None,
    snode: SlurmNode | None,
    actions: list[Action],
    log: Callable[[str], None],
) -> tuple[bool, str]:
    """A 1-GPU job pinned to the node. A drained node runs no job, so it is resumed inside a maintenance
    reservation that only this job may use; the reservation goes when the job is done, and a failed job
    drains the node again (done by the caller).

    The reservation has no end: were slurmctld lost after the resume, the run fails without draining the node
    again, and a reservation with an end would hand the node to users when it ran out while Kubernetes keeps
    it cordoned. Without an end (Slurm keeps UNLIMITED as a year) the node stays in maintenance until the next
    release removes the reservation (a reservation an earlier run left is found and taken over here)."""
    if sname is None or snode is None:
        return False, "no Slurm node found for this node"
    slurm = Slurm(config, kubeconfig)
    resv = f"gpuforge-release-{sname}"
    left_over = slurm.run("scontrol", "show", "reservation", resv).ok
    reserve = snode.out_of_service or left_over
    if reserve and not left_over:  # one an earlier run left is ours (users=root, no end): used as it is
        res = slurm.run(
            "scontrol", "create", "reservation", f"reservationname={resv}", f"nodes={sname}", "starttime=now",
            "duration=UNLIMITED", "users=root", "flags=maint,ignore_jobs",
        )  # fmt: skip
        if not res.ok:
            return False, f"could not reserve {sname}: {(res.stderr or res.stdout).strip()}"
    try:  # from here on the reservation exists: it goes whatever happens, a failed resume included
        if snode.out_of_service:
            slurm.update(sname, "resume")
            actions.append(Action(sname, remediation.RESUME_SLURM, f"resumed inside reservation {resv} for the job",
                                  sname, status="done"))  # fmt: skip
            log(f"Slurm node {sname} resumed inside reservation {resv}")
        argv = [
            "sbatch",
            "--parsable",
            "-w",
            sname,
            "--gres=gpu:1",
            "--output=/dev/null",
            "--job-name=gpuforge-release",
        ]
        if reserve:
            argv.append(f"--reservation={resv}")
        job = slurm.run(*argv, "--wrap", 'test -n "$CUDA_VISIBLE_DEVICES"')
        if not job.ok:
            return False, f"sbatch refused: {job.stderr.strip()}"
        job_id = _job_id(job)
        ended = _job_ended(slurm.run, job_id, config.timeouts.validate_)
        if ended is not None:
            ok, how = ended
            return ok, f"Slurm job {job_id} on {sname}: {how}"
        slurm.run("scancel", job_id)
        return False, f"Slurm job {job_id} on {sname} did not finish within {config.timeouts.validate_}s"
    finally:
        if reserve and not (gone := slurm.run("scontrol", "delete", f"reservationname={resv}")).ok:
            log(f"reservation {resv} kept, the next release takes it over: {(gone.stderr or gone.stdout).strip()}")


# ----------------------------------------------------------------------------- node lifecycle (add / remove)


def running_jobs(slurm: Slurm, node: str) -> list[str]:
    """Jobs running (or finishing) on Slurm node `node`, as `id name (user)`."""
    res = slurm.run("squeue", "-h", "-w", node, "-t", "RUNNING,COMPLETING,CONFIGURING", "-o", "%i %j (%u)")
    if not res.ok:
        raise RuntimeError(f"squeue -w {node} failed (rc {res.rc}): {(res.stderr or res.stdout).strip()[:300]}")
    return [line.strip() for line in res.stdout.splitlines() if line.strip()]


def wait_for_jobs(slurm: Slurm, node: str, timeout_s: float, force: bool = False) -> JobWait:
    """Wait for the jobs running on drained Slurm node `node` to end, up to `timeout_s` (squeue every 2 s):
    node_lifecycle.drain_verdict's verdict, naming the jobs that hold the node."""
    waited = time.monotonic()
    while (verdict := drain_verdict(running_jobs(slurm, node), time.monotonic() - waited, timeout_s, force)) is None:
        time.sleep(2)
    return verdict


def delete_node(slurm: Slurm, node: str) -> str:
    """Take `node` out of slurmctld's node table (`scontrol delete nodename=`, dynamic nodes such as Slinky's).
    A node slurm.conf names leaves only with that file; said so rather than failed."""
    res = slurm.run("scontrol", "delete", f"nodename={node}")
    if res.ok:
        return f"{node} deleted from Slurm"
    if node not in slurm.nodes():
        return f"{node} no longer in Slurm"
    return f"{node} stays in Slurm until slurm.conf drops it: {(res.stderr or res.stdout).strip()[:200]}"
