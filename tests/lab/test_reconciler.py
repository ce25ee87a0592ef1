"""lab/reconciler.py against a real lab control plane (kube-apiserver, controller manager, scheduler, kwok) and
the real upstream charts at gpuforge's pins (../shared/upstream/charts) installed through pyhelm3 and the real
helm binary.

The first tests drive the reconciler's logic on in-memory objects (no binaries needed). The rest share one
control plane and one reconciler process; they run in file order and build on each other: GPU Operator
install -> smoke pods -> API server restart -> NodeSets -> atomic rollback -> uninstall -> every chart with
gpuforge's values."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuforge import pins
from gpuforge.render import LOCAL_PATH_STORAGE_CLASS
from lab import nodes, reconciler
from lab.controlplane import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
# The real upstream charts (test data beside the project; see ../shared/upstream/README.md).
CHART_MIRROR = ROOT.parent / "shared" / "upstream" / "charts"
PINNED = {name: f"{chart}-{version}.tgz" for rel in pins.CHARTS.values() for name, _ns, _r, chart, version in rel}
# A value the real GPU Operator chart honours that keeps its operator Deployment from ever becoming ready (no
# node has that much CPU), and that its hook Jobs do not share (they must still run for Helm to clean up).
UNSCHEDULABLE = {"operator": {"resources": {"requests": {"cpu": "100000"}}}}


def chart(release: str) -> Path:
    return CHART_MIRROR / PINNED[release]


BIN_DIR = Path(os.environ.get("GPUFORGE_BIN_DIR", Path.home() / ".cache" / "gpuforge" / "bin"))
HELM = BIN_DIR / "helm-v3.19.0"
GPU_NODES = {"gpu-a": (8, "H100"), "gpu-b": (4, "NVIDIA H200")}
CPU_NODE = "cpu-a"
GPU_LABELS = (
    "nvidia.com/gpu.present",
    "nvidia.com/gpu.product",
    "nvidia.com/gpu.count",
    "nvidia.com/gpu.deploy.driver",
)

pytestmark = pytest.mark.timeout(900)


# ------------------------------------------------------------------------------ logic on in-memory objects


class FakeKube:
    """Records writes instead of sending them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object]] = []

    def merge_patch(self, path, body):
        self.calls.append(("PATCH", path, body))

    def create(self, path, body):
        self.calls.append(("POST", path, body))

    def delete(self, path):
        self.calls.append(("DELETE", path, None))

    def get(self, path, **query):
        raise AssertionError(f"unexpected GET {path}")


def _fake_reconciler(tmp_path: Path, inventory: dict, objects: dict[str, list[dict]]) -> reconciler.Reconciler:
    (tmp_path / "inv.json").write_text(json.dumps(inventory))
    rec = reconciler.Reconciler(FakeKube(), tmp_path / "inv.json", tmp_path / "logs")
    rec._reload_inventory()
    for attr, items in objects.items():
        getattr(rec, attr)._items = {reconciler.object_key(o): o for o in items}
    return rec


def _obj(name: str, namespace: str | None = None, **fields) -> dict:
    meta = {"name": name, "resourceVersion": "1", "uid": f"uid-{name}", "generation": 1}
    if namespace:
        meta["namespace"] = namespace
    meta.update(fields.pop("metadata", {}))
    return {"metadata": meta, **fields}


def _operator(available: int) -> dict:
    return _obj("gpu-operator", "gpu-operator", status={"availableReplicas": available})


def _daemonsets(desired: int, ready: int) -> list[dict]:
    status = {"desiredNumberScheduled": desired, "numberReady": ready, "updatedNumberScheduled": desired,
              "numberUnavailable": desired - ready, "observedGeneration": 1}  # fmt: skip
    return [_obj(name, "gpu-operator", status=dict(status)) for _key, name, _state, _label in reconciler.OPERANDS]


def _gpu_calls(rec) -> list[tuple[str, str, object]]:
    """The writes to nodes and the ClusterPolicy (leaving out the operand objects the operator creates)."""
    return [c for c in rec.kube.calls if c[1].startswith(("/api/v1/nodes/", "/apis/nvidia.com/"))]


