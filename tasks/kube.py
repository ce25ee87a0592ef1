"""Kubernetes verbs: read nodes and custom resources, apply objects, wait for conditions.

Waits survive an API server restart: a transient error while waiting is logged and the wait goes on
until its own deadline.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.utils.quantity import parse_quantity
from prefect import task
from prefect.cache_policies import NO_CACHE
from urllib3.exceptions import HTTPError

from gpuforge import checks, drain_room, validation
from gpuforge.config import Config
from gpuforge.desired import GPU_OPERATOR_RELEASE, DesiredState
from gpuforge.remediation import CORDON_ANNOTATION
from gpuforge.validation import FAIL, PASS, SKIP, CheckResult
from tasks.retry import is_transient_error, retry_transient

FIELD_MANAGER = "gpuforge"
GPU = "nvidia.com/gpu"
UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"


class WaitTimeout(TimeoutError):
    """A wait ran out of time; the message says what was still missing."""


def api_client(kubeconfig: Path) -> client.ApiClient:
    if not Path(kubeconfig).exists():
        raise FileNotFoundError(f"kubeconfig {kubeconfig} does not exist; run the kubespray phase or set kubeconfig")
    settings = client.Configuration()
    settings.connection_pool_maxsize = 16  # the widest fan-out below (pods created / logs read side by side)
    settings.retries = 0  # gpuforge decides what to retry
    return config.new_client_from_config(config_file=str(kubeconfig), client_configuration=settings)


@dataclass(frozen=True)
class NodeState:
    name: str
    ready: bool
    kubelet_version: str
    allocatable_gpus: int
    unschedulable: bool
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    taints: list[str] = field(default_factory=list)


def node_fields(node: dict[str, Any]) -> dict[str, Any]:
    """A node as the API server sends it (JSON) -> the fields of NodeState: the one mapping of a node."""
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    taints = [
        f"{t['key']}={t['value']}:{t['effect']}" if t.get("value") else f"{t['key']}:{t['effect']}"
        for t in spec.get("taints") or []
    ]
    return {
        "name": meta["name"],
        "ready": conditions.get("Ready") == "True",
        "kubelet_version": ((status.get("nodeInfo") or {}).get("kubeletVersion") or "").lstrip("v"),
        "allocatable_gpus": int((status.get("allocatable") or {}).get(GPU, "0")),
        "unschedulable": bool(spec.get("unschedulable")),
        "labels": dict(meta.get("labels") or {}),
        "annotations": dict(meta.get("annotations") or {}),
        "taints": taints,
    }


def list_node_fields(kubeconfig: Path) -> list[dict[str, Any]]:
    """Every node in one list call, as node_fields, read from the raw JSON: building the client's typed models
    for a thousand nodes costs more than the call itself."""
    with api_client(kubeconfig) as api:
        resp = client.CoreV1Api(api).list_node(_preload_content=False)
        return [node_fields(item) for item in _items(resp)]


def list_nodes(kubeconfig: Path) -> dict[str, NodeState]:
    """Every node, in one list call."""
    return {fields["name"]: NodeState(**fields) for fields in list_node_fields(kubeconfig)}


def wait_for(
    description: str,
    probe: Callable[[], tuple[bool, str]],
    timeout_s: float,
    *,
    interval_s: float = 1.0,
    log: Callable[[str], None] | None = None,
) -> str:
    """Call `probe` until it reports done; `probe` returns (done, detail of what is missing or reached).

    Transient API errors (connection refused during a restart, 5xx) count as "not yet".
    """
    deadline = time.monotonic() + timeout_s
    detail = "not checked yet"
    last_logged = ""
    while True:
        try:
            done, detail = probe()
        except (ApiException, HTTPError, OSError) as exc:
            if not is_transient_error(exc):
                raise
            done, detail = False, f"API not answering ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        if done:
            return detail
        if log and detail != last_logged:
            log(f"waiting for {description}: {detail}")
            last_logged = detail
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout_s:.0f}s waiting for {description}: {detail}")
        time.sleep(interval_s)


def nodes_ready_probe(kubeconfig: Path, names: list[str], version: str) -> Callable[[], tuple[bool, str]]:
    def probe() -> tuple[bool, str]:
        nodes = list_nodes(kubeconfig)
        missing = [n for n in names if n not in nodes]
        not_ready = [n for n in names if n in nodes and not nodes[n].ready]
        wrong = [
            f"{n} at {nodes[n].kubelet_version}" for n in names if n in nodes and nodes[n].kubelet_version != version
        ]
        problems = []
        if missing:
            problems.append(f"not registered: {', '.join(missing)}")
        if not_ready:
            problems.append(f"not Ready: {', '.join(not_ready)}")
        if wrong:
            problems.append(f"not at {version}: {', '.join(wrong)}")
        return (not problems, "; ".join(problems) or f"{len(names)} nodes Ready at {version}")

    return probe


class ClusterUnreachable(RuntimeError):
    """The cluster's API server could not be read, so whether its nodes converged is unknown."""


