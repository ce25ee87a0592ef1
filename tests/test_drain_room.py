"""gpuforge.drain_room: whether each node an upgrade drains has somewhere for its pods to go, and no budget that
refuses every eviction. Plain functions, no cluster."""

from __future__ import annotations

from gpuforge.checks import requirement_matches
from gpuforge.drain_room import Budget, Node, Pod, can_run_on, drain_problems, free_room
from tasks.kube import _drain_pod

GPU = "nvidia.com/gpu"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def node(name: str, gpus: int = 0, *, ready=True, schedulable=True, labels=None, taints=(), pods=110) -> Node:
    allocatable = {"cpu": 8.0, "memory": 32 * 2**30, GPU: float(gpus), "pods": float(pods)}
    return Node(name, ready, schedulable, allocatable, labels or {}, taints)


def pod(name: str, on: str, *, gpus=0, cpu=0.5, owner="ReplicaSet", ns="apps", **extra) -> Pod:
    requests = {"cpu": cpu, **({GPU: float(gpus)} if gpus else {})}
    return Pod(ns, name, on, requests, owner_kind=owner, **extra)


def test_a_budget_that_allows_no_disruption_over_a_pod_of_a_drained_node_is_a_problem():
    pods = [pod("db-0", "cpu-1", labels={"app": "db"}), pod("web-0", "cpu-2", labels={"app": "web"})]
    budgets = [
        Budget("apps", "db", {"matchLabels": {"app": "db"}}, 0),
        Budget("apps", "web", {"matchLabels": {"app": "web"}}, 0),  # its pod is on a node not drained
    ]
    problems = drain_problems(["cpu-1"], [node("cpu-1"), node("cpu-2")], pods, budgets)
    assert len(problems) == 1, problems
    assert "PodDisruptionBudget apps/db allows no disruption now and covers apps/db-0" in problems[0]
    assert problems[0].startswith("draining cpu-1:")


def test_a_budget_with_a_disruption_to_spare_or_in_another_namespace_lets_the_drain_go():
    pods = [pod("db-0", "cpu-1", labels={"app": "db"})]
    spare = [Budget("apps", "db", {"matchLabels": {"app": "db"}}, 1)]
    elsewhere = [Budget("other", "db", {"matchLabels": {"app": "db"}}, 0)]
    nodes = [node("cpu-1"), node("cpu-2")]
    assert drain_problems(["cpu-1"], nodes, pods, spare) == []
    assert drain_problems(["cpu-1"], nodes, pods, elsewhere) == []


def test_budget_selectors_follow_label_selector_rules():
    db = pod("db-0", "cpu-1", labels={"app": "db", "tier": "data"})
    assert Budget("apps", "b", {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["data"]}]}, 0).covers(
        db
    )
    assert not Budget("apps", "b", {"matchLabels": {"app": "db"}, "matchExpressions": [
        {"key": "tier", "operator": "NotIn", "values": ["data"]}]}, 0).covers(db)  # fmt: skip
    assert not Budget("apps", "b", None, 0).covers(db), "policy/v1: a null selector selects no pod"
    assert Budget("apps", "b", {}, 0).covers(db), "policy/v1: an empty selector selects every pod of its namespace"
    assert not Budget("other", "b", {}, 0).covers(db)


def test_a_gpu_pod_needs_free_gpus_on_another_gpu_node():
    nodes = [node("gpu-1", 8), node("gpu-2", 8), node("cpu-1")]
    busy = [pod(f"train-{i}", "gpu-2", gpus=4) for i in range(2)]  # gpu-2 full
    job = pod("infer-0", "gpu-1", gpus=1)
    problems = drain_problems(["gpu-1"], nodes, [*busy, job], [])
    assert problems == [
        "draining gpu-1: pod apps/infer-0 (requests cpu 0.5, nvidia.com/gpu 1) fits on no other Ready, schedulable "
        "node: it would stay Pending"
    ]
    assert drain_problems(["gpu-1"], nodes, [busy[0], job], []) == [], "4 GPUs free on gpu-2"


def test_pods_of_one_node_take_the_room_they_are_given_one_after_the_other():
    nodes = [node("gpu-1", 8), node("gpu-2", 8)]
    pods = [pod("big", "gpu-2", gpus=6), pod("a", "gpu-1", gpus=2), pod("b", "gpu-1", gpus=1)]
    problems = drain_problems(["gpu-1"], nodes, pods, [])
    assert len(problems) == 1 and "apps/b" in problems[0], problems  # a (larger) placed first, then no room for b


def test_each_node_is_judged_alone_against_the_cluster_as_it_is_now():
    nodes = [node("gpu-1", 8), node("gpu-2", 8)]
    pods = [pod("a", "gpu-1", gpus=4), pod("b", "gpu-2", gpus=4)]
    assert drain_problems(["gpu-1", "gpu-2"], nodes, pods, []) == []  # serial: each fits where the other is


def test_cordoned_and_not_ready_nodes_take_nothing():
    pods = [pod("web-0", "cpu-1")]
    assert drain_problems(["cpu-1"], [node("cpu-1"), node("cpu-2", schedulable=False)], pods, [])
    assert drain_problems(["cpu-1"], [node("cpu-1"), node("cpu-2", ready=False)], pods, [])
    assert not drain_problems(["cpu-1"], [node("cpu-1"), node("cpu-2")], pods, [])


