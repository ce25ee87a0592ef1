"""Faults against the lab while a flow runs (issue 18, "Faults"): each one leaves a clear state for the user,
loses nothing, and the next run recovers.

Uses the session lab of tests/conftest.py (installed once) and its day-2 configs. Every fault is undone before its test ends. What the
user sees (the failed run's message) is written to $GPUFORGE_FAULTS_SEEN (a folder) when that is set.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_day2_lab import node_state, not_healthy, run_health, sinfo, verdicts_now

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("prefect_server")]


def seen(name: str, text: str) -> None:
    """Keep what the user saw, for the report."""
    folder = os.environ.get("GPUFORGE_FAULTS_SEEN")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, f"{name}.txt").write_text(text)


def wait_healthy(cfg, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = not_healthy(verdicts_now(cfg))
            if not last:
                return
        except Exception as exc:  # noqa: BLE001 - Prometheus still coming back
            last = exc
        time.sleep(1)
    raise AssertionError(f"not healthy after {timeout}s: {last}")


# ------------------------------------------------------------------------------ 1. Prometheus restarted


def test_prometheus_restarted_during_health_is_unknown_never_healthy(installed, configs, cfg, monkeypatch):
    """Prometheus goes down after the flow's first fleet queries were answered and while the others are on
    their way (a real stop of the real server, then a start 3 s later): every GPU is `unknown`, exit 2."""
    from tasks import prometheus

    wait_healthy(cfg)
    real_query = prometheus.query
    lock = threading.Lock()
    calls = {"n": 0}
    restarter: list[threading.Thread] = []

    def query_then_restart(pc, promql):
        with lock:
            calls["n"] += 1
            if calls["n"] == 3:  # two queries answered; now the restart
                installed.prometheus.stop()

                def start_later():
                    time.sleep(3)
                    installed.prometheus.start()

                restarter.append(threading.Thread(target=start_later))
                restarter[0].start()
        return real_query(pc, promql)

    monkeypatch.setattr(prometheus, "query", query_then_restart)
    try:
        report, state = run_health(configs["off"])
    finally:
        for t in restarter:
            t.join()
        installed.prometheus.start()
        monkeypatch.undo()
    seen("prometheus-restart", f"{state.message}\n\nerrors: {report['errors']}\ncounts: {report['counts']}\n")
    assert calls["n"] >= 3 and restarter, "the restart did not overlap the evaluation"
    total = sum(n.spec.gpu_count for n in cfg.gpu_nodes)
    assert state.is_failed() and report["exit_code"] == 2
    assert report["counts"] == {"healthy": 0, "degraded": 0, "unhealthy": 0, "unknown": total}
    assert all(g["verdict"] == "unknown" for g in report["gpus"])
    assert "did not answer" in report["errors"][0]

    # Recovered: the next run is healthy.
    wait_healthy(cfg)
    report, state = run_health(configs["off"])
    assert state.is_completed() and report["exit_code"] == 0
    assert report["counts"]["healthy"] == total


# ------------------------------------------------------------------------------ 2. SSH host hangs


HANG = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 22))
s.listen(64)
print("listening", flush=True)
held = []
while True:
    held.append(s.accept())  # accept, never write a banner
"""