def test_gfd_labels_follow_model_and_driver():
    h100 = reconciler.gfd_labels(8, "H100", "595.91.07", "single")
    assert h100["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert (h100["nvidia.com/gpu.count"], h100["nvidia.com/gpu.family"], h100["nvidia.com/gpu.memory"]) == (
        "8", "hopper", "81559",
    )  # fmt: skip
    assert h100["nvidia.com/cuda.driver-version.full"] == "595.91.07"
    assert h100["nvidia.com/mig.capable"] == "true"
    a100 = reconciler.gfd_labels(4, "NVIDIA A100-SXM4-80GB", "580.126.20", "mixed")
    assert a100["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    assert (a100["nvidia.com/cuda.runtime-version.full"], a100["nvidia.com/mig.strategy"]) == ("13.0", "mixed")
    odd = reconciler.gfd_labels(1, "Some GPU (rev 2)", "595.91.07", "single")
    assert odd["nvidia.com/gpu.product"] == "Some-GPU-rev-2"  # a valid label value
    assert "nvidia.com/gpu.family" not in odd


@pytest.mark.parametrize(
    ("state", "cls"),
    [("idle", "idle"), ("idle*", "down"), ("mixed", "allocated"), ("allocated+", "allocated"),
     ("drained", "drain"), ("draining", "drain"), ("down*", "down"), ("completing", "allocated")],
)  # fmt: skip
def test_slurm_states_count_like_slinky(state, cls):
    assert reconciler.slurm_node_class(state) == cls


def test_env_file_json_or_shell(tmp_path):
    (tmp_path / "a.json").write_text('{"SLURM_CONF": "/x/slurm.conf"}')
    (tmp_path / "b.env").write_text("# lab\nexport SLURM_CONF=/x/slurm.conf\nPATH='/opt/bin:/usr/bin'\n")
    assert reconciler.load_env_file(tmp_path / "a.json") == {"SLURM_CONF": "/x/slurm.conf"}
    assert reconciler.load_env_file(tmp_path / "b.env") == {"SLURM_CONF": "/x/slurm.conf", "PATH": "/opt/bin:/usr/bin"}


def test_operands_not_ready_gives_not_ready_and_no_capacity(tmp_path):
    rec = _fake_reconciler(
        tmp_path,
        {"g1": {"gpus": 8, "model": "H100"}},
        {"nodes": [_obj("g1", status={})], "policies": [_obj("cluster-policy", spec={})],
         "deployments": [_operator(1)], "daemonsets": _daemonsets(1, 0)},
    )  # fmt: skip
    rec.reconcile_gpu()
    calls = _gpu_calls(rec)
    paths = [(m, p) for m, p, _ in calls]
    assert ("PATCH", "/api/v1/nodes/g1") in paths
    assert ("PATCH", "/api/v1/nodes/g1/status") not in paths  # no nvidia.com/gpu before the operands run
    labels = calls[0][2]["metadata"]["labels"]
    assert labels["nvidia.com/gpu.present"] == "true" and "nvidia.com/gpu.product" not in labels
    status = calls[-1][2]["status"]
    assert status["state"] == "notReady"
    assert {c["type"]: c["reason"] for c in status["conditions"]} == {
        "Ready": "OperandNotReady", "Error": "OperandNotReady",
    }  # fmt: skip


def test_no_gpu_nodes_is_ready_with_reason_no_gpu_nodes(tmp_path):
    rec = _fake_reconciler(
        tmp_path,
        {},
        {"nodes": [_obj("c1", status={})], "policies": [_obj("cluster-policy", spec={})],
         "deployments": [_operator(1)], "daemonsets": _daemonsets(0, 0)},
    )  # fmt: skip
    rec.reconcile_gpu()
    assert [(m, p) for m, p, _ in _gpu_calls(rec)] == [
        ("PATCH", "/apis/nvidia.com/v1/clusterpolicies/cluster-policy/status")
    ]
    status = _gpu_calls(rec)[0][2]["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (status["state"], ready["status"], ready["reason"]) == ("ready", "True", "NoGPUNodes")


def test_dead_operator_changes_nothing(tmp_path):
    rec = _fake_reconciler(
        tmp_path,
        {"g1": {"gpus": 8, "model": "H100"}},
        {"nodes": [_obj("g1", status={})], "policies": [_obj("cluster-policy", spec={})],
         "deployments": [_operator(0)], "daemonsets": _daemonsets(1, 1)},
    )  # fmt: skip
    rec.reconcile_gpu()
    assert rec.kube.calls == []


def _established(name: str) -> dict:
    return _obj(name, status={"conditions": [{"type": "Established", "status": "True"}]})


def test_operator_creates_the_operands_of_the_cluster_policy(tmp_path):
    """What the GPU Operator builds from the real chart's ClusterPolicy: a DaemonSet per enabled operand placed by
    its deploy label, dcgm-exporter's Service and a ServiceMonitor with the chart's additionalLabels."""
    spec = {
        "driver": {"enabled": True, "repository": "nvcr.io/nvidia", "image": "driver", "version": "595.91.07"},
        "nodeStatusExporter": {"enabled": False},
        "gfd": {"enabled": False},
        "daemonsets": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "dcgmExporter": {"enabled": True, "serviceMonitor": {"enabled": True, "interval": "15s",
                                                              "additionalLabels": {"release": "kube-prometheus-stack"}}},
    }  # fmt: skip
    stale_gfd = _obj(
        "gpu-feature-discovery", "gpu-operator", metadata={"ownerReferences": [{"uid": "uid-cluster-policy"}]}
    )
    rec = _fake_reconciler(
        tmp_path,
        {"g1": {"gpus": 8, "model": "H100"}},
        {"nodes": [_obj("g1", status={})], "policies": [_obj("cluster-policy", spec=spec)],
         "deployments": [_operator(1)], "daemonsets": [stale_gfd],
         "crds": [_established("servicemonitors.monitoring.coreos.com")]},
    )  # fmt: skip
    rec.reconcile_gpu()
    created = {(p, b["metadata"]["name"]): b for m, p, b in rec.kube.calls if m == "POST"}
    daemonsets = {name: b for (p, name), b in created.items() if p.endswith("/daemonsets")}
    assert set(daemonsets) == {
        "nvidia-driver-daemonset", "nvidia-container-toolkit-daemonset", "nvidia-operator-validator",
        "nvidia-device-plugin-daemonset", "nvidia-dcgm-exporter",
    }  # fmt: skip
    driver = daemonsets["nvidia-driver-daemonset"]
    assert driver["metadata"]["ownerReferences"][0]["kind"] == "ClusterPolicy"
    assert driver["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.deploy.driver": "true"}
    assert driver["spec"]["template"]["spec"]["containers"][0]["image"] == "nvcr.io/nvidia/driver:595.91.07"
    assert driver["spec"]["template"]["spec"]["tolerations"] == spec["daemonsets"]["tolerations"]
    assert ("DELETE", "/apis/apps/v1/namespaces/gpu-operator/daemonsets/gpu-feature-discovery", None) in rec.kube.calls
    service = created[("/api/v1/namespaces/gpu-operator/services", "nvidia-dcgm-exporter")]
    assert service["spec"]["ports"][0] == {"name": "gpu-metrics", "port": 9400, "targetPort": 9400}
    monitor = created[
        ("/apis/monitoring.coreos.com/v1/namespaces/gpu-operator/servicemonitors", "nvidia-dcgm-exporter")
    ]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["gpu-operator"]}
    assert monitor["spec"]["endpoints"] == [{"port": "gpu-metrics", "path": "/metrics", "interval": "15s"}]

    # Once written, the same objects are left alone; a changed ClusterPolicy updates them.
    written = {b["metadata"]["name"]: b for (_p, _n), b in created.items()}
    rec.daemonsets._items = {f"gpu-operator/{n}": written[n] for n in daemonsets}
    rec.services._items = {"gpu-operator/nvidia-dcgm-exporter": written["nvidia-dcgm-exporter"]}
    rec.kube.calls.clear()
    rec.reconcile_gpu()
    assert not [c for c in rec.kube.calls if "/daemonsets" in c[1] or "/services" in c[1]]


def test_the_dcgm_simulator_serves_the_labels_of_the_exporter_the_cluster_policy_deploys(tmp_path):
    """As the exporter pods the operator rolls out would: GPU Operator v26.3.3's dcgm-exporter (4.5.3-4.8.2)
    writes `Hostname`, v26.7.0's (4.6.0-4.8.3) `hostname`."""
    from lab.dcgm_sim import DcgmSim

    sim = DcgmSim(tmp_path / "dcgm")
    url = sim.up({"g1": (1, "NVIDIA H100 80GB HBM3")})
    try:
        policy = _obj("cluster-policy", spec={"dcgmExporter": {"enabled": True, "version": "4.5.3-4.8.2-distroless"}})
        rec = _fake_reconciler(tmp_path, {"g1": {"gpus": 1, "model": "H100"}},
                               {"nodes": [_obj("g1", status={})], "policies": [policy],
                                "deployments": [_operator(1)]})  # fmt: skip
        rec.dcgm_url = url
        rec.reconcile_gpu()
        assert 'Hostname="g1"' in sim.scrape("g1") and 'hostname="g1"' not in sim.scrape("g1")
        policy["spec"]["dcgmExporter"]["version"] = "4.6.0-4.8.3-distroless"
        rec.reconcile_gpu()
        assert 'hostname="g1"' in sim.scrape("g1") and 'Hostname="g1"' not in sim.scrape("g1")
    finally:
        sim.down()


def test_slinky_controller_gets_its_statefulset_and_state_claim(tmp_path):
    controller = _obj(
        "slurm", "slurm",
        spec={"slurmctld": {"image": "ghcr.io/slinkyproject/slurmctld:25.11"},
              "persistence": {"enabled": True, "storageClassName": "local-path", "accessModes": ["ReadWriteOnce"],
                              "resources": {"requests": {"storage": "4Gi"}}}},
    )  # fmt: skip
    rec = _fake_reconciler(tmp_path, {}, {"controllers": [controller]})
    rec.reconcile_slurm_controllers()
    created = {b["kind"]: b for m, _p, b in rec.kube.calls if m == "POST"}
    sts = created["StatefulSet"]
    assert sts["metadata"]["name"] == "slurm-controller" and sts["spec"]["serviceName"] == "slurm-controller"
    assert sts["spec"]["template"]["spec"]["containers"][0]["name"] == "slurmctld"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "statesave"
    assert claim["spec"] == {"storageClassName": "local-path", "accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": "4Gi"}}}  # fmt: skip
    assert created["Service"]["spec"]["clusterIP"] == "None"