def nodes_converged(kubeconfig: Path, names: list[str], version: str) -> bool:
    """Every named node is registered, Ready and at `version`. No kubeconfig yet, or an API server that has no
    nodes to list (404), is "not converged". An API server that does not answer (after the transient retries) or
    refuses the request raises ClusterUnreachable: a cluster that may be fine, only unreachable from here, must not
    get a full Kubespray run nobody asked for."""
    if not Path(kubeconfig).exists():
        return False
    try:
        done, _ = retry_transient(nodes_ready_probe(kubeconfig, names, version), attempts=3)
    except ApiException as exc:
        if exc.status == 404:
            return False
        what = f"refused to list nodes ({exc.status} {exc.reason})"
    except (HTTPError, OSError) as exc:
        what = f"did not answer ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    else:
        return done
    raise ClusterUnreachable(
        f"cannot tell whether the nodes converged: the Kubernetes API server of {kubeconfig} {what}. Bring it back "
        "and run again, or re-run Kubespray on purpose with --force-phase kubespray"
    )


def get_custom(kubeconfig: Path, group: str, version: str, plural: str, name: str) -> dict[str, Any] | None:
    """A cluster-scoped custom resource, or None when it (or its CRD) does not exist (transient errors retried)."""
    return retry_transient(lambda: _get_custom_once(kubeconfig, group, version, plural, name))


def _get_custom_once(kubeconfig: Path, group: str, version: str, plural: str, name: str) -> dict[str, Any] | None:
    with api_client(kubeconfig) as api:
        try:
            return client.CustomObjectsApi(api).get_cluster_custom_object(group, version, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


def list_custom(kubeconfig: Path, group: str, version: str, plural: str, namespace: str | None = None) -> list[dict]:
    """Custom resources of one kind ([] when the CRD does not exist); transient errors retried."""
    return retry_transient(lambda: _list_custom_once(kubeconfig, group, version, plural, namespace))


def _list_custom_once(kubeconfig: Path, group: str, version: str, plural: str, namespace: str | None) -> list[dict]:
    with api_client(kubeconfig) as api:
        custom = client.CustomObjectsApi(api)
        try:
            if namespace:
                return custom.list_namespaced_custom_object(group, version, namespace, plural)["items"]
            return custom.list_cluster_custom_object(group, version, plural)["items"]
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise


class KubernetesApiError(RuntimeError):
    """The API server refused or failed a request: what gpuforge asked, then the server's own words."""


def api_error(what: str, exc: ApiException) -> KubernetesApiError:
    """`exc` in one line: what was asked, the HTTP status, and the message of the API server's Status body (the
    client's own text is the response headers and a traceback)."""
    try:
        message = json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = str(exc.body or "").strip()[:300]
    text = f"Kubernetes API server: {what}: {exc.status} {exc.reason}"
    return KubernetesApiError(f"{text}: {message}" if message else text)


def apply(kubeconfig: Path, manifest: dict[str, Any]) -> None:
    """Server-side apply one object (create or update), owned by the field manager `gpuforge`.

    Transient API errors (a restarting API server) are retried with backoff; the last one is raised as a
    KubernetesApiError naming the object."""
    meta = manifest["metadata"]
    try:
        retry_transient(lambda: _apply_once(kubeconfig, manifest))
    except ApiException as exc:
        where = f" in namespace {meta['namespace']}" if meta.get("namespace") else ""
        raise api_error(f"server-side apply of {manifest['kind']} {meta['name']}{where}", exc) from None


def _apply_once(kubeconfig: Path, manifest: dict[str, Any]) -> None:
    with api_client(kubeconfig) as api:
        dyn = DynamicClient(api)
        resource = dyn.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
        dyn.server_side_apply(
            resource,
            body=manifest,
            name=manifest["metadata"]["name"],
            namespace=manifest["metadata"].get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )


def ensure_namespace(kubeconfig: Path, name: str, labels: dict[str, str] | None = None) -> None:
    apply(kubeconfig, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}})


