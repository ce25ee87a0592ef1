"""The install pipeline and validation, end to end against the test session's lab, through Prefect.

Order matters inside this module: the first test installs, later ones re-run, validate and inject faults
(each fault is undone before the test ends).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.common import ClusterParams, PreconditionFailed, cluster_lock
from flows.install import InstallParams, install
from flows.preflight import preflight
from flows.validate import ValidateParams, ValidationFailed, validate
from gpuforge.config import load_config
from tasks.helm import read_releases
from tests.conftest import config_variant

# A value the real GPU Operator chart honours that keeps its operator Deployment from ever becoming ready (no
# node has that much CPU); its hook Jobs do not share it, so Helm can still roll back and clean up.
NEVER_READY = {"operator": {"resources": {"requests": {"cpu": "100000"}}}}

pytestmark = pytest.mark.usefixtures("prefect_server")


def artifact(key: str):
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    return max(found, key=lambda a: a.created)


def table(key: str) -> list[dict]:
    data = artifact(key).data
    return json.loads(data) if isinstance(data, str) else data


def report_of(state) -> dict:
    if state.is_completed():
        return state.result()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ValidationFailed), error
    return error.report


def checks_by(report: dict, check: str) -> dict[str, dict]:
    return {c["target"]: c for c in report["checks"] if c["check"] == check}


def test_first_install_runs_every_phase(lab, lab_config, first_install):
    state = first_install
    rows = state.result(raise_on_failure=False)
    assert state.is_completed(), rows
    assert [(r["phase"], r["result"]) for r in rows] == [
        ("preflight", "ran"),
        ("kubespray", "ran"),
        ("monitoring", "ran"),
        ("gpu-operator", "ran"),
        ("slurm", "ran"),
        ("dashboard", "ran"),
        ("validate", "ran"),
    ]
    preflight_rows = {r["node"]: r for r in table("preflight-report")}
    assert set(preflight_rows) == {"tcp-1", "tgpu-1", "tgpu-2", "tcpu-1"}
    assert preflight_rows["tgpu-1"]["gpu_pci"].startswith("ok (8 NVIDIA devices")
    recap = {r["host"]: r for r in table("kubespray-recap")}
    assert recap["tgpu-1"]["failures"] == 0 and recap["tgpu-1"]["unreachable"] == 0
    gpu_status = {r["node"]: r for r in table("gpu-operator-status")}
    assert gpu_status["tgpu-1"]["allocatable"] == 8 and gpu_status["tgpu-2"]["allocatable"] == 4
    releases = read_releases(load_config(lab_config).kubeconfig_path())
    assert {n: r["status"] for n, r in releases.items()} == {
        "kube-prometheus-stack": "deployed",
        "gpu-operator": "deployed",
        "cert-manager": "deployed",
        "slurm-operator-crds": "deployed",
        "slurm-operator": "deployed",
        "slurm": "deployed",
        "kubernetes-dashboard": "deployed",
    }


def test_converged_rerun_skips_and_adds_no_helm_revision(lab, lab_config):
    kubeconfig = load_config(lab_config).kubeconfig_path()
    before = {n: r["revision"] for n, r in read_releases(kubeconfig).items()}
    state = install(
        InstallParams(config=str(lab_config), only=["kubespray", "monitoring", "gpu-operator"]), return_state=True
    )
    rows = state.result()
    assert rows[0]["result"] == "skipped" and "Ready at 1.35.4" in rows[0]["detail"]
    assert "unchanged" in rows[1]["detail"] and "unchanged" in rows[2]["detail"]
    assert {n: r["revision"] for n, r in read_releases(kubeconfig).items()} == before


def test_value_changed_with_helm_is_put_back_by_the_next_install(lab, lab_config):
    """The converged check reads Helm's release records; a record that differs goes through pyhelm3 again."""
    import subprocess

    from gpuforge.render import chart_archive, chart_mirror, render_releases
    from tasks.helm import helm_executable, release_records

    config = load_config(lab_config)
    kubeconfig = config.kubeconfig_path()
    release = next(r for r in render_releases(config) if r.name == "gpu-operator")
    archive = chart_archive(release, chart_mirror(config, os.environ))  # the real chart, from the lab's mirror
    subprocess.run(
        [helm_executable(), "upgrade", "gpu-operator", str(archive), "-n", "gpu-operator", "--reuse-values",
         "--set", "dcgmExporter.serviceMonitor.honorLabels=false", "--kubeconfig", str(kubeconfig)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    changed = release_records(kubeconfig)[("gpu-operator", "gpu-operator")]
    assert changed.values["dcgmExporter"]["serviceMonitor"]["honorLabels"] is False
    rows = install(InstallParams(config=str(lab_config), only=["gpu-operator"]), return_state=True).result()
    assert (
        rows[0]["result"] == "ran" and f"gpu-operator upgraded (revision {changed.revision + 1})" in rows[0]["detail"]
    )
    restored = release_records(kubeconfig)[("gpu-operator", "gpu-operator")]
    assert (restored.revision, restored.values) == (changed.revision + 1, release.values)


def test_validate_passes_on_the_lab(lab, lab_config):
    report = report_of(validate(ValidateParams(config=str(lab_config)), return_state=True))
    assert report["ok"] and report["exit_code"] == 0, report["failures"]
    assert checks_by(report, "cuda-smoke")["tgpu-2"]["result"] == "pass"
    # tgpu-1 belongs to the Slurm NodeSet, whose slurmd pod holds all its GPUs
    assert checks_by(report, "cuda-smoke")["tgpu-1"]["result"] == "skipped"
    assert checks_by(report, "dcgm-metrics")["tgpu-1"]["detail"] == "8 GPUs x 8 series fresh"
    assert checks_by(report, "slurm-gpu-job")
    assert checks_by(report, "gpu-scheduling")["9 GPUs"]["result"] == "pass"


def test_validate_smoke_image_without_test_passed_fails_that_node(lab, lab_config, tmp_path):
    cfg = config_variant(
        lab_config, tmp_path, lambda data: data.update(validation={"cuda_image": "docker.io/library/busybox:1.36"})
    )
    report = report_of(validate(ValidateParams(config=str(cfg)), return_state=True))
    assert report["exit_code"] == 1
    assert [(f["check"], f["target"]) for f in report["failures"]] == [("cuda-smoke", "tgpu-2")]
    assert "no 'Test PASSED' in the log" in report["failures"][0]["detail"]


def test_validate_missing_gpu_and_stale_node(lab, lab_config):
    lab.dcgm.remove_gpu("tgpu-1", 3)
    lab.dcgm.stop_node("tgpu-2")
    try:
        import time

        time.sleep(6)  # > two scrape intervals (2 s) so the stopped target's series are stale
        report = report_of(validate(ValidateParams(config=str(lab_config)), return_state=True))
    finally:
        lab.dcgm.reset()
    failures = {(f["check"], f["target"]): f["detail"] for f in report["failures"]}
    assert set(failures) == {("dcgm-metrics", "tgpu-1"), ("dcgm-metrics", "tgpu-2")}
    assert "missing: gpu 3 DCGM_FI_DEV_GPU_TEMP" in failures[("dcgm-metrics", "tgpu-1")]
    assert "stale" in failures[("dcgm-metrics", "tgpu-2")] or "missing" in failures[("dcgm-metrics", "tgpu-2")]


def test_validate_lowered_allocatable_and_stopped_slurm(lab, lab_config):
    lab.slurm.stop_controller()
    lab.set_device_plugin_gpus("tgpu-2", 3)
    try:
        report = report_of(validate(ValidateParams(config=str(lab_config)), return_state=True))
    finally:
        lab.slurm.start_controller()
        lab.slurm.wait_idle()  # nodes re-register after a controller restart
        lab.set_device_plugin_gpus("tgpu-2", None)
    failed = {(f["check"], f["target"]) for f in report["failures"]}
    assert ("gpu-allocatable", "tgpu-2") in failed
    assert ("slurm-controller", "slurmctld") in failed
    assert report["exit_code"] == 1


def test_validate_prometheus_down_is_exit_2(lab, lab_config):
    lab.prometheus.stop()
    try:
        report = report_of(validate(ValidateParams(config=str(lab_config)), return_state=True))
    finally:
        lab.prometheus.start()
    assert report["exit_code"] == 2 and not report["ok"]
    assert [f["check"] for f in report["failures"]] == ["dcgm-metrics"]
    assert report["failures"][0]["result"] == "error"


def test_preflight_reports_unreachable_host_by_name_and_keeps_others(lab, lab_config):
    lab.hosts.kill("tcpu-1")
    lab.hosts.set_fact("tgpu-2", "nouveau", True)
    try:
        state = preflight(ClusterParams(config=str(lab_config)), return_state=True)
    finally:
        lab.hosts.revive("tcpu-1")
        lab.hosts.set_fact("tgpu-2", "nouveau", False)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "tcpu-1: reachable: unreachable over SSH" in message
    assert "tgpu-2: nouveau: nouveau is loaded" in message
    rows = {r["node"]: r for r in table("preflight-report")}
    assert rows["tcpu-1"]["reachable"].startswith("FAIL")
    assert rows["tgpu-1"]["gpu_pci"].startswith("ok")  # the others are still reported


def test_second_install_of_same_cluster_is_refused(lab, lab_config, monkeypatch):
    import flows.common

    # Long enough for a busy test server to grant the free slot, short enough for the refused second run.
    monkeypatch.setattr(flows.common, "LOCK_WAIT_S", 10)
    with cluster_lock("gpuforge-test", "install"):
        with pytest.raises(PreconditionFailed, match="another install of cluster gpuforge-test is running"):
            with cluster_lock("gpuforge-test", "install"):
                pass


def test_ssh_key_never_reaches_logs_or_artifacts(lab, lab_config):
    key = Path(load_config(lab_config).ansible_ssh_private_key_file).read_text()
    secret_line = [line for line in key.splitlines() if line and not line.startswith("-----")][1]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts()
        logs = client.read_logs()
    assert arts and logs
    assert not [a.key for a in arts if secret_line in str(a.data)]
    assert not [log.message for log in logs if secret_line in log.message]


def test_kubespray_names_the_host_that_went_away(lab, lab_config):
    lab.hosts.kill("tcpu-1")
    try:
        params = InstallParams(config=str(lab_config), only=["kubespray"], force_phases=["kubespray"])
        state = install(params, return_state=True)
    finally:
        lab.hosts.revive("tcpu-1")
    assert state.is_failed()
    [row] = (
        state.result(raise_on_failure=False)
        if isinstance(state.result(raise_on_failure=False), list)
        else [table("install-summary")[0]]
    )
    assert row["phase"] == "kubespray" and row["result"] == "failed"
    assert "unreachable: tcpu-1" in row["detail"]
    recap = {r["host"]: r for r in table("kubespray-recap")}
    assert recap["tcpu-1"]["unreachable"] >= 1 and recap["tgpu-1"]["unreachable"] == 0


def test_helm_release_that_never_gets_ready_is_rolled_back_and_next_run_recovers(lab, lab_config, tmp_path):
    kubeconfig = load_config(lab_config).kubeconfig_path()
    before = read_releases(kubeconfig)["gpu-operator"]

    def never_ready(data):
        data["timeouts"]["gpu-operator"] = 20
        data["deepops_services"]["gpu-operator"]["releases"] = {"gpu-operator": {"values": NEVER_READY}}

    bad = config_variant(lab_config, tmp_path, never_ready)
    state = install(InstallParams(config=str(bad), only=["gpu-operator"]), return_state=True)
    assert state.is_failed()
    detail = table("install-summary")[0]["detail"]
    assert "helm release gpu-operator/gpu-operator" in detail and "atomic" in detail.lower()
    after = read_releases(kubeconfig)["gpu-operator"]
    assert after["status"] == "deployed" and after["values"] == before["values"]  # rolled back
    good = install(InstallParams(config=str(lab_config), only=["gpu-operator"]), return_state=True)
    assert good.is_completed() and good.result()[0]["result"] in ("ran", "skipped")


def test_wait_recovers_when_the_api_server_restarts(lab, lab_config):
    import threading
    import time

    from flows.gpu_operator import gpu_operator

    lab.set_device_plugin_gpus("tgpu-2", 2)  # the phase now waits for 4

    def restart_then_restore():
        time.sleep(3)  # let the phase reach its wait
        lab.cp.restart_apiserver(downtime=3)
        lab.set_device_plugin_gpus("tgpu-2", None)

    helper = threading.Thread(target=restart_then_restore)
    helper.start()
    state = gpu_operator(ClusterParams(config=str(lab_config)), return_state=True)
    helper.join()
    assert state.is_completed(), state.message
    assert {r["node"]: r["allocatable"] for r in table("gpu-operator-status")}["tgpu-2"] == 4


def test_install_killed_mid_phase_resumes_without_duplicates(lab, lab_config, tmp_path, monkeypatch):
    """kill -9 the install (and its helm) while a Helm upgrade hangs; the next install recovers it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    kubeconfig = load_config(lab_config).kubeconfig_path()
    stuck = config_variant(
        lab_config,
        tmp_path,
        lambda data: data["deepops_services"]["gpu-operator"].update(
            releases={"gpu-operator": {"values": NEVER_READY}}
        ),
    )
    from prefect.settings import PREFECT_API_URL

    log = tmp_path / "cli.log"
    with log.open("w") as out:
        cli = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "gpuforge"),
                "install",
                "--config",
                str(stuck),
                "--only",
                "gpu-operator",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},  # the test's Prefect server
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and cli.poll() is None:
            if read_releases(kubeconfig)["gpu-operator"]["status"] == "pending-upgrade":
                break
            time.sleep(0.5)
        assert read_releases(kubeconfig)["gpu-operator"]["status"] == "pending-upgrade", log.read_text()[-3000:]
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
        cli.wait()
    import flows.common

    # The killed run's lock lease (60 s) must expire before the re-run gets the cluster.
    monkeypatch.setattr(flows.common, "LOCK_WAIT_S", 240)
    state = install(InstallParams(config=str(lab_config), only=["gpu-operator"]), return_state=True)
    assert state.is_completed(), state.message
    release = read_releases(kubeconfig)["gpu-operator"]
    assert release["status"] == "deployed" and "lab" not in release["values"]
    from tasks.helm import helm_executable

    listed = subprocess.run(
        [helm_executable(), "list", "-A", "-a", "-o", "json", "--kubeconfig", str(kubeconfig)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [r["name"] for r in json.loads(listed.stdout)].count("gpu-operator") == 1  # nothing duplicated


def test_lock_of_a_killed_cli_run_is_given_back(prefect_server, monkeypatch):
    """A CLI run's temporary Prefect server never expires leases; a dead holder's slot is freed instead."""
    import socket
    import subprocess

    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.variables import Variable

    import flows.common

    monkeypatch.setattr(flows.common, "LOCK_WAIT_S", 2)
    name = "cluster-gpuforge-killed"
    dead = subprocess.Popen(["true"])
    dead.wait()
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=1))  # leaked slot
    Variable.set(f"{name}-holder", {"host": socket.gethostname(), "pid": os.getpid()}, overwrite=True)
    with pytest.raises(PreconditionFailed):  # the holder (this process) is alive: refused
        with cluster_lock("gpuforge-killed", "install"):
            pass
    Variable.set(f"{name}-holder", {"host": socket.gethostname(), "pid": dead.pid}, overwrite=True)
    with cluster_lock("gpuforge-killed", "install"):  # the holder is gone: its slot is given back
        assert Variable.get(f"{name}-holder")["pid"] == os.getpid()
    assert Variable.get(f"{name}-holder", default=None) is None