def test_ssh_host_that_accepts_and_hangs_is_named_within_the_timeouts(installed, lab_config):
    from flows.common import ClusterParams
    from flows.preflight import preflight
    from gpuforge.config import load_config
    from lab.sshhosts import netns_name
    from tests.test_install_lab import table

    config = load_config(lab_config)
    name = "tcpu-1"
    ip = next(n.spec.ip for n in config.nodes if n.name == name)
    installed.hosts.kill(name)
    hang = subprocess.Popen(
        ["ip", "netns", "exec", netns_name(name), sys.executable, "-c", HANG, ip],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hang.stdout.readline().strip() == "listening"
        started = time.monotonic()
        state = preflight(ClusterParams(config=str(lab_config)), return_state=True)
        took = time.monotonic() - started
    finally:
        hang.terminate()
        hang.wait(10)
        installed.hosts.revive(name)
    message = str(state.result(raise_on_failure=False))
    rows = {r["node"]: r for r in table("preflight-report")}
    seen("ssh-hang", f"{message}\n\nrow {name}: {rows.get(name)}\ntook {took:.1f}s\n")
    assert state.is_failed()
    # What ssh said: "Connection timed out during banner exchange" or "Connection to <ip> port 22 timed out".
    assert re.search(rf"{name}: reachable: unreachable over SSH \([^)]*timed out[^)]*\)", message), message
    assert rows[name]["reachable"].startswith("FAIL")
    for other in ("tgpu-1", "tgpu-2", "tcp-1"):
        assert "FAIL" not in rows[other].get("reachable", "ok"), rows[other]
    # ssh-keyscan -T 5 and ssh's ConnectTimeout 5 (which covers the banner), not the phase timeout.
    assert took < 90, took

    # Revived: the next preflight passes.
    state = preflight(ClusterParams(config=str(lab_config)), return_state=True)
    assert state.is_completed(), state.message


# ------------------------------------------------------------------------------ 3. slurmctld restarted


def remediated_then_healthy_again(installed, configs, cfg, node: str) -> None:
    """GPU 2 of `node` turns unhealthy (a double-bit ECC error), `health` with remediation on cordons and drains
    the node, and the GPU is healthy again: the node waits for `health --release`."""
    installed.dcgm.set_value(node, 2, "ECC_DBE_VOL_TOTAL", 1)
    deadline = time.monotonic() + 40
    while not_healthy(verdicts_now(cfg)).get((node, 2), ("",))[0] != "unhealthy":
        assert time.monotonic() < deadline
        time.sleep(1)
    run_health(configs["on"])
    assert node_state(cfg, node).unschedulable and sinfo(installed)[node].drained
    installed.dcgm.reset()
    wait_healthy(cfg)


def test_slurmctld_restarted_during_release(installed, configs, cfg):
    from tasks.kube import set_cordon

    node = cfg.slurm_gpu_nodes[0].name
    remediated_then_healthy_again(installed, configs, cfg, node)

    restarted = threading.Event()
    stop = threading.Event()

    def restart_when_reserved():
        # The release's maintenance reservation is the moment it has started on the Slurm side.
        while not stop.is_set():
            out = installed.slurm.run("scontrol", "show", "reservation", check=False).stdout
            if "gpuforge-release" in out:
                installed.slurm.stop_controller()
                time.sleep(3)
                installed.slurm.start_controller()
                restarted.set()
                return
            time.sleep(0.2)

    helper = threading.Thread(target=restart_when_reserved)
    helper.start()
    try:
        report, state = run_health(configs["on"], release=node)
    finally:
        stop.set()
        helper.join()
        installed.slurm.start_controller()
    k8s_out = node_state(cfg, node).unschedulable
    slurm_out = sinfo(installed)[node].out_of_service
    seen(
        "slurmctld-restart",
        f"{state.message}\n\nreleased={report['released']} exit={report['exit_code']} reasons={report['reasons']}\n"
        f"validation={report['validation']}\nactions={report['actions']}\n"
        f"after: kubernetes cordoned={k8s_out} slurm out={slurm_out} (restart overlapped: {restarted.is_set()})\n",
    )
    try:
        assert restarted.is_set(), "the restart did not overlap the release"
        assert k8s_out == slurm_out, "one side in service, the other out"
        if report["released"]:
            assert state.is_completed() and not k8s_out
        else:
            assert state.is_failed() and k8s_out and report["reasons"]
        # Re-run: the node comes back.
        report, state = run_health(configs["on"], release=node)
        assert state.is_completed() and report["released"], state.message
        assert not node_state(cfg, node).unschedulable and sinfo(installed)[node].state == "idle"
        assert "gpuforge-release" not in installed.slurm.run("scontrol", "show", "reservation").stdout
    finally:
        if node_state(cfg, node).unschedulable:
            set_cordon(cfg.kubeconfig_path(), node, False, None)
        if sinfo(installed)[node].out_of_service:
            installed.slurm.run("scontrol", "update", f"nodename={node}", "state=resume")


# ------------------------------------------------------------------------------ 4. etcd restarted


def upgrade_gpu_operator_behind_gpuforges_back(config):
    """A Helm upgrade of the gpu-operator release with one value changed, so that the next gpu-operator phase
    upgrades it again; returns (kubeconfig, the release as gpuforge renders it)."""
    from gpuforge.render import chart_archive, chart_mirror, render_releases
    from tasks.helm import helm_executable

    kubeconfig = config.kubeconfig_path()
    release = next(r for r in render_releases(config) if r.name == "gpu-operator")
    archive = chart_archive(release, chart_mirror(config, os.environ))
    subprocess.run(
        [helm_executable(), "upgrade", "gpu-operator", str(archive), "-n", "gpu-operator", "--reuse-values",
         "--set", "dcgmExporter.serviceMonitor.honorLabels=false", "--kubeconfig", str(kubeconfig)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return kubeconfig, release


@dataclass
class EtcdOutage:
    """An install phase run with etcd stopped part-way: its final state, and seconds from the phase's start."""

    state: Any
    took: float
    down: float
    up: float

    def times(self) -> str:
        return f"took {self.took:.1f}s; etcd down at {self.down:.1f}s, back at {self.up:.1f}s"


def wait_helm_upgrading(kubeconfig: Path, phase_ended: threading.Event, timeout: float = 120) -> None:
    """Until Helm has recorded a gpu-operator upgrade as under way (a revision in `pending-upgrade`), or the phase
    has ended. A fixed delay instead caught the phase before Helm on a busy machine (it was still applying its
    namespace), which is another test."""
    from kubernetes import client

    from tasks.kube import api_client

    selector = "owner=helm,name=gpu-operator,status=pending-upgrade"
    deadline = time.monotonic() + timeout
    with api_client(kubeconfig) as api:
        secrets = client.CoreV1Api(api)
        while not phase_ended.is_set() and time.monotonic() < deadline:
            if secrets.list_namespaced_secret("gpu-operator", label_selector=selector).items:
                return
            time.sleep(0.1)


def gpu_operator_phase_with_etcd_down(lab, config: Path, *, until_phase_ends: bool) -> EtcdOutage:
    """The install's gpu-operator phase for `config`; once its Helm upgrade is under way etcd stops, for 5 s or
    (until_phase_ends) until the phase has returned. Fails the test when the outage did not overlap the phase."""
    from flows.install import InstallParams, install
    from gpuforge.config import load_config

    kubeconfig = load_config(config).kubeconfig_path()
    phase_ended = threading.Event()
    window: dict[str, float] = {}

    def outage() -> None:
        wait_helm_upgrading(kubeconfig, phase_ended)
        window["down"] = time.monotonic()
        if until_phase_ends:
            lab.cp._stop("etcd")
            phase_ended.wait(900)
            lab.cp.restart("etcd")
        else:
            lab.cp.restart("etcd", downtime=5)
        window["up"] = time.monotonic()

    helper = threading.Thread(target=outage)
    started = time.monotonic()
    helper.start()
    try:
        state = install(InstallParams(config=str(config), only=["gpu-operator"]), return_state=True)
    finally:
        ended = time.monotonic()
        phase_ended.set()
        helper.join()
    assert window["down"] < ended, "etcd went down after the phase had ended: no overlap"
    return EtcdOutage(state, ended - started, window["down"] - started, window["up"] - started)


def test_etcd_restarted_during_an_install_phase(installed, lab_config):
    """A Helm upgrade made behind gpuforge's back makes the gpu-operator phase upgrade again; etcd goes down for
    5 s once Helm's upgrade is under way. The phase completes or fails saying so; the next install converges."""
    from flows.install import InstallParams, install
    from gpuforge.config import load_config
    from tasks.helm import release_records
    from tests.test_install_lab import table

    config = load_config(lab_config)
    kubeconfig, release = upgrade_gpu_operator_behind_gpuforges_back(config)

    outage = gpu_operator_phase_with_etcd_down(installed, lab_config, until_phase_ends=False)
    state = outage.state
    rows = table("install-summary")
    seen("etcd-restart", f"{state.type}: {state.message}\n\nsummary: {rows}\n{outage.times()}\n")
    if state.is_failed():
        assert rows[0]["result"] == "failed" and rows[0]["detail"], rows

    again = install(InstallParams(config=str(lab_config), only=["gpu-operator"]), return_state=True)
    assert again.is_completed(), again.message
    record = release_records(kubeconfig)[("gpu-operator", "gpu-operator")]
    assert record.values == release.values and record.status == "deployed"


# ------------------------------------------------------------------------------ 5. outages longer than the retries


def wait_registered(lab, node: str, timeout: float = 90):
    """After a slurmctld start, until the node's slurmd has registered again (its state is no longer unknown)."""
    deadline = time.monotonic() + timeout
    while (state := sinfo(lab)[node].state).startswith("unknown"):
        assert time.monotonic() < deadline, f"{node} still {state} {timeout}s after slurmctld started"
        time.sleep(1)


def test_slurmctld_down_past_the_retries_during_release(installed, configs, cfg):
    """slurmctld stops the moment the release has resumed the node inside its reservation and stays down until
    the run has ended: the run fails in Slurm's own words; once slurmctld is back the node is still out on both
    sides -- cordoned, and kept from users by gpuforge's maintenance reservation, which has no end (seen before
    the fix: a 30-minute reservation handed the node back to Slurm's users while Kubernetes kept it cordoned);
    the next --release takes the reservation over, validates the node and returns it."""
    from tasks.kube import set_cordon

    node = cfg.slurm_gpu_nodes[0].name
    remediated_then_healthy_again(installed, configs, cfg, node)

    stopped = threading.Event()
    run_ended = threading.Event()

    def stop_when_reserved():
        while not run_ended.is_set():
            reserved = "gpuforge-release" in installed.slurm.run("scontrol", "show", "reservation", check=False).stdout
            if reserved and not sinfo(installed)[node].out_of_service:  # resumed for the release's job
                installed.slurm.stop_controller()
                stopped.set()
                run_ended.wait(600)
                return
            time.sleep(0.1)

    from flows.gpu_health import HealthCheckFailed, HealthParams, gpu_health

    helper = threading.Thread(target=stop_when_reserved)
    helper.start()
    started = time.monotonic()
    try:
        # Not run_health: a Slurm command that cannot reach slurmctld fails the run with its own error, no report.
        state = gpu_health(HealthParams(config=str(configs["on"]), release=node), return_state=True)
        result = state.result(raise_on_failure=False)
        report = result.report if isinstance(result, HealthCheckFailed) else {}
    finally:
        took = time.monotonic() - started
        run_ended.set()
        helper.join()
        installed.slurm.start_controller()
        wait_registered(installed, node)
    try:
        after = sinfo(installed)[node]
        cordoned = node_state(cfg, node).unschedulable
        reservations = installed.slurm.run("scontrol", "show", "reservation", check=False).stdout
        seen(
            "slurmctld-down",
            f"{state.message}\n\nreport: {report}\ntook {took:.1f}s\n"
            f"after slurmctld is back: kubernetes cordoned={cordoned}, slurm state={after.state}"
            f" reason={after.reason!r}\nreservations: {reservations.strip()}\n",
        )
        # What the fault must have been (RuntimeError: a broken premise fails the test, xfail or not).
        said = state.message + str(report.get("reasons", ""))
        if not (stopped.is_set() and "gpuforge-release" in reservations and state.is_failed()):
            raise RuntimeError(f"slurmctld was not stopped after the resume inside the release: {said}")
        if not re.search(r"Unable to contact slurm controller|Connection refused", said):
            raise RuntimeError(f"the failure does not say what was unreachable: {said}")
        assert cordoned, "the node must stay cordoned in Kubernetes"
        if not after.out_of_service:  # resumed for the job: gpuforge's reservation keeps users off, with no end
            held = installed.slurm.run("scontrol", "show", "reservation", f"gpuforge-release-{node}").stdout
            # duration=UNLIMITED, which Slurm keeps as a year ("Duration=365-00:00:00"): not the old 30 minutes
            days = re.search(r"Duration=(?:UNLIMITED|(\d+)-)", held)
            assert re.search(r"Flags=\S*MAINT", held) and days and int(days[1] or 365) >= 365, held
            assert "Users=root" in held, held

        # Re-run: the node comes back, no reservation left.
        report, state = run_health(configs["on"], release=node)
        assert state.is_completed() and report["released"], state.message
        assert not node_state(cfg, node).unschedulable and sinfo(installed)[node].state == "idle"
        assert "gpuforge-release" not in installed.slurm.run("scontrol", "show", "reservation").stdout
    finally:
        installed.slurm.run("scontrol", "delete", f"reservationname=gpuforge-release-{node}", check=False)
        if node_state(cfg, node).unschedulable:
            set_cordon(cfg.kubeconfig_path(), node, False, None)
        if sinfo(installed)[node].out_of_service:
            installed.slurm.run("scontrol", "update", f"nodename={node}", "state=resume")


def yaml_server(kubeconfig: Path) -> str:
    """The API server's URL in a kubeconfig."""
    from ruamel.yaml import YAML

    return YAML(typ="safe").load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]


def test_etcd_down_past_the_wait_during_an_install_phase(installed, lab_config, tmp_path):
    """etcd goes down during a gpu-operator upgrade by Helm and stays down until the phase has given up (its
    timeout shortened to 20 s through `timeouts.gpu-operator`): the phase fails saying what was unreachable in the
    API server's or Helm's words; the next install converges (a release left pending-upgrade is recovered, and the
    API server's timeouts while its etcd clients still reconnect, up to two minutes after such an outage, are
    retried within the phase's timeout)."""
    from flows.install import InstallParams, install
    from gpuforge.config import load_config
    from tasks.helm import release_records
    from tests.conftest import config_variant
    from tests.test_install_lab import table

    short = config_variant(lab_config, tmp_path, lambda d: d.setdefault("timeouts", {}).update({"gpu-operator": 20}))
    config = load_config(short)
    kubeconfig, release = upgrade_gpu_operator_behind_gpuforges_back(config)

    outage = gpu_operator_phase_with_etcd_down(installed, short, until_phase_ends=True)
    state = outage.state
    rows = table("install-summary")
    record = release_records(kubeconfig)[("gpu-operator", "gpu-operator")]
    seen(
        "etcd-down",
        f"{state.type}: {state.message}\n\nsummary: {rows}\n{outage.times()}\n"
        f"helm release after: revision {record.revision} {record.status}\n",
    )
    assert state.is_failed() and rows[0]["result"] == "failed", rows
    # Seen: "helm release gpu-operator/gpu-operator (gpu-operator v26.7.0): Error: UPGRADE FAILED: query: failed to
    # query with labels: Get "https://198.51.100.240:6443/api/v1/namespaces/gpu-operator/secrets?...": stream
    # error: stream ID 19; INTERNAL_ERROR; received from peer" (the API server, its etcd gone, resets the call), or
    # "... UPGRADE FAILED: create: failed to create: Timeout: request did not complete within requested timeout -
    # context deadline exceeded" (the API server's own words when etcd never answered).
    detail = rows[0]["detail"]
    server = re.escape(yaml_server(kubeconfig))
    assert detail.startswith("helm release gpu-operator/gpu-operator"), detail
    # The API server's words for a request its storage did not answer in time: apimachinery's StatusReasonTimeout
    # ("the server was unable to return a response in the time allotted ...", seen on the third run) or the
    # request-timeout filter's "Timeout: request did not complete within requested timeout".
    timeouts = "request did not complete within requested timeout|unable to return a response in the time allotted"
    assert re.search(rf"{server}|{timeouts}", detail), detail

    again = install(InstallParams(config=str(lab_config), only=["gpu-operator"]), return_state=True)
    assert again.is_completed(), again.message
    record = release_records(kubeconfig)[("gpu-operator", "gpu-operator")]
    assert record.values == release.values and record.status == "deployed"