def config_map(name: str, namespace: str, data: dict[str, str], labels: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "data": data,
    }


def annotate_node(kubeconfig: Path, name: str, annotations: dict[str, str | None]) -> None:
    """Merge-patch node annotations (None removes one)."""
    with api_client(kubeconfig) as api:
        client.CoreV1Api(api).patch_node(name, {"metadata": {"annotations": annotations}})


# ---------------------------------------------------------------------------------------- CUDA smoke pods


def smoke_pod(name: str, node: str, image: str, gpus: int = 1) -> dict[str, Any]:
    """A pod pinned to `node` through the scheduler (nodeSelector, not nodeName, so GPU accounting applies)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "gpuforge-cuda-smoke", "gpuforge.io/node": node},
        },
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"kubernetes.io/hostname": node} if node else {},
            "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "cuda-smoke", "image": image, "resources": {"limits": {GPU: str(gpus)}}}],
        },
    }


def run_pods_to_completion(
    core: client.CoreV1Api,
    namespace: str,
    pods: list[dict[str, Any]],
    timeout_s: float,
    unschedulable_grace_s: float = 30,
    on_done: Callable[[client.V1Pod], None] | None = None,
    refusal_expected: frozenset[str] = frozenset(),
    refusal_wait_s: float = 60,
) -> dict[str, client.V1Pod]:
    """Create all pods at once and follow the namespace with one watch until each pod is settled: terminal, or,
    for the pods named in `refusal_expected`, given the scheduler's verdict (refused, or bound to a node).

    A pod the scheduler keeps refusing for `unschedulable_grace_s` counts as done too (a verdict, not a reason
    to wait out the timeout); a refusal that clears sooner (a node still settling) is waited for. A pod whose
    refusal is expected gets `refusal_wait_s` for the scheduler's verdict, then is settled as it is. `on_done` is
    called with each pod as it is settled (e.g. to read its log while the others still run).
    The watch resumes from the last resourceVersion it saw (no pod is sent twice); only when the server has
    compacted past it (410) is the namespace listed again.
    """
    from kubernetes import watch

    with ThreadPoolExecutor(max_workers=16) as pool:  # all at once: 64 nodes cost about what 1 does
        list(pool.map(lambda pod: core.create_namespaced_pod(namespace, pod), pods))
    names = {p["metadata"]["name"] for p in pods}
    latest: dict[str, client.V1Pod] = {}
    final: dict[str, client.V1Pod] = {}

    def seen(pod: client.V1Pod) -> None:
        name = pod.metadata.name
        if name not in names or name in final:
            return
        latest[name] = pod
        if name in refusal_expected:
            done = bool(pod.spec.node_name) or _unschedulable_for(pod) is not None
        else:
            done = pod.status.phase in ("Succeeded", "Failed")
        if done:
            final[name] = pod
            if on_done:
                on_done(pod)

    started = time.monotonic()
    deadline = started + timeout_s
    resource_version = None
    while names - final.keys() and time.monotonic() < deadline:
        try:
            if resource_version is None:
                listed = core.list_namespaced_pod(namespace)
                for pod in listed.items:
                    seen(pod)
                resource_version = listed.metadata.resource_version
            w = watch.Watch()
            window = max(1, min(5, int(deadline - time.monotonic())))  # the grace below is judged between windows
            for event in w.stream(
                core.list_namespaced_pod, namespace, resource_version=resource_version, timeout_seconds=window
            ):
                seen(event["object"])
                if not names - final.keys():
                    w.stop()
            resource_version = w.resource_version
        except (ApiException, HTTPError, OSError) as exc:
            if isinstance(exc, ApiException) and exc.status == 410:  # compacted past our resourceVersion
                resource_version = None
                continue
            if not is_transient_error(exc):
                raise
            resource_version = None
            time.sleep(1)
        for name in names - final.keys():
            refused_s = _unschedulable_for(latest[name]) if name in latest else None
            no_verdict = name in refusal_expected and time.monotonic() - started >= refusal_wait_s
            if name in latest and (no_verdict or (refused_s is not None and refused_s >= unschedulable_grace_s)):
                final[name] = latest[name]
                if on_done:
                    on_done(latest[name])
    for name in names - final.keys():
        seen_last = core.read_namespaced_pod(name, namespace)
        final[name] = seen_last
        if on_done:
            on_done(seen_last)
    return final


def _unschedulable_for(pod: client.V1Pod) -> float | None:
    """Seconds the scheduler has been refusing the pod (None when it is not refused)."""
    from datetime import UTC, datetime

    for c in pod.status.conditions or []:
        if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
            since = pod.metadata.creation_timestamp or c.last_transition_time
            return (datetime.now(UTC) - since).total_seconds() if since else 0.0
    return None


def cluster_checks(state: DesiredState, kubeconfig: Path, nodes: dict[str, NodeState]) -> list[CheckResult]:
    """Every node Ready; the GPU Operator's ClusterPolicy ready, allocatable GPUs as expected, its pods up."""
    results = []
    for node in state.nodes:
        live = nodes.get(node.name)
        ok = bool(live and live.ready)
        results.append(
            CheckResult(
                "node-ready",
                node.name,
                PASS if ok else FAIL,
                "Ready" if ok else ("not registered" if live is None else "not Ready"),
            )
        )
    if state.config.enabled("gpu-operator"):
        policy = get_custom(kubeconfig, *checks.CLUSTER_POLICY_API, checks.CLUSTER_POLICY)
        rows, _ = checks.gpu_node_rows(state.expected_gpus(), nodes, policy)
        results.append(
            CheckResult(
                "cluster-policy",
                checks.CLUSTER_POLICY,
                PASS if checks.cluster_policy_ready(policy) else FAIL,
                f"state {checks.cluster_policy_state(policy) or 'missing'}",
            )
        )
        for row in rows:
            results.append(
                CheckResult(
                    "gpu-allocatable",
                    row["node"],
                    PASS if row["result"] == "ok" else FAIL,
                    f"{row['allocatable']} allocatable, expected {row['expected']}"
                    if row["result"] == "ok"
                    else row["result"],
                )
            )
        namespace = state.namespace(GPU_OPERATOR_RELEASE)
        bad = [
            f"{p.metadata.name} {p.status.phase}"
            for p in list_pods(kubeconfig, namespace)
            if p.status.phase not in ("Running", "Succeeded")
        ]
        results.append(
            CheckResult(
                "gpu-operator-pods", namespace, FAIL if bad else PASS, ", ".join(bad) or "all Running/Succeeded"
            )
        )
    return results