def test_local_path_claim_gets_a_volume_on_the_node_the_scheduler_chose(tmp_path):
    sc = _obj("local-path", provisioner="rancher.io/local-path", volumeBindingMode="WaitForFirstConsumer",
              reclaimPolicy="Delete")  # fmt: skip
    spec = {
        "storageClassName": "local-path",
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "4Gi"}},
    }
    waiting = _obj("statesave-slurm-controller-0", "slurm", spec=dict(spec))
    chosen = _obj("statesave-other-0", "slurm", spec=dict(spec),
                  metadata={"annotations": {"volume.kubernetes.io/selected-node": "cp-1"}})  # fmt: skip
    other_class = _obj("x", "slurm", spec={**spec, "storageClassName": "ceph"},
                       metadata={"annotations": {"volume.kubernetes.io/selected-node": "cp-1"}})  # fmt: skip
    rec = _fake_reconciler(tmp_path, {}, {"storageclasses": [sc], "claims": [waiting, chosen, other_class]})
    rec.reconcile_local_volumes()
    assert [(m, p) for m, p, _ in rec.kube.calls] == [("POST", "/api/v1/persistentvolumes")]
    pv = rec.kube.calls[0][2]
    assert pv["spec"]["claimRef"]["name"] == "statesave-other-0" and pv["spec"]["capacity"] == {"storage": "4Gi"}
    term = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert (term["key"], term["values"]) == ("kubernetes.io/hostname", ["cp-1"])