def test_node_selector_affinity_and_taints_decide_where_a_pod_may_go():
    gpu_node = node("gpu-2", 8, labels={"nvidia.com/gpu.present": "true", "zone": "b"}, taints=(GPU_TAINT,))
    plain = pod("x", "gpu-1")
    assert not can_run_on(plain, gpu_node), "NoSchedule taint not tolerated"
    tolerant = pod("x", "gpu-1", tolerations=({"key": "nvidia.com/gpu", "operator": "Exists"},))
    assert can_run_on(tolerant, gpu_node)
    assert can_run_on(pod("x", "gpu-1", tolerations=({"operator": "Exists"},)), gpu_node), "tolerates everything"
    wrong_effect = pod("x", "gpu-1", tolerations=({"key": "nvidia.com/gpu", "operator": "Exists",
                                                   "effect": "NoExecute"},))  # fmt: skip
    assert not can_run_on(wrong_effect, gpu_node)
    soft = node("cpu-2", taints=({"key": "spot", "effect": "PreferNoSchedule"},))
    assert can_run_on(plain, soft), "PreferNoSchedule does not keep a pod off"
    tolerant_a = pod("x", "gpu-1", tolerations=tolerant.tolerations, node_selector={"zone": "a"})
    assert not can_run_on(tolerant_a, gpu_node)
    terms = ([{"key": "zone", "operator": "In", "values": ["a"]}], [{"key": "zone", "operator": "In", "values": ["b"]}])
    assert can_run_on(Pod("apps", "x", "gpu-1", tolerations=tolerant.tolerations, node_affinity=terms), gpu_node)
    assert not can_run_on(
        Pod("apps", "x", "gpu-1", tolerations=tolerant.tolerations, node_affinity=terms[:1]), gpu_node
    )


def test_daemonset_nodeset_static_and_finished_pods_are_not_moved():
    staying = [
        pod("dcgm-exporter-x", "gpu-1", gpus=8, owner="DaemonSet"),
        pod("slurm-worker-gpu-1", "gpu-1", gpus=8, owner="NodeSet"),
        pod("done", "gpu-1", gpus=8, finished=True),
        pod("kube-proxy", "gpu-1", owner="Node", mirror=True, cpu=64),
    ]
    assert drain_problems(["gpu-1"], [node("gpu-1", 8), node("gpu-2", 0)], staying, []) == []
    assert staying[1].moves(staying={"DaemonSet"}), "node removal evicts the slurmd pod too"


def test_free_room_is_allocatable_less_what_unfinished_pods_request_and_their_pod_slots():
    room = free_room([node("gpu-1", 8)], [pod("a", "gpu-1", gpus=3, cpu=2), pod("b", "gpu-1", gpus=5, finished=True)])
    assert room["gpu-1"][GPU] == 5 and room["gpu-1"]["cpu"] == 6 and room["gpu-1"]["pods"] == 109


def test_a_node_with_no_pod_slot_left_takes_no_pod():
    full = [pod(f"p{i}", "cpu-2", cpu=0) for i in range(3)]
    moving = pod("web-0", "cpu-1", cpu=0)
    assert drain_problems(["cpu-1"], [node("cpu-1"), node("cpu-2", pods=3)], [*full, moving], [])
    assert not drain_problems(["cpu-1"], [node("cpu-1"), node("cpu-2", pods=4)], [*full, moving], [])


def test_numeric_and_existence_operators():
    labels = {"gpus": "8", "pool": "a"}
    assert requirement_matches({"key": "gpus", "operator": "Gt", "values": ["4"]}, labels)
    assert not requirement_matches({"key": "gpus", "operator": "Lt", "values": ["4"]}, labels)
    assert not requirement_matches({"key": "pool", "operator": "Gt", "values": ["4"]}, labels)
    assert requirement_matches({"key": "pool", "operator": "Exists"}, labels)
    assert requirement_matches({"key": "spot", "operator": "DoesNotExist"}, labels)


def test_a_pod_as_the_api_server_sends_it_is_read_with_its_requests_and_constraints():
    raw = {
        "metadata": {
            "namespace": "ml",
            "name": "train-0",
            "labels": {"app": "train"},
            "ownerReferences": [{"kind": "Job", "controller": True}],
        },  # fmt: skip
        "spec": {
            "nodeName": "gpu-1",
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "containers": [
                {"resources": {"requests": {"cpu": "250m", "memory": "1Gi", GPU: "2"}}},
                {"resources": {"requests": {"cpu": "1"}}},
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                        ]
                    }
                }
            },
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        },  # fmt: skip
        "status": {"phase": "Running"},
    }
    got = _drain_pod(raw)
    assert got.ref == "ml/train-0" and got.node == "gpu-1" and got.owner_kind == "Job"
    assert got.requests == {"cpu": 1.25, "memory": float(2**30), GPU: 2.0}
    assert got.node_affinity == (({"key": "zone", "operator": "In", "values": ["a"]},),)
    assert got.moves() and not got.finished and not got.mirror
    static = _drain_pod({"metadata": {"name": "p", "annotations": {"kubernetes.io/config.mirror": "x"}}, "spec": {}})
    assert not static.moves()
