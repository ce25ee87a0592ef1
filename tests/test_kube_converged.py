"""tasks.kube.nodes_converged: "not converged" only when the cluster says so; an API server that cannot be read is
an error, never a reason to re-run Kubespray. Only loopback addresses are used. And the API server's errors in its
own words."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kubernetes.client.rest import ApiException

from tasks.kube import ClusterUnreachable, api_error, nodes_converged

NODE = {
    "metadata": {"name": "cp-1"},
    "spec": {},
    "status": {
        "conditions": [{"type": "Ready", "status": "True"}],
        "nodeInfo": {
            **dict.fromkeys(
                ("architecture", "bootID", "containerRuntimeVersion", "kernelVersion", "kubeProxyVersion"), "x"
            ),
            **dict.fromkeys(("machineID", "operatingSystem", "osImage", "systemUUID"), "x"),
            "kubeletVersion": "v1.33.4",
        },
    },
}


def kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


@pytest.fixture
def api_server():
    """A loopback HTTP server answering GET /api/v1/nodes with (status, body) set by the test."""
    answer = {"status": 200, "body": {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": [NODE]}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = json.dumps(answer["body"]).encode()
            self.send_response(answer["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answer
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_kubeconfig_yet_is_not_converged(tmp_path):
    assert nodes_converged(tmp_path / "missing", ["cp-1"], "1.33.4") is False


def test_an_unreachable_api_server_is_an_error_not_a_kubespray_run(tmp_path):
    path = kubeconfig(tmp_path, f"https://127.0.0.1:{closed_port()}")
    with pytest.raises(ClusterUnreachable, match=r"did not answer .*--force-phase kubespray") as exc:
        nodes_converged(path, ["cp-1"], "1.33.4")
    assert str(path) in str(exc.value) and "cannot tell whether the nodes converged" in str(exc.value)


def test_converged_and_not_as_the_api_server_says(tmp_path, api_server):
    url, answer = api_server
    path = kubeconfig(tmp_path, url)
    assert nodes_converged(path, ["cp-1"], "1.33.4") is True
    assert nodes_converged(path, ["cp-1"], "1.34.0") is False  # another version
    assert nodes_converged(path, ["cp-1", "gpu-1"], "1.33.4") is False  # a node not registered yet
    answer["status"], answer["body"] = 404, {"kind": "Status", "code": 404, "reason": "NotFound"}
    assert nodes_converged(path, ["cp-1"], "1.33.4") is False  # no nodes yet


def test_a_refused_request_is_an_error(tmp_path, api_server):
    url, answer = api_server
    answer["status"], answer["body"] = 403, {"kind": "Status", "code": 403, "reason": "Forbidden"}
    with pytest.raises(ClusterUnreachable, match="refused to list nodes \\(403"):
        nodes_converged(kubeconfig(tmp_path, url), ["cp-1"], "1.33.4")


def test_an_api_error_is_one_line_in_the_api_servers_words_with_what_was_asked():
    timeout = ApiException(status=504, reason="Gateway Timeout")
    timeout.body = json.dumps(
        {"kind": "Status", "message": "Timeout: request did not complete within requested timeout"}
    )
    timeout.headers = {"Audit-Id": "94767e33"}
    text = str(api_error("server-side apply of Namespace gpu-operator", timeout))
    assert text == (
        "Kubernetes API server: server-side apply of Namespace gpu-operator: 504 Gateway Timeout: "
        "Timeout: request did not complete within requested timeout"
    )
    assert "Audit-Id" in str(timeout) and "Audit-Id" not in text  # the client's own text carries the headers
    bare = ApiException(status=502, reason="Bad Gateway")
    assert str(api_error("x", bare)) == "Kubernetes API server: x: 502 Bad Gateway"