@task(name="cuda-smoke", cache_policy=NO_CACHE)
def cuda_smoke(
    config: Config, kubeconfig: Path, nodes: dict[str, NodeState], expected: dict[str, int], keep: bool
) -> list[CheckResult]:
    """A CUDA pod on every GPU node with a free GPU, all at once, and an oversized pod that must stay Pending.

    GPUs a Slurm NodeSet (or anything else) holds cannot take a smoke pod: such a node is skipped, naming who
    holds them. Passed pods are removed, failed ones kept with their events; the namespace goes unless `keep`.
    One API client serves every call (a new one costs a kubeconfig parse and a TLS handshake)."""
    with api_client(kubeconfig) as api:
        core = client.CoreV1Api(api)
        held = gpus_held(core)
        results, free = [], []
        for node in expected:
            if node not in nodes:
                continue
            if nodes[node].allocatable_gpus - sum(held.get(node, {}).values()) >= 1:
                free.append(node)
            else:
                holders = ", ".join(held.get(node, {})) or "nobody (0 allocatable)"
                results.append(CheckResult("cuda-smoke", node, SKIP, f"no free GPU: held by {holders}"))
        if not free:
            return results
        image = config.validation.cuda_image
        namespace = _scratch_namespace(core, "validate")
        # More GPUs than any node has, so the scheduler must refuse it everywhere; judged in the same watch as
        # the others, as soon as the scheduler says so.
        too_many = max(expected.values()) + 1
        oversized = smoke_pod("cuda-oversized", "", image, too_many)
        with ThreadPoolExecutor(max_workers=16) as pool:
            reading: dict[str, Future[str]] = {}

            def read_log(pod: client.V1Pod) -> None:  # as soon as it ends, while the other pods still run
                if pod.metadata.name != "cuda-oversized":
                    reading[pod.metadata.name] = pool.submit(read_pod_log, core, namespace, pod.metadata.name)

            pods = [smoke_pod(f"cuda-smoke-{node}", node, image) for node in free]
            final = run_pods_to_completion(
                core,
                namespace,
                [*pods, oversized],
                config.timeouts.validate_,
                on_done=read_log,
                refusal_expected=frozenset({"cuda-oversized"}),
            )
            logs = {name: future.result() for name, future in reading.items()}
        passed = []
        for node in free:
            name = f"cuda-smoke-{node}"
            result = _smoke_verdict(core, namespace, node, final[name], logs[name])
            results.append(result)
            if result.result == PASS:
                passed.append(name)
        refused, why = _refusal(final["cuda-oversized"])
        results.append(
            CheckResult(
                "gpu-scheduling",
                f"{too_many} GPUs",
                PASS if refused else FAIL,
                f"stays Pending: {why}" if refused else f"should be unschedulable but {why}",
            )
        )
        if len(passed) == len(free) and not keep:
            _delete_namespace(core, namespace)  # its pods go with it
        else:
            # the failed ones (or all, with `keep`) stay for a look; the oversized pod would stay Pending for ever
            _delete_pods(core, namespace, ["cuda-oversized", *([] if keep else passed)])
    return results