def test_undo_restores_capacity_the_node_had_before(tmp_path):
    state = {"labels": ["nvidia.com/gpu.present", "nvidia.com/gpu.count"], "capacity": "8", "previous": "2"}
    node = _obj(
        "g1",
        metadata={"labels": {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": "8", "mine": "x"},
                  "annotations": {reconciler.STATE_ANNOTATION: json.dumps(state)}},
        status={"capacity": {"nvidia.com/gpu": "8"}, "allocatable": {"nvidia.com/gpu": "8"}},
    )  # fmt: skip
    rec = _fake_reconciler(tmp_path, {"g1": {"gpus": 8, "model": "H100"}}, {"nodes": [node]})
    rec.reconcile_gpu()  # no ClusterPolicy: the GPU Operator is gone
    by_path = {p: b for _m, p, b in rec.kube.calls}
    assert by_path["/api/v1/nodes/g1/status"]["status"]["allocatable"] == {"nvidia.com/gpu": "2"}
    meta = by_path["/api/v1/nodes/g1"]["metadata"]
    assert meta["labels"] == {"nvidia.com/gpu.present": None, "nvidia.com/gpu.count": None}  # only its own labels
    assert meta["annotations"] == {reconciler.STATE_ANNOTATION: None}


def test_nodeset_pods_and_status(tmp_path):
    nodeset = _obj(
        "slurm-worker-gpu", "slurm",
        spec={"replicas": 2, "slurmd": {"image": "slurmd:x", "resources": {"limits": {"nvidia.com/gpu": 1}}},
              "template": {"spec": {"hostname": "gpu-", "nodeSelector": {"a": "b"}}}},
    )  # fmt: skip
    owner = [{"kind": "NodeSet", "uid": "uid-slurm-worker-gpu", "name": "slurm-worker-gpu"}]
    ready = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    pods = [
        _obj("slurm-worker-gpu-0", "slurm", metadata={"ownerReferences": owner}, spec={"nodeName": "n1"}, status=ready),
        _obj("slurm-worker-gpu-5", "slurm", metadata={"ownerReferences": owner}, spec={"nodeName": "n1"}, status=ready),
    ]
    rec = _fake_reconciler(tmp_path, {}, {"nodesets": [nodeset], "pods": pods})
    rec._slurm_states = {"n1": "mixed"}
    rec.reconcile_nodesets()
    calls = {(m, p): b for m, p, b in rec.kube.calls}
    assert ("DELETE", "/api/v1/namespaces/slurm/pods/slurm-worker-gpu-5") in calls  # beyond replicas
    created = calls[("POST", "/api/v1/namespaces/slurm/pods")]
    assert created["metadata"]["name"] == "slurm-worker-gpu-1"
    assert created["metadata"]["ownerReferences"][0]["kind"] == "NodeSet"
    assert created["spec"]["hostname"] == "gpu-1" and created["spec"]["nodeSelector"] == {"a": "b"}
    slurmd = created["spec"]["containers"][0]
    assert slurmd["name"] == "slurmd" and slurmd["resources"]["requests"] == {"nvidia.com/gpu": 1}
    status = calls[("PATCH", "/apis/slinky.slurm.net/v1beta1/namespaces/slurm/nodesets/slurm-worker-gpu/status")]
    st = status["status"]
    assert (st["replicas"], st["readyReplicas"], st["slurmAllocated"], st["slurmIdle"]) == (1, 1, 1, 0)
    assert st["selector"] == "app.kubernetes.io/instance=slurm-worker-gpu,app.kubernetes.io/name=slurmd"


# ------------------------------------------------------------------------------------- against a real lab


def wait_for(what: str, fn, timeout: float = 90.0, interval: float = 0.2):
    """Poll fn() until it returns something truthy; fail with `what` and the last value otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last error
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


class Lab:
    def __init__(self, cp: ControlPlane, workdir: Path) -> None:
        from kubernetes import client, config

        self.cp = cp
        self.workdir = workdir
        self.api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.inventory = workdir / "inventory.json"
        self.reconciler_log = workdir / "reconciler.log"
        self.proc: subprocess.Popen | None = None
        self.timings: dict[str, float] = {}

    def helm(self):
        from pyhelm3 import Client

        return Client(executable=str(HELM), kubeconfig=self.cp.kubeconfig, default_timeout="180s")

    def node(self, name: str) -> dict:
        return self.api.sanitize_for_serialization(self.core.read_node(name))

    def policy(self) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_cluster_custom_object("nvidia.com", "v1", "clusterpolicies", "cluster-policy")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def logs_object(self, namespace: str, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object("kwok.x-k8s.io", "v1alpha1", namespace, "logs", name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def reconciler_output(self) -> str:
        return self.reconciler_log.read_text() if self.reconciler_log.exists() else ""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not HELM.exists():
        pytest.skip(f"helm not built: {HELM}")
    pytest.importorskip("pyhelm3")
    workdir = tmp_path_factory.mktemp("reconciler")
    cp = ControlPlane(workdir, BIN_DIR)
    try:
        cp._binaries()
    except FileNotFoundError as exc:
        pytest.skip(f"lab binaries not built: {exc}")
    cp.up()
    lab = Lab(cp, workdir)
    try:
        # GPU nodes are registered without nvidia.com/gpu: the "device plugin" (reconciler) must add it.
        manifests = [nodes.node_manifest(n, labels={}, taints=[], kubelet_version=pins.KUBE_VERSION) for n in GPU_NODES]
        manifests.append(nodes.node_manifest(CPU_NODE, labels={}, taints=[], kubelet_version=pins.KUBE_VERSION))
        nodes.register_nodes(cp.kubeconfig, manifests)
        nodes.wait_nodes_ready(cp.kubeconfig, [m["metadata"]["name"] for m in manifests], timeout=60)
        inventory = {n: {"gpus": g, "model": m} for n, (g, m) in GPU_NODES.items()}
        inventory[CPU_NODE] = {"gpus": 0, "model": ""}
        lab.inventory.write_text(json.dumps(inventory))
        # A fake sinfo (first on PATH through --slurm-env) reports gpu-a idle and gpu-b drained.
        fakebin = workdir / "fakebin"
        fakebin.mkdir()
        sinfo = fakebin / "sinfo"
        sinfo.write_text("#!/bin/sh\nprintf 'gpu-a idle\\ngpu-a idle\\ngpu-b drained\\ncpu-a down*\\n'\n")
        sinfo.chmod(0o755)
        env_file = workdir / "slurm.env"
        env_file.write_text(f"export PATH={fakebin}:{os.environ.get('PATH', '/usr/bin:/bin')}\n")
        with open(lab.reconciler_log, "w") as out:
            lab.proc = subprocess.Popen(
                [sys.executable, "-m", "lab.reconciler", "--kubeconfig", str(cp.kubeconfig),
                 "--inventory", str(lab.inventory), "--slurm-env", str(env_file), "--slurm-poll", "0.5"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_for("reconciler watches synced", lambda: "all watches synced" in lab.reconciler_output(), 30)
        yield lab
    finally:
        if lab.proc is not None:
            try:
                stat = Path(f"/proc/{lab.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                lab.timings["reconciler_cpu_s"] = round((int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"), 1)
            except (OSError, IndexError, ValueError):
                pass
            os.killpg(lab.proc.pid, signal.SIGTERM)
            try:
                lab.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(lab.proc.pid, signal.SIGKILL)
        print("timings:", json.dumps(lab.timings))
        print("reconciler log (tail):\n" + "\n".join(lab.reconciler_output().splitlines()[-40:]))
        cp.down()


def _gpus(node: dict, field: str = "allocatable") -> str | None:
    return ((node.get("status") or {}).get(field) or {}).get("nvidia.com/gpu")


def test_gpu_operator_install_makes_cluster_policy_ready(lab):
    for name in GPU_NODES:
        assert _gpus(lab.node(name)) is None, "GPU capacity before the GPU Operator: the test would prove nothing"
    values = {
        "driver": {"enabled": True},
        "dcgmExporter": {"config": {"name": "gpuforge-dcgm-metrics"}, "serviceMonitor": {"enabled": True}},
    }

    async def install():
        helm = lab.helm()
        operator = await helm.get_chart(chart("gpu-operator"))
        return await helm.install_or_upgrade_release(
            "gpu-operator", operator, values, namespace="gpu-operator", create_namespace=True,
            atomic=True, wait=True, timeout="240s",
        )  # fmt: skip

    t0 = time.monotonic()
    revision = asyncio.run(install())
    lab.timings["gpu_operator_helm_install_s"] = round(time.monotonic() - t0, 1)
    assert revision.revision == 1 and revision.status.value == "deployed"
    policy = wait_for(
        "ClusterPolicy ready", lambda: (p := lab.policy()) and (p.get("status") or {}).get("state") == "ready" and p
    )
    lab.timings["install_to_cluster_policy_ready_s"] = round(time.monotonic() - t0, 1)
    status = policy["status"]
    assert status["namespace"] == "gpu-operator"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Reconciled")

    for name, (count, _model) in GPU_NODES.items():
        node = lab.node(name)
        labels = node["metadata"]["labels"]
        assert _gpus(node) == str(count) and _gpus(node, "capacity") == str(count), name
        assert labels["feature.node.kubernetes.io/pci-10de.present"] == "true"
        assert labels["nvidia.com/gpu.present"] == "true"
        assert labels["nvidia.com/gpu.count"] == str(count)
        assert labels["nvidia.com/gpu.deploy.device-plugin"] == "true"
    assert lab.node("gpu-a")["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert lab.node("gpu-b")["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
    assert lab.node("gpu-a")["metadata"]["labels"]["nvidia.com/gpu.family"] == "hopper"
    cpu = lab.node(CPU_NODE)
    assert _gpus(cpu) is None
    assert not [k for k in cpu["metadata"]["labels"] if k.startswith("nvidia.com/") or "pci-10de" in k]

    # The operands run exactly on the GPU nodes; NFD on every node.
    for ds in ("nvidia-driver-daemonset", "nvidia-device-plugin-daemonset", "nvidia-dcgm-exporter"):
        st = lab.apps.read_namespaced_daemon_set(ds, "gpu-operator").status
        assert (st.desired_number_scheduled, st.number_ready) == (2, 2), ds
    nfd = lab.apps.read_namespaced_daemon_set("gpu-operator-node-feature-discovery-worker", "gpu-operator").status
    assert nfd.desired_number_scheduled == 3

    # Idempotent: in a steady cluster (pod and node heartbeats keep arriving) nothing is written again.
    time.sleep(3)
    out = lab.reconciler_output()
    assert out.count("node gpu-a: capacity/allocatable") == 1, out
    assert out.count("node gpu-a: labels") == 2, out  # operator labels, then GFD's
    assert out.count("-> ready") == 1, out


def _pod(name: str, image: str, restart: str, gpus: int = 0) -> dict:
    container = {"name": "main", "image": image}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": restart, "containers": [container]},
    }


def _log(lab: Lab, name: str) -> str:
    return lab.core.read_namespaced_pod_log(name, "default")


def test_cuda_smoke_pod_passes_and_busybox_does_not(lab):
    lab.core.create_namespaced_pod("default", _pod("cuda-vectoradd", pins.CUDA_SMOKE_IMAGE, "OnFailure", gpus=1))
    lab.core.create_namespaced_pod("default", _pod("busybox-smoke", "busybox:1.36", "Never"))
    for name in ("cuda-vectoradd", "busybox-smoke"):
        wait_for(
            f"{name} Succeeded", lambda n=name: lab.core.read_namespaced_pod(n, "default").status.phase == "Succeeded"
        )
    cuda = lab.core.read_namespaced_pod("cuda-vectoradd", "default")
    assert cuda.spec.node_name in GPU_NODES  # the GPU limit kept it off the CPU node

    text = wait_for("vectorAdd log", lambda: _log(lab, "cuda-vectoradd"), 30)
    lines = text.strip().splitlines()
    assert lines[0] == "[Vector addition of 50000 elements]"
    assert lines[-2:] == ["Test PASSED", "Done"]
    other = wait_for("busybox log", lambda: _log(lab, "busybox-smoke"), 30)
    assert "Test PASSED" not in other and "busybox:1.36" in other

    logs = lab.logs_object("default", "cuda-vectoradd")
    assert logs["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "lab-reconciler"
    assert logs["metadata"]["ownerReferences"][0]["uid"] == cuda.metadata.uid
    assert Path(logs["spec"]["logs"][0]["logsFile"]).read_text().split(" ", 3)[1:3] == ["stdout", "F"]  # CRI format


def test_logs_of_deleted_pods_go_away(lab):
    for name in ("cuda-vectoradd", "busybox-smoke"):
        lab.core.delete_namespaced_pod(name, "default", grace_period_seconds=0)
    for name in ("cuda-vectoradd", "busybox-smoke"):
        wait_for(f"Logs {name} deleted", lambda n=name: lab.logs_object("default", n) is None, 30)


def test_survives_api_server_restart_and_follows_inventory(lab):
    t0 = time.monotonic()
    lab.cp.restart_apiserver(downtime=1.0)
    lab.timings["apiserver_restart_s"] = round(time.monotonic() - t0, 1)
    # A new pod after the restart still gets its Logs: the watches came back.
    lab.core.create_namespaced_pod("default", _pod("after-restart", "busybox:1.36", "Always"))
    t1 = time.monotonic()
    wait_for("Logs after restart", lambda: lab.logs_object("default", "after-restart"), 60)
    lab.timings["logs_after_restart_s"] = round(time.monotonic() - t1, 1)
    # The inventory is re-read: gpu-a now reports 6 GPUs.
    inventory = json.loads(lab.inventory.read_text())
    inventory["gpu-a"]["gpus"] = 6
    lab.inventory.write_text(json.dumps(inventory))
    t2 = time.monotonic()
    wait_for("gpu-a allocatable 6", lambda: _gpus(lab.node("gpu-a")) == "6", 30)
    lab.timings["inventory_change_to_allocatable_s"] = round(time.monotonic() - t2, 1)
    assert lab.node("gpu-a")["metadata"]["labels"]["nvidia.com/gpu.count"] == "6"
    lab.core.delete_namespaced_pod("after-restart", "default", grace_period_seconds=0)


def _nodeset(lab: Lab, name: str) -> dict:
    return lab.custom.get_namespaced_custom_object("slinky.slurm.net", "v1beta1", "slurm", "nodesets", name)


def _workers(lab: Lab, nodeset: str) -> list:
    pods = lab.core.list_namespaced_pod("slurm", label_selector=f"app.kubernetes.io/instance={nodeset}").items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def test_nodeset_reports_replicas_and_helm_upgrade(lab):
    slurm_values = {
        "clusterName": "labc",
        "nodesets": {
            "gpu": {
                "replicas": 2,
                "slurmd": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
                "podSpec": {"nodeSelector": {"nvidia.com/gpu.present": "true"}},
            }
        },
        "partitions": {"gpu": {"enabled": True, "nodesets": ["gpu"], "configMap": {"Default": "YES"}}},
    }

    async def install(replicas: int):
        helm = lab.helm()
        crds = await helm.get_chart(chart("slurm-operator-crds"))
        await helm.install_or_upgrade_release("slurm-operator-crds", crds, {}, namespace="slinky", wait=True)
        slurm = await helm.get_chart(chart("slurm"))
        slurm_values["nodesets"]["gpu"]["replicas"] = replicas
        return await helm.install_or_upgrade_release(
            "slurm", slurm, slurm_values, namespace="slurm", atomic=True, wait=True, timeout="180s"
        )

    rev = asyncio.run(install(2))
    assert rev.revision == 1
    # The operator (played by the reconciler) builds the controller's StatefulSet from the chart's Controller.
    controller = wait_for(
        "pod slurm-controller-0", lambda: lab.core.read_namespaced_pod("slurm-controller-0", "slurm"), 60
    )
    assert [c.name for c in controller.spec.containers][0] == "slurmctld"
    assert controller.metadata.labels["app.kubernetes.io/name"] == "slurmctld"

    name = "slurm-worker-gpu"
    t0 = time.monotonic()
    status = wait_for(
        "NodeSet 2 ready replicas",
        lambda: (
            (s := _nodeset(lab, name).get("status") or {}).get("readyReplicas") == 2
            and s.get("slurmIdle", 0) + s.get("slurmDrain", 0) == 2
            and s
        ),
        120,
    )
    lab.timings["nodeset_ready_s"] = round(time.monotonic() - t0, 1)
    assert status["replicas"] == 2 and status["slurmDown"] == 0 and status["slurmAllocated"] == 0
    workers = _workers(lab, name)
    assert sorted(p.metadata.name for p in workers) == ["slurm-worker-gpu-0", "slurm-worker-gpu-1"]
    assert all(p.spec.node_name in GPU_NODES for p in workers)
    on_b = sum(p.spec.node_name == "gpu-b" for p in workers)
    assert status["slurmDrain"] == on_b and status["slurmIdle"] == 2 - on_b  # the fake sinfo: gpu-b drained
    assert workers[0].spec.containers[0].name == "slurmd"
    assert workers[0].spec.hostname in ("gpu-0", "gpu-1")

    # helm upgrade through pyhelm3: scale the NodeSet down to 1.
    rev = asyncio.run(install(1))
    assert rev.revision == 2 and rev.status.value == "deployed"
    assert _nodeset(lab, name)["spec"]["replicas"] == 1
    wait_for("NodeSet scaled to 1", lambda: (_nodeset(lab, name).get("status") or {}).get("replicas") == 1, 60)
    wait_for("worker 1 deleted", lambda: [p.metadata.name for p in _workers(lab, name)] == ["slurm-worker-gpu-0"], 60)

    # Gone with the release: the Controller, and with it (owner references) its StatefulSet; the state claim
    # stays, as on a cluster, and is removed by hand for the next test's fresh install.
    asyncio.run(lab.helm().uninstall_release("slurm", namespace="slurm", wait=True))
    wait_for("controller StatefulSet gone", lambda: not lab.apps.list_namespaced_stateful_set("slurm").items, 60)
    lab.core.delete_collection_namespaced_persistent_volume_claim("slurm")


def test_fail_readiness_upgrade_rolls_back(lab):
    from pyhelm3 import errors

    async def upgrade():
        helm = lab.helm()
        operator = await helm.get_chart(chart("gpu-operator"))
        return await helm.install_or_upgrade_release(
            "gpu-operator", operator, UNSCHEDULABLE, namespace="gpu-operator",
            atomic=True, wait=True, timeout="20s",
        )  # fmt: skip

    async def current():
        return await lab.helm().get_current_revision("gpu-operator", namespace="gpu-operator")

    before = asyncio.run(current())
    t0 = time.monotonic()
    with pytest.raises(errors.Error):
        asyncio.run(upgrade())
    lab.timings["fail_readiness_upgrade_rollback_s"] = round(time.monotonic() - t0, 1)
    after = asyncio.run(current())
    assert after.revision > before.revision + 1  # failed upgrade, then the rollback revision
    assert after.status.value == "deployed"
    values = asyncio.run(after.values())
    assert values.get("operator") != UNSCHEDULABLE["operator"]
    dep = lab.apps.read_namespaced_deployment("gpu-operator", "gpu-operator")
    assert dep.spec.template.spec.containers[0].resources.requests["cpu"] != "100000"
    assert (lab.policy().get("status") or {}).get("state") == "ready"


def test_uninstall_undoes_and_failing_install_is_removed(lab):
    from pyhelm3 import errors

    async def uninstall():
        await lab.helm().uninstall_release("gpu-operator", namespace="gpu-operator", wait=True)

    asyncio.run(uninstall())
    wait_for("ClusterPolicy gone", lambda: lab.policy() is None, 60)
    for name in GPU_NODES:
        wait_for(f"{name} GPU capacity removed", lambda n=name: _gpus(lab.node(n)) is None, 30)
        labels = lab.node(name)["metadata"]["labels"]
        assert not [k for k in GPU_LABELS if k in labels], labels
        assert "feature.node.kubernetes.io/pci-10de.present" not in labels

    async def failing_install():
        helm = lab.helm()
        operator = await helm.get_chart(chart("gpu-operator"))
        return await helm.install_or_upgrade_release(
            "gpu-operator", operator, UNSCHEDULABLE, namespace="gpu-operator",
            atomic=True, wait=True, timeout="20s",
        )  # fmt: skip

    with pytest.raises(errors.Error):
        asyncio.run(failing_install())
    with pytest.raises(errors.ReleaseNotFoundError):
        asyncio.run(lab.helm().get_current_revision("gpu-operator", namespace="gpu-operator"))
    assert lab.policy() is None
    # The operator never ran, so no node was ever labelled for the GPU stack.
    assert not [k for k in GPU_LABELS if k in lab.node("gpu-a")["metadata"]["labels"]]


def test_all_charts_install_with_gpuforge_values(lab, tmp_path):
    """Every lab chart, with the values gpuforge renders, installs and becomes ready on the real API server, in
    gpuforge's order; the stack then behaves as gpuforge expects."""
    import yaml

    from gpuforge.config import load_config
    from gpuforge.render import render_releases

    cfg = {
        "cluster_name": "labc",
        "k8s_cluster_nodes": [
            {"ip": "10.0.0.2", "role": ["gpu-worker"], "name": "gpu-a", "gpu_count": 8},
            {"ip": "10.0.0.3", "role": ["gpu-worker"], "name": "gpu-b", "gpu_count": 4},
            {"ip": "10.0.0.4", "role": ["cpu-worker", "control-plane", "etcd"], "name": CPU_NODE},
        ],
        "deepops_services": {
            svc: {"enabled": True, "releases": {n: {"path": str(chart(n))} for n, *_ in rel}}
            for svc, rel in pins.CHARTS.items()
        },
    }
    (tmp_path / "config.yml").write_text(yaml.safe_dump(cfg))
    releases = render_releases(load_config(tmp_path / "config.yml"))
    inventory = json.loads(lab.inventory.read_text())
    inventory["gpu-a"]["gpus"] = 8  # back to what the config says (a 6-GPU node cannot host the gpu-8 NodeSet)
    lab.inventory.write_text(json.dumps(inventory))
    # What gpuforge's Kubespray run puts on the nodes (NodeSets select on it) and in the cluster (the StorageClass
    # of its local-path addon, which slurmctld's state volume asks for).
    for name, nodeset in (("gpu-a", "gpu-8"), ("gpu-b", "gpu-4")):
        lab.core.patch_node(name, {"metadata": {"labels": {"gpuforge.io/nodeset": nodeset}}})
    nodes.ensure_local_path_storage_class(lab.cp.kubeconfig, LOCAL_PATH_STORAGE_CLASS)

    async def install_all():
        helm = lab.helm()
        out = {}
        for r in releases:
            t0 = time.monotonic()
            packaged = await helm.get_chart(Path(r.chart))
            rev = await helm.install_or_upgrade_release(
                r.name, packaged, r.values, namespace=r.namespace, create_namespace=True,
                atomic=True, wait=True, timeout="180s",
            )  # fmt: skip
            out[r.name] = (rev.status.value, round(time.monotonic() - t0, 1))
        return out

    t0 = time.monotonic()
    results = asyncio.run(install_all())
    lab.timings["all_charts_install_s"] = round(time.monotonic() - t0, 1)
    lab.timings["per_release_s"] = {k: v[1] for k, v in results.items()}
    assert {k: v[0] for k, v in results.items()} == {r.name: "deployed" for r in releases}

    # kube-prometheus-stack went first, so the operator's ServiceMonitor for dcgm-exporter comes, labelled for it.
    sm = wait_for(
        "dcgm-exporter ServiceMonitor",
        lambda: lab.custom.get_namespaced_custom_object(
            "monitoring.coreos.com", "v1", "gpu-operator", "servicemonitors", "nvidia-dcgm-exporter"
        ),
        60,
    )
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # slurmctld's state volume was provisioned and bound on the cluster gpuforge builds.
    claim = wait_for(
        "slurmctld state claim Bound",
        lambda: (
            (c := lab.core.read_namespaced_persistent_volume_claim("statesave-slurm-controller-0", "slurm"))
            and c.status.phase == "Bound"
            and c
        ),
        60,
    )
    assert claim.spec.storage_class_name == LOCAL_PATH_STORAGE_CLASS
    wait_for(
        "slurm-controller-0 Running",
        lambda: lab.core.read_namespaced_pod("slurm-controller-0", "slurm").status.phase == "Running",
        60,
    )
    svc = lab.core.read_namespaced_service("kube-prometheus-stack-prometheus", "monitoring")
    assert svc.spec.ports[0].port == 9090
    wait_for("ClusterPolicy ready", lambda: ((lab.policy() or {}).get("status") or {}).get("state") == "ready", 60)
    wait_for("gpu-a allocatable 8", lambda: _gpus(lab.node("gpu-a")) == "8", 30)
    for name in ("slurm-worker-gpu-8", "slurm-worker-gpu-4"):
        wait_for(f"{name} ready", lambda n=name: (_nodeset(lab, n).get("status") or {}).get("readyReplicas") == 1, 60)
    assert _workers(lab, "slurm-worker-gpu-4")[0].spec.node_name == "gpu-b"
    assert lab.core.read_namespaced_service("kubernetes-dashboard-kong-proxy", "kubernetes-dashboard")
    assert lab.apps.read_namespaced_deployment("slurm-operator", "slinky").status.available_replicas == 1
