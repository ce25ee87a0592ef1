"""The lab control plane against the real binaries: etcd, kube-apiserver v1.35.4, controller manager,
scheduler and kwok, started once for this module in a temporary workdir."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from lab import nodes, procs
from lab.controlplane import COMPONENTS, ControlPlane

BIN_DIR = Path(os.environ.get("GPUFORGE_BIN_DIR", Path.home() / ".cache" / "gpuforge" / "bin"))
EXEC_NS = "labexec"
MARKER = "hello-from-kwok-exec"


def _ensure_ns(core, name: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        core.create_namespace({"metadata": {"name": name}})
    except ApiException as exc:
        if exc.status != 409:
            raise


@pytest.fixture(scope="module")
def cp(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("controlplane")
    plane = ControlPlane(workdir, BIN_DIR)
    try:
        plane._binaries()
    except FileNotFoundError as exc:
        pytest.skip(f"lab binaries not built: {exc}")
    started = time.monotonic()
    plane.up(exec_rules=[{"name": "lab-exec", "namespaces": [EXEC_NS], "env": {"LAB_MARKER": MARKER}}])
    plane.up_seconds = time.monotonic() - started
    print(f"control plane up in {plane.up_seconds:.1f}s")
    yield plane
    plane.down()


@pytest.fixture(scope="module")
def api(cp):
    from kubernetes import config

    return config.new_client_from_config(config_file=str(cp.kubeconfig))


@pytest.fixture(scope="module")
def core(api):
    from kubernetes import client

    return client.CoreV1Api(api)


@pytest.fixture(scope="module")
def lab_nodes(cp, core):
    manifests = [
        nodes.node_manifest(
            "gpu-a", labels={"nvidia.com/gpu.present": "true"}, taints=[], kubelet_version="1.35.4", gpus=8
        ),
        nodes.node_manifest(
            "gpu-b", labels={"nvidia.com/gpu.present": "true"}, taints=[], kubelet_version="v1.35.4", gpus=4
        ),
        nodes.node_manifest(
            "cpu-a", labels={"node-role.kubernetes.io/worker": ""}, taints=[], kubelet_version="1.35.4"
        ),
    ]
    result = nodes.register_nodes(cp.kubeconfig, manifests)
    assert set(result) == {"gpu-a", "gpu-b", "cpu-a"}
    nodes.wait_nodes_ready(cp.kubeconfig, result, timeout=60)
    return manifests


def kubectl(cp, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["kubectl", f"--kubeconfig={cp.kubeconfig}", *args], capture_output=True, text=True, timeout=60, check=check
    )


def pod(name: str, *, gpus: int = 0, restart: str = "Always", annotations: dict | None = None) -> dict:
    container: dict = {"name": "main", "image": "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04"}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {"containers": [container], "restartPolicy": restart, "terminationGracePeriodSeconds": 0},
    }


def wait_for(fn, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


def read_pod(core, name: str, ns: str = "default") -> dict:
    return core.api_client.sanitize_for_serialization(core.read_namespaced_pod(name, ns))


# ---------------------------------------------------------------------- tests


def test_server_version_is_pinned(cp):
    out = kubectl(cp, "version", "-o", "json")
    assert json.loads(out.stdout)["serverVersion"]["gitVersion"] == "v1.35.4"
    assert cp.kubeconfig.is_absolute()
    assert cp.server == f"https://{cp.address}:6443"
    assert ipaddress.ip_address(cp.address) in ipaddress.ip_network("198.51.100.0/24")


def test_status_reports_every_component_healthy(cp):
    status = cp.status()
    assert status["up"] is True
    assert set(status["components"]) == set(COMPONENTS)
    for name, comp in status["components"].items():
        assert comp["running"] and comp["healthy"], (name, comp)
        assert all(addr.startswith(f"{cp.address}:") for addr in comp["listen"]), (name, comp)


def _listening_sockets(netns: str | None = None) -> dict[int, tuple[str, int]]:
    """inode -> (hex local address, port) of every LISTEN socket (tcp and tcp6), in the root namespace or in
    network namespace `netns`."""
    result = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        argv = ["ip", "netns", "exec", netns, "cat", table] if netns else ["cat", table]
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode != 0:
            continue
        lines = out.stdout.splitlines()[1:]
        if not lines:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":
                continue
            addr, port = fields[1].split(":")
            result[int(fields[9])] = (addr, int(port, 16))
    return result


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _hex_ipv4(address: str) -> str:
    """How /proc/net/tcp writes an IPv4 address (little-endian hex)."""
    return socket.inet_aton(address)[::-1].hex().upper()


def test_daemons_listen_on_the_lab_address_only_inside_their_namespace(cp):
    listening = _listening_sockets(cp.namespace)
    assert listening, "no LISTEN sockets visible in the control plane's /proc/net/tcp"
    seen_ports = set()
    for name in COMPONENTS:
        pid = procs.read_pid(cp.workdir, name)
        assert pid is not None, name
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{cp.namespace}").st_ino, name
        for inode in _socket_inodes(pid) & set(listening):
            addr, port = listening[inode]
            assert addr == _hex_ipv4(cp.address), f"{name} listens on {addr}:{port}, not {cp.address}"
            seen_ports.add(port)
    assert set(cp.ports.values()) <= seen_ports, (cp.ports, seen_ports)
    # Nothing of the control plane listens in the root namespace.
    root_inodes = set(_listening_sockets())
    for name in COMPONENTS:
        assert not (_socket_inodes(procs.read_pid(cp.workdir, name)) & root_inodes), name


def test_pod_and_service_ranges_have_no_route_from_the_api_server(cp):
    """The API server's namespace has no default route: pod and service addresses (10.233.x.x here) and the
    rest of the world are unreachable, the lab subnet is not."""
    for target in ("10.233.64.9", "10.233.0.10", "10.0.0.1", "192.168.1.1", "8.8.8.8"):
        out = subprocess.run(
            ["ip", "netns", "exec", cp.namespace, "ip", "route", "get", target], capture_output=True, text=True
        )
        assert out.returncode != 0 and "unreachable" in out.stderr.lower(), (target, out.stdout, out.stderr)
    lab = subprocess.run(
        ["ip", "netns", "exec", cp.namespace, "ip", "route", "get", "198.51.100.1"], capture_output=True, text=True
    )
    assert lab.returncode == 0 and "dev eth0" in lab.stdout, lab.stdout + lab.stderr
    routes = subprocess.run(
        ["ip", "netns", "exec", cp.namespace, "ip", "-4", "route", "show"], capture_output=True, text=True
    ).stdout
    assert "default" not in routes, routes


def test_a_webhook_pointing_at_a_pod_is_never_called_and_a_dial_to_a_pod_fails_with_no_route(cp, core, lab_nodes):
    """A fail-closed admission webhook at a pod address does not block writes (the admission-webhook plugins
    are off), and when the API server does dial a pod address (its service proxy), the dial fails at once
    inside its own namespace instead of leaving the machine."""
    from kubernetes import client

    admission = client.AdmissionregistrationV1Api(core.api_client)
    webhook = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "points-at-a-pod"},
        "webhooks": [
            {
                "name": "deny.lab.gpuforge.io",
                "clientConfig": {"url": "https://10.233.64.9:8443/validate"},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                           "resources": ["configmaps"]}],
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
            }
        ],
    }  # fmt: skip
    admission.create_validating_webhook_configuration(webhook)
    try:
        core.create_namespaced_config_map("default", {"metadata": {"name": "written-past-the-webhook"}})
        assert core.read_namespaced_config_map("written-past-the-webhook", "default")
    finally:
        admission.delete_validating_webhook_configuration("points-at-a-pod")
        core.delete_namespaced_config_map("written-past-the-webhook", "default")

    # The API server's pod proxy dials the pod's own address (from the pod range, as a webhook Service would be).
    core.create_namespaced_pod("default", pod("proxied"))
    ip = wait_for(lambda: read_pod(core, "proxied")["status"].get("podIP"), 60, "a pod address")
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.233.64.0/18")
    try:
        started = time.monotonic()
        out = kubectl(cp, "get", "--raw", "/api/v1/namespaces/default/pods/proxied:8443/proxy/", check=False)
        assert out.returncode != 0
        assert "network is unreachable" in out.stderr.lower(), out.stderr
        assert time.monotonic() - started < 10, "the dial should fail at once, not time out"
    finally:
        core.delete_namespaced_pod("proxied", "default", grace_period_seconds=0)


def test_gpu_pods_land_only_on_gpu_nodes(cp, core, lab_nodes):
    names = [f"gpu-pod-{i}" for i in range(6)]
    for name in names:
        core.create_namespaced_pod("default", pod(name, gpus=1))
    placed = {}
    for name in names:
        placed[name] = wait_for(lambda n=name: read_pod(core, n)["spec"].get("nodeName"), 60, f"{name} to be scheduled")
    assert set(placed.values()) <= {"gpu-a", "gpu-b"}, placed
    wait_for(lambda: all(read_pod(core, n)["status"].get("phase") == "Running" for n in names), 60, "Running")
    for name in names:
        core.delete_namespaced_pod(name, "default", grace_period_seconds=0)


def test_pod_wanting_nine_gpus_stays_pending(cp, core, lab_nodes):
    core.create_namespaced_pod("default", pod("too-many-gpus", gpus=9))

    def failed_scheduling():
        events = core.list_namespaced_event(
            "default", field_selector="involvedObject.name=too-many-gpus,reason=FailedScheduling"
        ).items
        return [e.message for e in events if "nvidia.com/gpu" in (e.message or "")]

    messages = wait_for(failed_scheduling, 60, "a FailedScheduling event about nvidia.com/gpu")
    assert "Insufficient nvidia.com/gpu" in messages[0]
    body = read_pod(core, "too-many-gpus")
    assert body["status"]["phase"] == "Pending"
    assert not body["spec"].get("nodeName")
    core.delete_namespaced_pod("too-many-gpus", "default", grace_period_seconds=0)


def test_run_once_pods_complete_and_service_pods_keep_running(cp, core, lab_nodes):
    core.create_namespaced_pod("default", pod("smoke-never", gpus=1, restart="Never"))
    core.create_namespaced_pod("default", pod("smoke-onfailure", restart="OnFailure"))
    core.create_namespaced_pod(
        "default", pod("smoke-fails", restart="Never", annotations={"lab.gpuforge.io/exit-code": "3"})
    )
    core.create_namespaced_pod("default", pod("service-always"))
    core.create_namespaced_pod(
        "default", pod("kept", restart="Never", annotations={"lab.gpuforge.io/keep-running": "true"})
    )
    core.create_namespaced_pod(
        "default", pod("slow-smoke", restart="Never", annotations={"lab.gpuforge.io/complete-after": "4s"})
    )
    wait_for(lambda: read_pod(core, "slow-smoke")["status"].get("phase") == "Running", 30, "slow-smoke Running")
    for name in ("smoke-never", "smoke-onfailure"):
        wait_for(lambda n=name: read_pod(core, n)["status"].get("phase") == "Succeeded", 60, f"{name} Succeeded")
        state = read_pod(core, name)["status"]["containerStatuses"][0]["state"]
        assert state["terminated"]["exitCode"] == 0
    wait_for(lambda: read_pod(core, "smoke-fails")["status"].get("phase") == "Failed", 60, "smoke-fails Failed")
    assert read_pod(core, "smoke-fails")["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    wait_for(lambda: read_pod(core, "service-always")["status"].get("phase") == "Running", 60, "Running")
    wait_for(lambda: read_pod(core, "slow-smoke")["status"].get("phase") == "Succeeded", 30, "slow-smoke done")
    for name in ("service-always", "kept"):
        assert read_pod(core, name)["status"]["phase"] == "Running", name


def _conditions(core, name: str) -> dict[str, str]:
    return {c["type"]: c["status"] for c in read_pod(core, name)["status"].get("conditions") or []}


def test_a_pod_marked_not_ready_by_the_node_controller_is_ready_again(cp, core, lab_nodes):
    """What the node lifecycle controller does to every pod of a node whose heartbeats stopped (etcd down past the
    grace period): Ready=False, ContainersReady kept. A kubelet re-reports Ready once back; so does the lab."""
    core.create_namespaced_pod("default", pod("marked-not-ready"))
    wait_for(lambda: _conditions(core, "marked-not-ready").get("Ready") == "True", 60, "pod Ready")
    patch = {"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "NodeNotReady"}]}}
    marked = core.patch_namespaced_pod_status("marked-not-ready", "default", patch)
    assert {c.type: c.status for c in marked.status.conditions}["Ready"] == "False"
    wait_for(lambda: _conditions(core, "marked-not-ready").get("Ready") == "True", 60, "pod Ready again")
    conditions = _conditions(core, "marked-not-ready")
    assert conditions["ContainersReady"] == "True" and conditions["PodScheduled"] == "True", conditions
    assert read_pod(core, "marked-not-ready")["status"]["phase"] == "Running"


def test_job_completes(cp, api, lab_nodes):
    from kubernetes import client

    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(
        "default",
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "nccl-test"},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {"name": "main", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
                        ],
                    }
                },
            },
        },
    )
    wait_for(
        lambda: (batch.read_namespaced_job_status("nccl-test", "default").status.succeeded or 0) == 1,
        90,
        "Job nccl-test to succeed",
    )


def test_logs_object_serves_pod_log(cp, api, core, lab_nodes, tmp_path):
    from kubernetes import client

    log_path = tmp_path / "cuda-smoke.log"
    log_path.write_text(
        "2026-11-28T10:00:00.000000000Z stdout F [Vector addition of 50000 elements]\n"
        "2026-11-28T10:00:01.000000000Z stdout F Test PASSED\n"
    )
    core.create_namespaced_pod("default", pod("cuda-smoke", gpus=1, restart="Never"))
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kwok.x-k8s.io",
        "v1alpha1",
        "default",
        "logs",
        {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "Logs",
            "metadata": {"name": "cuda-smoke", "namespace": "default"},
            "spec": {"logs": [{"containers": ["main"], "logsFile": str(log_path)}]},
        },
    )
    wait_for(lambda: read_pod(core, "cuda-smoke")["status"].get("phase") == "Succeeded", 60, "cuda-smoke done")

    def read_log():
        try:
            return core.read_namespaced_pod_log("cuda-smoke", "default", container="main")
        except client.exceptions.ApiException:
            return None

    text = wait_for(read_log, 30, "pod log")
    assert text.rstrip().endswith("Test PASSED")
    assert "Vector addition" in text
    out = kubectl(cp, "logs", "cuda-smoke", "-c", "main")
    assert out.stdout.rstrip().endswith("Test PASSED")


def test_exec_rule_runs_a_real_command(cp, core, lab_nodes):
    _ensure_ns(core, EXEC_NS)
    wait_for(
        lambda: core.list_namespaced_service_account(EXEC_NS, field_selector="metadata.name=default").items,
        30,
        "default service account",
    )
    core.create_namespaced_pod(EXEC_NS, pod("slurm-controller-0"))
    wait_for(lambda: read_pod(core, "slurm-controller-0", EXEC_NS)["status"].get("phase") == "Running", 60, "Running")
    out = kubectl(cp, "exec", "-n", EXEC_NS, "slurm-controller-0", "--", "sh", "-c", 'echo "$LAB_MARKER"; hostname')
    lines = out.stdout.split()
    assert lines == [MARKER, socket.gethostname()], out
    # A pod that no rule selects cannot be exec'ed into.
    core.create_namespaced_pod("default", pod("no-exec-rule"))
    wait_for(lambda: read_pod(core, "no-exec-rule")["status"].get("phase") == "Running", 60, "Running")
    denied = kubectl(cp, "exec", "no-exec-rule", "--", "hostname", check=False)
    assert denied.returncode != 0
    assert socket.gethostname() not in denied.stdout


def _kubelet_version(core, name: str) -> str | None:
    return core.read_node(name).status.node_info.kubelet_version if core.read_node(name).status.node_info else None


def test_kubelet_version_follows_annotation(cp, core, lab_nodes):
    for m in lab_nodes:
        name = m["metadata"]["name"]
        assert _kubelet_version(core, name) == m["metadata"]["annotations"][nodes.KUBELET_VERSION_ANNOTATION]
    old = nodes.node_manifest("old-node", labels={}, taints=[], kubelet_version="1.34.2")
    assert nodes.register_nodes(cp.kubeconfig, [old]) == {"old-node": "created"}
    wait_for(lambda: _kubelet_version(core, "old-node") == "v1.34.2", 30, "v1.34.2 on old-node")
    # The stand-in upgrade re-registers the node with the new version; the status follows.
    new = nodes.node_manifest("old-node", labels={}, taints=[], kubelet_version="1.35.4")
    assert nodes.register_nodes(cp.kubeconfig, [new]) == {"old-node": "updated"}
    wait_for(lambda: _kubelet_version(core, "old-node") == "v1.35.4", 30, "v1.35.4 on old-node after upgrade")
    # Without the annotation a node reports the control plane's version.
    bare = nodes.node_manifest("bare-node", labels={}, taints=[], kubelet_version="1.0.0")
    del bare["metadata"]["annotations"][nodes.KUBELET_VERSION_ANNOTATION]
    nodes.register_nodes(cp.kubeconfig, [bare])
    wait_for(lambda: _kubelet_version(core, "bare-node") == "v1.35.4", 30, "fallback version on bare-node")
    assert nodes.delete_node(cp.kubeconfig, "old-node") is True
    assert nodes.delete_node(cp.kubeconfig, "bare-node") is True
    assert nodes.delete_node(cp.kubeconfig, "bare-node") is False


def test_register_is_idempotent_and_gpus_can_change(cp, core, lab_nodes):
    assert set(nodes.register_nodes(cp.kubeconfig, lab_nodes).values()) == {"unchanged"}
    nodes.set_allocatable_gpus(cp.kubeconfig, "gpu-b", 2)
    status = core.read_node("gpu-b").status
    assert status.allocatable["nvidia.com/gpu"] == "2" and status.capacity["nvidia.com/gpu"] == "2"
    assert status.allocatable["cpu"] == "32"
    # Re-registering restores the manifest's capacity; the node stays Ready.
    assert nodes.register_nodes(cp.kubeconfig, lab_nodes)["gpu-b"] == "updated"
    node = core.read_node("gpu-b")
    assert node.status.allocatable["nvidia.com/gpu"] == "4"
    assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


def test_nodes_cli(cp, core, lab_nodes):
    import sys

    def cli(*args):
        out = subprocess.run(
            [sys.executable, "-m", "lab.nodes", *args, "--kubeconfig", str(cp.kubeconfig)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )
        return json.loads(out.stdout)

    assert cli(
        "register",
        "--name",
        "cli-gpu",
        "--label",
        "pool=a100",
        "--taint",
        "dedicated=gpu:NoSchedule",
        "--gpus",
        "8",
        "--kubelet-version",
        "1.35.4",
        "--wait",
        "60",
    ) == {"name": "cli-gpu", "changed": True, "action": "created"}
    node = core.read_node("cli-gpu")
    assert node.metadata.labels["pool"] == "a100"
    # The node lifecycle controller may still hold its own node.kubernetes.io/not-ready taint for a moment.
    ours = [(t.key, t.value, t.effect) for t in node.spec.taints if not t.key.startswith("node.kubernetes.io/")]
    assert ours == [("dedicated", "gpu", "NoSchedule")]
    assert node.status.allocatable["nvidia.com/gpu"] == "8"
    assert cli("set-gpus", "--name", "cli-gpu", "--count", "7")["changed"] is True
    assert cli("set-gpus", "--name", "cli-gpu", "--count", "7")["changed"] is False
    assert core.read_node("cli-gpu").status.allocatable["nvidia.com/gpu"] == "7"
    assert cli("delete", "--name", "cli-gpu")["action"] == "deleted"


def test_up_again_is_fast_and_keeps_processes(cp):
    pids = {n: procs.read_pid(cp.workdir, n) for n in COMPONENTS}
    started = time.monotonic()
    cp.up()  # no exec_rules: keeps the ones given before
    assert time.monotonic() - started < 15
    assert {n: procs.read_pid(cp.workdir, n) for n in COMPONENTS} == pids
    assert "LAB_MARKER" in (cp.workdir / "k8s" / "kwok.yaml").read_text()


def test_changed_exec_rules_restart_only_kwok(cp, core, lab_nodes):
    pids = {n: procs.read_pid(cp.workdir, n) for n in COMPONENTS}
    second = {"name": "second", "namespaces": ["labexec2"], "containers": ["main"], "env": {"LAB_MARKER": "second"}}
    cp.up(exec_rules=[{"name": "lab-exec", "namespaces": [EXEC_NS], "env": {"LAB_MARKER": MARKER}}, second])
    now = {n: procs.read_pid(cp.workdir, n) for n in COMPONENTS}
    assert [n for n in COMPONENTS if now[n] != pids[n]] == ["kwok"]
    _ensure_ns(core, "labexec2")
    wait_for(
        lambda: core.list_namespaced_service_account("labexec2", field_selector="metadata.name=default").items,
        30,
        "default service account",
    )
    core.create_namespaced_pod("labexec2", pod("worker-0"))
    # 15 s: a restarted kwok must take over the nodes at once, not when the old kwok's node Leases expire (40 s).
    wait_for(lambda: read_pod(core, "worker-0", "labexec2")["status"].get("phase") == "Running", 15, "Running")
    out = kubectl(cp, "exec", "-n", "labexec2", "worker-0", "--", "sh", "-c", 'echo "$LAB_MARKER"')
    assert out.stdout.strip() == "second"
    out = kubectl(cp, "exec", "-n", EXEC_NS, "slurm-controller-0", "--", "sh", "-c", 'echo "$LAB_MARKER"')
    assert out.stdout.strip() == MARKER
    with pytest.raises(ValueError, match="unknown keys"):
        cp.up(exec_rules=[{"namespace": ["typo"]}])


def test_restart_apiserver_keeps_data(cp, core, lab_nodes):
    core.create_namespaced_config_map("default", {"metadata": {"name": "survivor"}, "data": {"k": "v"}})
    old_pid = procs.read_pid(cp.workdir, "kube-apiserver")
    cp.restart_apiserver(downtime=1.0)
    assert procs.read_pid(cp.workdir, "kube-apiserver") != old_pid
    assert core.read_namespaced_config_map("survivor", "default").data == {"k": "v"}
    # Scheduler and kwok reconnected: a new pod is scheduled and runs.
    core.create_namespaced_pod("default", pod("after-restart", gpus=1))
    wait_for(lambda: read_pod(core, "after-restart")["status"].get("phase") == "Running", 90, "after-restart Running")


def _pids_running(argv: bytes) -> list[int]:
    """Processes whose command line starts with `argv` (NUL-separated): the program itself, not a client such
    as `kubectl exec ... -- sleep 4321` whose arguments merely contain it (it exits on its own when its
    stream breaks, which can take longer than the check below on a loaded machine)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(argv):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_down_leaves_no_process_and_no_namespace(cp, core, lab_nodes):
    # A command exec'ed through kwok into a session of its own (out of kwok's process group) must go too.
    _ensure_ns(core, EXEC_NS)
    wait_for(
        lambda: core.list_namespaced_service_account(EXEC_NS, field_selector="metadata.name=default").items,
        30,
        "default service account",
    )
    core.create_namespaced_pod(EXEC_NS, pod("long-exec"))
    wait_for(lambda: read_pod(core, "long-exec", EXEC_NS)["status"].get("phase") == "Running", 30, "Running")
    exec_proc = subprocess.Popen(
        [
            "kubectl",
            f"--kubeconfig={cp.kubeconfig}",
            "exec",
            "-n",
            EXEC_NS,
            "long-exec",
            "--",
            "setsid",
            "sleep",
            "4321",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _pids_running(b"sleep\x004321\x00"), 30, "the exec'ed sleep")
        cp.down()
        time.sleep(0.5)
        assert _pids_running(b"sleep\x004321\x00") == []
    finally:
        exec_proc.kill()
        exec_proc.wait()
    needle = str(cp.workdir).encode()
    leftovers = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            leftovers.append((proc.name, cmdline.replace(b"\0", b" ")[:200]))
    assert leftovers == []
    assert not Path("/run/netns", cp.namespace).exists()
    assert cp.status()["up"] is False


@pytest.mark.skipif(not Path("/usr/bin/etcd").exists(), reason="no Debian etcd-server")
def test_debian_etcd_fallback_keeps_kwok_watches_working(tmp_path):
    """etcd 3.4.23 lacks RequestWatchProgress: without WatchList=false kwok's watches fail and nodes go stale."""
    plane = ControlPlane(tmp_path, BIN_DIR, etcd_binary=Path("/usr/bin/etcd"))
    try:
        plane._binaries()
    except FileNotFoundError as exc:
        pytest.skip(f"lab binaries not built: {exc}")
    try:
        plane.up()
        assert plane._old_etcd()
        from kubernetes import client, config

        core = client.CoreV1Api(config.new_client_from_config(config_file=str(plane.kubeconfig)))
        nodes.register_nodes(
            plane.kubeconfig, [nodes.node_manifest("n1", labels={}, taints=[], kubelet_version="1.34.1")]
        )
        nodes.wait_nodes_ready(plane.kubeconfig, ["n1"], timeout=30)
        nodes.register_nodes(
            plane.kubeconfig, [nodes.node_manifest("n1", labels={}, taints=[], kubelet_version="1.35.4")]
        )
        wait_for(lambda: _kubelet_version(core, "n1") == "v1.35.4", 5, "kwok to see the new annotation")
        core.create_namespaced_pod("default", pod("p1", restart="Never"))
        wait_for(lambda: read_pod(core, "p1")["status"].get("phase") == "Succeeded", 30, "p1 Succeeded")
        assert "RequestWatchProgress" not in procs.log_file(plane.workdir, "kwok").read_text()
    finally:
        plane.down()