def _refusal(pod: client.V1Pod) -> tuple[bool, str]:
    """The scheduler's verdict on the oversized pod: (True, its message) when refused as unschedulable."""
    if pod.spec.node_name:
        return False, f"scheduled onto {pod.spec.node_name}"
    for cond in pod.status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
            return True, cond.message or "Unschedulable"
    return False, "the scheduler gave no verdict in time"


def revalidate_with_smoke_pod(config: Config, kubeconfig: Path, node: str) -> tuple[bool, str]:
    """cuda_smoke's pod on one node, tolerating the cordon (a node being returned to service is still cordoned)."""
    name = f"cuda-smoke-{node}"
    pod = smoke_pod(name, node, config.validation.cuda_image)
    pod["spec"]["tolerations"].append({"key": UNSCHEDULABLE_TAINT, "operator": "Exists", "effect": "NoSchedule"})
    with api_client(kubeconfig) as api:
        core = client.CoreV1Api(api)
        namespace = _scratch_namespace(core, "release")
        try:
            final = run_pods_to_completion(core, namespace, [pod], config.timeouts.validate_)[name]
            result = _smoke_verdict(core, namespace, node, final, read_pod_log(core, namespace, name))
        finally:
            _delete_namespace(core, namespace)
    return result.result == PASS, result.detail


def _scratch_namespace(core: client.CoreV1Api, purpose: str) -> str:
    """A fresh namespace of gpuforge's for one run's pods (a random suffix: runs never share one)."""
    namespace = f"gpuforge-{purpose}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace, "labels": {"app.kubernetes.io/managed-by": "gpuforge"}}})
    return namespace


def _smoke_verdict(core: client.CoreV1Api, namespace: str, node: str, pod: client.V1Pod, log: str) -> CheckResult:
    """A finished smoke pod judged by its phase and log; a failed one carries its events."""
    events = []
    if pod.status.phase != "Succeeded":
        found = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod.metadata.name}")
        events = [f"{e.reason}: {e.message}" for e in found.items]
    return validation.smoke_result(node, pod.status.phase, log, events)


def gpus_held(core: client.CoreV1Api) -> dict[str, dict[str, int]]:
    """Node -> {namespace/pod: GPUs} for every pod that holds GPUs (bound, not finished), in one list call.

    The server leaves out finished and unbound pods, and the answer is read as plain JSON: typed models for
    every pod in the cluster would cost more than the call."""

    resp = core.list_pod_for_all_namespaces(
        field_selector="spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed", _preload_content=False
    )
    held: dict[str, dict[str, int]] = {}
    for pod in _items(resp):
        containers = (pod.get("spec") or {}).get("containers") or []
        gpus = sum(int(((c.get("resources") or {}).get("limits") or {}).get(GPU, 0)) for c in containers)
        if gpus:
            meta = pod["metadata"]
            held.setdefault(pod["spec"]["nodeName"], {})[f"{meta['namespace']}/{meta['name']}"] = gpus
    return held


def read_pod_log(core: client.CoreV1Api, namespace: str, name: str, attempts: int = 24, pause_s: float = 0.25) -> str:
    """The pod's last 200 log lines through an open client (a new client costs a kubeconfig parse and a TLS
    handshake, ~20 ms here).
    A container that just finished may not serve its log for a moment (the kubelet answers 400/404), so it is
    asked again every `pause_s` for up to attempts x pause_s."""
    for attempt in range(attempts):
        try:
            return core.read_namespaced_pod_log(name, namespace, tail_lines=200) or ""
        except ApiException as exc:
            if attempt == attempts - 1 or exc.status not in (400, 404, 500, 502, 503):
                return f"(no log: {exc.reason}: {(exc.body or '')[:200]})"
            time.sleep(pause_s)
    return "(no log)"


def _delete_pods(core: client.CoreV1Api, namespace: str, names: list[str]) -> None:
    for name in names:
        try:
            core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _delete_namespace(core: client.CoreV1Api, name: str) -> None:
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise


def list_pods(kubeconfig: Path, namespace: str) -> list[client.V1Pod]:
    with api_client(kubeconfig) as api:
        return client.CoreV1Api(api).list_namespaced_pod(namespace).items


def pod_phase(kubeconfig: Path, namespace: str, name: str) -> str | None:
    """The pod's phase (Pending, Running, ...), None while it does not exist (an operator has yet to make it)."""
    with api_client(kubeconfig) as api:
        try:
            return client.CoreV1Api(api).read_namespaced_pod(name, namespace).status.phase
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


def set_cordon(kubeconfig: Path, node: str, cordon: bool, reason: str | None) -> None:
    """Cordon (with the reason annotation) or uncordon (annotation removed) in one patch."""
    body = {
        "spec": {"unschedulable": True if cordon else None},
        "metadata": {"annotations": {CORDON_ANNOTATION: reason if cordon else None}},
    }
    with api_client(kubeconfig) as api:
        client.CoreV1Api(api).patch_node(node, body)


def slurm_pods(kubeconfig: Path, namespace: str) -> list[dict[str, str]]:
    """slurmd pods (name, hostname, node) in one list call: how Kubernetes nodes map to Slurm nodes."""
    out = []
    for pod in list_pods(kubeconfig, namespace):
        labels = pod.metadata.labels or {}
        if labels.get("app.kubernetes.io/name") == "slurmd":
            out.append({"name": pod.metadata.name, "hostname": pod.spec.hostname or "", "node": pod.spec.node_name})
    return out


# ----------------------------------------------------------------------------- node lifecycle (add / remove)


def evict_pods(
    kubeconfig: Path,
    node: str,
    timeout_s: float,
    log: Callable[[str], None],
    staying: Collection[str] = drain_room.STAYING_OWNERS,
) -> list[str]:
    """Evict every pod on `node` that a drain moves (gpuforge.drain_room.Pod.moves: not static, not owned by a
    `staying` kind; DaemonSet and NodeSet pods by default, as `kubectl drain --ignore-daemonsets` plus Slinky's
    per-node slurmd) through the Eviction API, so PodDisruptionBudgets are respected: an eviction a budget refuses
    (429) is asked again every 2 s until `timeout_s`. Returns the pods still there when time ran out (blocked by a
    budget, named with it)."""
    deadline = time.monotonic() + timeout_s
    with api_client(kubeconfig) as api:
        core = client.CoreV1Api(api)
        blocked: dict[str, str] = {}
        while True:
            on_node = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}", _preload_content=False)
            movable = [p for p in map(_drain_pod, _items(on_node)) if p.moves(staying)]
            blocked = {}
            for pod in movable:
                body = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod.name, namespace=pod.namespace))
                try:
                    core.create_namespaced_pod_eviction(pod.name, pod.namespace, body)
                    log(f"evicted {pod.ref} from {node}")
                except ApiException as exc:
                    if exc.status == 404:
                        continue
                    if exc.status != 429:
                        raise
                    blocked[pod.ref] = (exc.body or exc.reason or "").strip()[:200]
            if not blocked or time.monotonic() >= deadline:
                return [f"{pod} ({why})" for pod, why in blocked.items()]
            time.sleep(2)


def read_drain_room(kubeconfig: Path) -> tuple[list[drain_room.Node], list[drain_room.Pod], list[drain_room.Budget]]:
    """Nodes, pods bound to nodes and PodDisruptionBudgets, as gpuforge.drain_room judges them (three list calls,
    raw JSON)."""
    with api_client(kubeconfig) as api:
        core, policy = client.CoreV1Api(api), client.PolicyV1Api(api)
        raw_nodes = _items(core.list_node(_preload_content=False))
        raw_pods = _items(core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=", _preload_content=False))
        raw_budgets = _items(policy.list_pod_disruption_budget_for_all_namespaces(_preload_content=False))
    nodes = []
    for item in raw_nodes:
        fields, spec, status = node_fields(item), item.get("spec") or {}, item.get("status") or {}
        allocatable = {k: quantity(v) for k, v in (status.get("allocatable") or {}).items()}
        schedulable = not fields["unschedulable"]
        taints = tuple(spec.get("taints") or ())
        nodes.append(
            drain_room.Node(fields["name"], fields["ready"], schedulable, allocatable, fields["labels"], taints)
        )
    budgets = []
    for item in raw_budgets:
        meta, spec, status = item["metadata"], item.get("spec") or {}, item.get("status") or {}
        allowed = int(status.get("disruptionsAllowed") or 0)
        budgets.append(drain_room.Budget(meta["namespace"], meta["name"], spec.get("selector"), allowed))
    return nodes, [_drain_pod(p) for p in raw_pods], budgets


def _items(response) -> list[dict[str, Any]]:
    """The items of a list call made with `_preload_content=False` (raw JSON, no typed models)."""
    return json.loads(response.data).get("items") or []


def _drain_pod(pod: dict[str, Any]) -> drain_room.Pod:
    """A pod as the API server sends it (JSON) -> what a drain and the scheduler look at."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    requests: dict[str, float] = {}
    for container in spec.get("containers") or []:
        for resource, amount in ((container.get("resources") or {}).get("requests") or {}).items():
            requests[resource] = requests.get(resource, 0.0) + quantity(amount)
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    owner = next((r.get("kind", "") for r in meta.get("ownerReferences") or [] if r.get("controller")), "")
    return drain_room.Pod(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        node=spec.get("nodeName") or "",
        requests=requests,
        labels=dict(meta.get("labels") or {}),
        node_selector=dict(spec.get("nodeSelector") or {}),
        node_affinity=tuple(tuple(t.get("matchExpressions") or ()) for t in required.get("nodeSelectorTerms") or []),
        tolerations=tuple(spec.get("tolerations") or ()),
        owner_kind=owner,
        finished=status.get("phase") in ("Succeeded", "Failed"),
        mirror="kubernetes.io/config.mirror" in (meta.get("annotations") or {}),
    )


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("250m", "1Gi", "8") as a number: cores for CPU, bytes for memory, counts."""
    return float(parse_quantity(value))


def delete_node(kubeconfig: Path, node: str) -> bool:
    """Delete the Node object; False when it was already gone."""
    with api_client(kubeconfig) as api:
        try:
            client.CoreV1Api(api).delete_node(node)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise


# --- upgrade plan: the live versions it compares with the pins (read-only) ---


def server_version(kubeconfig: Path) -> str:
    """The API server's gitVersion (e.g. v1.35.4)."""
    with api_client(kubeconfig) as api:
        return client.VersionApi(api).get_code().git_version


def list_crds(kubeconfig: Path) -> list[dict[str, Any]]:
    """Every CustomResourceDefinition as the API server returns it (plain JSON: served/storage versions, schemas,
    status.storedVersions), in one list call."""

    with api_client(kubeconfig) as api:
        resp = client.ApiextensionsV1Api(api).list_custom_resource_definition(_preload_content=False)
        return _items(resp)


def readyz(kubeconfig: Path) -> tuple[bool, str]:
    """The API server's `/readyz?verbose`: whether it is ready (HTTP 200), and its check list (`[+]etcd ok`, ...)."""
    with api_client(kubeconfig) as api:
        request = api.param_serialize(
            "GET", "/readyz", query_params=[("verbose", "true")], auth_settings=["BearerToken"]
        )
        resp = api.call_api(*request)
        return resp.status == 200, resp.read().decode(errors="replace")
