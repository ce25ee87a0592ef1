"""DCGM-exporter simulator: one process serving one scrape target per GPU node, with fault injection.

Run as a lab daemon (:class:`DcgmSim` does this)::

    python -m lab.dcgm_sim serve --state FILE --listen 127.0.0.1:PORT     # PORT 0 = pick one, logged

It listens on loopback or a lab (198.51.100.0/24) address only, never 0.0.0.0, and logs
``dcgm-sim listening on 127.0.0.1:NNNNN``. A single-threaded asyncio HTTP/1.1 server (keep-alive) serves
every node, so 1,024 nodes x 8 GPUs is one process and one port.

Endpoints
---------
``GET /node/<node>/metrics``
    The node's dcgm-exporter page: ``# HELP``/``# TYPE`` and one series per GPU for every metric in
    :data:`METRICS`, with exactly dcgm-exporter's labels ``gpu``, ``UUID``, ``pci_bus_id``, ``device``
    (``nvidiaN``), ``modelName``, the node name as ``hostname`` -- or ``Hostname`` while the exporter version set
    by the ``exporter`` action is older than 4.8.3 (:func:`node_label_of`) -- ``DCGM_FI_DRIVER_VERSION``, plus
    ``err_code``
    and ``err_msg`` on ``DCGM_FI_DEV_XID_ERRORS``. A stopped node answers ``503`` (Prometheus: ``up == 0``,
    its series go stale); an unknown node ``404``.
``GET /nodes``, ``GET /faults``, ``GET /health``
    JSON node list, JSON fault state, ``OK``.
``POST /faults``
    JSON object or list of objects, each with ``action``:
    ``{"action": "set", "node": N, "gpu": I, "metric": "GPU_TEMP", "value": 95}`` (``metric`` with or
    without the ``DCGM_FI_DEV_`` prefix), ``{"action": "remove_gpu"|"restore_gpu", "node": N, "gpu": I}``,
    ``{"action": "stop_node"|"start_node", "node": N}``, ``{"action": "reset"}`` (all faults cleared, all
    nodes started), ``{"action": "configure", "nodes": {name: [gpu_count, model]}}``, ``{"action": "exporter",
    "version": TAG}`` (the dcgm-exporter image tag the GPU Operator deploys, from its ClusterPolicy: the lab
    reconciler sends it; it decides the node label's spelling and is kept by ``reset``).

The CLI does the same: ``python -m lab.dcgm_sim set --url URL NODE GPU METRIC=VALUE ...``, ``remove-gpu
--url URL NODE GPU``, ``restore-gpu``, ``stop-node --url URL NODE``, ``start-node``, ``reset --url URL``
(``--url`` defaults to ``$DCGM_SIM_URL``). Faults are kept in the state file, so a restart keeps them.

Values: healthy, plausible idle values per model (:data:`MODELS`); counters
(``TOTAL_ENERGY_CONSUMPTION``) grow with power x time. ``FB_FREE`` follows ``FB_USED`` unless set itself.
PCI bus ids follow a DGX H100, as do the fake PCI devices of :mod:`lab.sshhosts`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from lab import procs
from lab.sshhosts import LAB_SUBNET, gpu_pci_address

DRIVER_VERSION = "550.54.15"
PREFIX = "DCGM_FI_DEV_"

# name (without DCGM_FI_DEV_), Prometheus type, help text (as in dcgm-exporter's counters CSVs)
METRICS: list[tuple[str, str, str]] = [
    ("SM_CLOCK", "gauge", "SM clock frequency (in MHz)."),
    ("MEM_CLOCK", "gauge", "Memory clock frequency (in MHz)."),
    ("MEMORY_TEMP", "gauge", "Memory temperature (in C)."),
    ("GPU_TEMP", "gauge", "GPU temperature (in C)."),
    ("POWER_USAGE", "gauge", "Power draw (in W)."),
    ("TOTAL_ENERGY_CONSUMPTION", "counter", "Total energy consumption since boot (in mJ)."),
    ("PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries."),
    ("GPU_UTIL", "gauge", "GPU utilization (in %)."),
    ("MEM_COPY_UTIL", "gauge", "Memory utilization (in %)."),
    ("ENC_UTIL", "gauge", "Encoder utilization (in %)."),
    ("DEC_UTIL", "gauge", "Decoder utilization (in %)."),
    ("XID_ERRORS", "gauge", "Value of the last XID error encountered."),
    ("FB_FREE", "gauge", "Framebuffer memory free (in MiB)."),
    ("FB_USED", "gauge", "Framebuffer memory used (in MiB)."),
    ("FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB)."),
    ("NVLINK_BANDWIDTH_TOTAL", "counter", "Total number of NVLink bandwidth counters for all lanes."),
    ("UNCORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for uncorrectable errors"),
    ("CORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for correctable errors"),
    ("ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed"),
    ("ROW_REMAP_PENDING", "gauge", "Whether remapping of rows is pending"),
    ("ECC_SBE_VOL_TOTAL", "counter", "Total number of single-bit volatile ECC errors."),
    ("ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors."),
    ("CLOCK_THROTTLE_REASONS", "gauge", "Current clock throttle reasons (bitmask)."),
    ("NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink flow-control CRC errors."),
    ("NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink data CRC errors."),
    ("NVLINK_REPLAY_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink retries."),
    ("NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink recovery errors."),
]
METRIC_NAMES = {m[0] for m in METRICS}

# modelName -> framebuffer MiB, reserved MiB, max SM clock, memory clock, idle power W
MODELS: dict[str, tuple[int, int, int, int, float]] = {
    "NVIDIA H100 80GB HBM3": (81559, 556, 1980, 2619, 72.0),
    "NVIDIA H200": (143771, 586, 1980, 3201, 76.0),
    "NVIDIA A100-SXM4-80GB": (81920, 617, 1410, 1593, 62.0),
    "NVIDIA A100-SXM4-40GB": (40960, 525, 1410, 1215, 55.0),
    "NVIDIA L40S": (46068, 519, 2520, 9001, 34.0),
    "Tesla T4": (15360, 257, 1590, 5000, 27.0),
}
DEFAULT_MODEL = "NVIDIA H100 80GB HBM3"

XID_MESSAGES = {
    0: "No Error",
    13: "Graphics Engine Exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "Preemptive cleanup, due to previous errors",
    48: "Double Bit ECC Error",
    61: "Internal micro-controller breakpoint/warning",
    62: "Internal micro-controller halt",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapper recording failure",
    74: "NVLink Error",
    79: "GPU has fallen off the bus",
    92: "High single-bit ECC error rate",
    94: "Contained ECC error",
    95: "Uncontained ECC error",
    119: "GSP RPC Timeout",
    120: "GSP Error",
}

_NODE_PATH = re.compile(r"^/node/([^/]+)/metrics/?$")


def metric_key(metric: str) -> str:
    """'GPU_TEMP', 'gpu_temp' or 'DCGM_FI_DEV_GPU_TEMP' -> 'GPU_TEMP'; ValueError for unknown ones."""
    key = metric.strip().upper()
    if key.startswith(PREFIX):
        key = key[len(PREFIX) :]
    if key not in METRIC_NAMES:
        raise ValueError(f"unknown DCGM metric {metric!r}; known: {', '.join(sorted(METRIC_NAMES))}")
    return key


def gpu_uuid(node: str, gpu: int) -> str:
    return "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node}.gpu{gpu}.gpuforge-lab"))


def check_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"listen address {listen!r} must be IP:PORT") from exc
    if not (addr.is_loopback or addr in LAB_SUBNET):
        raise ValueError(f"refusing to listen on {host}: only loopback or lab addresses ({LAB_SUBNET})")
    return str(addr), int(port)


# dcgm-exporter renamed its node label `Hostname` to `hostname` in its 4.8.3 release ("Rename the Hostname label
# to hostname", #655; shipped as 4.6.0-4.8.3 with GPU Operator v26.7.0; v26.3.3 ships 4.5.3-4.8.2).
LOWER_CASE_HOSTNAME_SINCE = (4, 8, 3)
_EXPORTER_TAG = re.compile(r"^\d+\.\d+\.\d+-(\d+)\.(\d+)\.(\d+)")  # <DCGM>-<exporter>[-variant]


def node_label_of(exporter_tag: str) -> str:
    """The node label the dcgm-exporter of image tag `exporter_tag` writes; an unknown or empty tag gets the
    current spelling."""
    found = _EXPORTER_TAG.match(exporter_tag or "")
    if found and tuple(int(part) for part in found.groups()) < LOWER_CASE_HOSTNAME_SINCE:
        return "Hostname"
    return "hostname"


# ----- simulator state -------------------------------------------------------------------------------
class Sim:
    """Nodes, faults and rendering; owned by the server process."""

    def __init__(self, state_file: Path):
        self.state_file = state_file
        self.t0 = time.time()
        self.nodes: dict[str, tuple[int, str]] = {}
        self.stopped: set[str] = set()
        self.removed: dict[str, set[int]] = {}
        self.values: dict[str, dict[int, dict[str, float]]] = {}
        self.exporter = ""  # the dcgm-exporter image tag the operator deploys ("" until told)
        self._labels: dict[tuple[str, int], str] = {}
        self._templates: dict[str, tuple[str, list[tuple[str, float, float]], str]] = {}
        if state_file.exists():
            self._from_json(json.loads(state_file.read_text()))

    def _from_json(self, data: dict) -> None:
        self.nodes = {n: (int(v[0]), str(v[1])) for n, v in data.get("nodes", {}).items()}
        self.exporter = str(data.get("exporter") or "")
        f = data.get("faults", {})
        self.stopped = set(f.get("stopped", []))
        self.removed = {n: set(g) for n, g in f.get("removed", {}).items()}
        self.values = {
            n: {int(g): {k: float(v) for k, v in mv.items()} for g, mv in gv.items()}
            for n, gv in f.get("values", {}).items()
        }
        self._labels.clear()

    def to_json(self) -> dict:
        return {
            "nodes": {n: [c, m] for n, (c, m) in self.nodes.items()},
            "exporter": self.exporter,
            "faults": {
                "stopped": sorted(self.stopped),
                "removed": {n: sorted(g) for n, g in self.removed.items() if g},
                "values": {n: {str(g): mv for g, mv in gv.items()} for n, gv in self.values.items()},
            },
        }

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(self.state_file)

    def _node(self, node: str) -> tuple[int, str]:
        if node not in self.nodes:
            raise KeyError(f"unknown node {node!r}")
        return self.nodes[node]

    def _gpu(self, node: str, gpu) -> int:
        count, _ = self._node(node)
        gpu = int(gpu)
        if not 0 <= gpu < count:
            raise KeyError(f"node {node} has no GPU {gpu} (it has {count})")
        return gpu

    def apply(self, fault: dict) -> None:
        self._templates.clear()
        action = fault.get("action")
        if action == "set":
            node, gpu = fault["node"], self._gpu(fault["node"], fault["gpu"])
            self.values.setdefault(node, {}).setdefault(gpu, {})[metric_key(fault["metric"])] = float(fault["value"])
        elif action in ("remove_gpu", "restore_gpu"):
            node, gpu = fault["node"], self._gpu(fault["node"], fault["gpu"])
            gone = self.removed.setdefault(node, set())
            (gone.add if action == "remove_gpu" else gone.discard)(gpu)
        elif action == "stop_node":
            self._node(fault["node"])
            self.stopped.add(fault["node"])
        elif action == "start_node":
            self._node(fault["node"])
            self.stopped.discard(fault["node"])
        elif action == "reset":
            self.stopped.clear()
            self.removed.clear()
            self.values.clear()
        elif action == "configure":
            self.nodes = {n: (int(v[0]), str(v[1] or DEFAULT_MODEL)) for n, v in fault["nodes"].items()}
            for table in (self.removed, self.values):
                for n in list(table):
                    if n not in self.nodes:
                        del table[n]
            self.stopped &= set(self.nodes)
            self._labels.clear()
        elif action == "exporter":
            self.exporter = str(fault["version"])
            self._labels.clear()
        else:
            raise ValueError(f"unknown action {action!r}")

    def _label_str(self, node: str, gpu: int, model: str) -> str:
        key = (node, gpu)
        s = self._labels.get(key)
        if s is None:
            bus = gpu_pci_address(gpu).split(":", 1)[1].upper()
            s = (
                f'gpu="{gpu}",UUID="{gpu_uuid(node, gpu)}",pci_bus_id="00000000:{bus}",device="nvidia{gpu}",'
                f'modelName="{_esc(model)}",{node_label_of(self.exporter)}="{_esc(node)}",'
                f'DCGM_FI_DRIVER_VERSION="{DRIVER_VERSION}"'
            )
            self._labels[key] = s
        return s

    def defaults(self, node: str, gpu: int, model: str, now: float) -> dict[str, float]:
        fb, reserved, sm, mem, power = MODELS.get(model, MODELS[DEFAULT_MODEL])
        power = power + (gpu % 4) * 1.25
        return {
            "SM_CLOCK": float(sm), "MEM_CLOCK": float(mem),
            "MEMORY_TEMP": 38.0 + gpu % 3, "GPU_TEMP": 33.0 + gpu % 4, "POWER_USAGE": power,
            "TOTAL_ENERGY_CONSUMPTION": 4.0e9 + power * 1000.0 * (now - self.t0),  # mJ
            "PCIE_REPLAY_COUNTER": 0.0, "GPU_UTIL": 0.0, "MEM_COPY_UTIL": 0.0, "ENC_UTIL": 0.0,
            "DEC_UTIL": 0.0, "XID_ERRORS": 0.0, "FB_USED": 0.0, "FB_RESERVED": float(reserved),
            "FB_FREE": float(fb - reserved), "NVLINK_BANDWIDTH_TOTAL": 0.0,
            "UNCORRECTABLE_REMAPPED_ROWS": 0.0, "CORRECTABLE_REMAPPED_ROWS": 0.0, "ROW_REMAP_FAILURE": 0.0,
            "ROW_REMAP_PENDING": 0.0, "ECC_SBE_VOL_TOTAL": 0.0, "ECC_DBE_VOL_TOTAL": 0.0,
            "CLOCK_THROTTLE_REASONS": 0.0, "NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL": 0.0,
            "NVLINK_CRC_DATA_ERROR_COUNT_TOTAL": 0.0, "NVLINK_REPLAY_ERROR_COUNT_TOTAL": 0.0,
            "NVLINK_RECOVERY_ERROR_COUNT_TOTAL": 0.0,
        }  # fmt: skip

    def render(self, node: str) -> str:
        """The node's exposition text. Everything but the energy counter is cached until the next fault."""
        tpl = self._templates.get(node)
        if tpl is None:
            tpl = self._templates[node] = self._build(node)
        head, energy_lines, tail = tpl
        elapsed_ms = (time.time() - self.t0) * 1000.0
        lines = [f"{prefix}{int(base + power * elapsed_ms)}\n" for prefix, base, power in energy_lines]
        return head + "".join(lines) + tail

    def _build(self, node: str) -> tuple[str, list[tuple[str, float, float]], str]:
        count, model = self._node(node)
        gone = self.removed.get(node, set())
        overrides = self.values.get(node, {})
        gpus = []
        for g in range(count):
            if g in gone:
                continue
            vals = self.defaults(node, g, model, self.t0)
            ov = overrides.get(g, {})
            if "FB_USED" in ov and "FB_FREE" not in ov:
                vals["FB_FREE"] = max(0.0, vals["FB_FREE"] - ov["FB_USED"])
            vals.update(ov)
            gpus.append((self._label_str(node, g, model), vals, "TOTAL_ENERGY_CONSUMPTION" in ov))
        head: list[str] = []
        tail: list[str] = []
        energy: list[tuple[str, float, float]] = []
        out = head
        for name, mtype, help_ in METRICS:
            full = PREFIX + name
            out.append(f"# HELP {full} {help_}\n# TYPE {full} {mtype}\n")
            for labels, vals, energy_fixed in gpus:
                v = vals[name]
                if name == "TOTAL_ENERGY_CONSUMPTION":
                    # grows with power x time since start, unless a fault pinned it
                    energy.append((f"{full}{{{labels}}} ", v, 0.0 if energy_fixed else vals["POWER_USAGE"]))
                elif name == "XID_ERRORS":
                    code = int(v)
                    msg = XID_MESSAGES.get(code, "Unknown Error")
                    out.append(f'{full}{{{labels},err_code="{code}",err_msg="{msg}"}} {_num(v)}\n')
                else:
                    out.append(f"{full}{{{labels}}} {_num(v)}\n")
            if name == "TOTAL_ENERGY_CONSUMPTION":
                out = tail
        return "".join(head), energy, "".join(tail)


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ----- HTTP server -----------------------------------------------------------------------------------
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def dispatch(sim: Sim, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
    path = path.split("?", 1)[0]
    m = _NODE_PATH.match(path)
    if m and method in ("GET", "HEAD"):
        node = urllib.request.unquote(m.group(1))
        if node not in sim.nodes:
            return 404, "text/plain", f"unknown node {node}\n".encode()
        if node in sim.stopped:
            return 503, "text/plain", f"dcgm-exporter on {node} is stopped (lab fault)\n".encode()
        return 200, "text/plain; version=0.0.4; charset=utf-8", sim.render(node).encode()
    if path == "/health":
        return 200, "text/plain", b"OK\n"
    if path == "/nodes" and method == "GET":
        data = {n: {"gpus": c, "model": mo, "stopped": n in sim.stopped} for n, (c, mo) in sim.nodes.items()}
        return 200, "application/json", json.dumps(data).encode()
    if path == "/faults":
        if method == "GET":
            return 200, "application/json", json.dumps(sim.to_json()["faults"]).encode()
        if method == "POST":
            try:
                req = json.loads(body or b"{}")
                for fault in req if isinstance(req, list) else [req]:
                    sim.apply(fault)
            except (ValueError, KeyError, TypeError) as exc:
                sim.save()
                return 400, "application/json", json.dumps({"error": str(exc).strip('"')}).encode()
            sim.save()
            return 200, "application/json", b'{"ok": true}'
        return 405, "text/plain", b"method not allowed\n"
    return 404, "text/plain", b"not found\n"


async def _handle(sim: Sim, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            parts = line.decode("latin-1").split()
            if len(parts) != 3:
                break
            method, target, version = parts
            headers: dict[str, str] = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length") or 0)
            body = await reader.readexactly(length) if length else b""
            status, ctype, payload = dispatch(sim, method, target, body)
            keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if method == "HEAD" else payload))
            await writer.drain()
            if not keep:
                break
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def _serve(state: Path, listen: str) -> None:
    host, port = check_listen(listen)
    sim = Sim(state)
    server = await asyncio.start_server(lambda r, w: _handle(sim, r, w), host, port, backlog=1024)
    real = server.sockets[0].getsockname()
    print(f"dcgm-sim listening on {real[0]}:{real[1]} nodes={len(sim.nodes)}", flush=True)
    async with server:
        await server.serve_forever()


# ----- Python API ------------------------------------------------------------------------------------
class DcgmSim:
    """The simulator as a lab daemon (``dcgm-sim``) under `workdir`."""

    NAME = "dcgm-sim"

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir).resolve()
        self.state_file = self.workdir / "dcgm-sim-state.json"
        self._meta = self.workdir / "dcgm-sim.json"

    @property
    def url(self) -> str:
        try:
            return json.loads(self._meta.read_text())["url"]
        except FileNotFoundError:
            raise RuntimeError("DCGM simulator is not up") from None

    def up(self, nodes: dict[str, tuple[int, str]], listen_port: int = 0, host: str = "127.0.0.1") -> str:
        """Start (or reconfigure) the simulator for `nodes` {name: (gpu_count, modelName)}; returns its URL."""
        check_listen(f"{host}:{listen_port}")
        cfg = {n: [int(c), str(m or DEFAULT_MODEL)] for n, (c, m) in nodes.items()}
        for n, (c, _) in cfg.items():
            if c < 0 or "/" in n or not n:
                raise ValueError(f"bad node {n!r} / gpu count {c}")
        if procs.is_running(self.workdir, self.NAME):
            self._post({"action": "configure", "nodes": cfg})
            return self.url
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"nodes": cfg, "faults": {}}))
        return self._start(f"{host}:{listen_port}")

    def restart(self) -> str:
        """Stop and start the server on the same address; faults are kept (they live in the state file)."""
        listen = self.url.split("://", 1)[1]
        procs.stop_daemon(self.workdir, self.NAME)
        return self._start(listen)

    def _start(self, listen: str) -> str:
        procs.log_file(self.workdir, self.NAME).unlink(missing_ok=True)
        procs.start_daemon(
            self.workdir,
            self.NAME,
            [sys.executable, "-m", "lab.dcgm_sim", "serve", "--state", str(self.state_file), "--listen", listen],
            env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        line = procs.wait_for_log(self.workdir, self.NAME, "dcgm-sim listening on", timeout=30)
        addr = line.split("listening on ", 1)[1].split()[0]
        url = f"http://{addr}"
        self._meta.write_text(json.dumps({"url": url}))
        return url

    def down(self, purge: bool = False) -> None:
        """Stop the simulator. `purge` also deletes its folder: the state file holds the injected faults."""
        procs.stop_daemon(self.workdir, self.NAME)
        self._meta.unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def running(self) -> bool:
        return procs.is_running(self.workdir, self.NAME)

    def targets(self) -> list[str]:
        """Scrape URLs, one per node: http://HOST:PORT/node/<node>/metrics."""
        base = self.url
        nodes = json.loads(self.state_file.read_text())["nodes"]
        return [f"{base}/node/{n}/metrics" for n in nodes]

    def set_value(self, node: str, gpu: int, metric: str, value: float) -> None:
        self._post({"action": "set", "node": node, "gpu": gpu, "metric": metric, "value": value})

    def remove_gpu(self, node: str, gpu: int) -> None:
        self._post({"action": "remove_gpu", "node": node, "gpu": gpu})

    def restore_gpu(self, node: str, gpu: int) -> None:
        self._post({"action": "restore_gpu", "node": node, "gpu": gpu})

    def stop_node(self, node: str) -> None:
        self._post({"action": "stop_node", "node": node})

    def start_node(self, node: str) -> None:
        self._post({"action": "start_node", "node": node})

    def reset(self) -> None:
        self._post({"action": "reset"})

    def set_exporter(self, version: str) -> None:
        self._post({"action": "exporter", "version": version})

    def scrape(self, node: str) -> str:
        with urllib.request.urlopen(f"{self.url}/node/{node}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def _post(self, payload) -> None:
        post_faults(self.url, payload)


def post_faults(url: str, payload) -> None:
    req = urllib.request.Request(
        url.rstrip("/") + "/faults", data=json.dumps(payload).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        raise ValueError(f"DCGM simulator refused {payload}: {exc.read().decode(errors='replace')}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.dcgm_sim", description="DCGM-exporter simulator")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--state", type=Path, required=True)
    s.add_argument("--listen", default="127.0.0.1:0")

    def with_url(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        c.add_argument("--url", default=os.environ.get("DCGM_SIM_URL"), help="simulator URL ($DCGM_SIM_URL)")
        return c

    c = with_url("set", "NODE GPU METRIC=VALUE ...")
    c.add_argument("node")
    c.add_argument("gpu", type=int)
    c.add_argument("assignments", nargs="+")
    for name in ("remove-gpu", "restore-gpu"):
        c = with_url(name, "NODE GPU")
        c.add_argument("node")
        c.add_argument("gpu", type=int)
    for name in ("stop-node", "start-node"):
        with_url(name, "NODE").add_argument("node")
    with_url("reset", "clear every fault")
    a = p.parse_args(argv)
    if a.cmd == "serve":
        try:
            asyncio.run(_serve(a.state, a.listen))
        except KeyboardInterrupt:
            pass
        return 0
    if not a.url:
        p.error("--url (or $DCGM_SIM_URL) is required")
    if a.cmd == "set":
        faults = []
        for item in a.assignments:
            metric, sep, value = item.partition("=")
            if not sep:
                p.error(f"expected METRIC=VALUE, got {item!r}")
            faults.append({"action": "set", "node": a.node, "gpu": a.gpu, "metric": metric, "value": float(value)})
        payload: object = faults
    elif a.cmd in ("remove-gpu", "restore-gpu"):
        payload = {"action": a.cmd.replace("-", "_"), "node": a.node, "gpu": a.gpu}
    elif a.cmd in ("stop-node", "start-node"):
        payload = {"action": a.cmd.replace("-", "_"), "node": a.node}
    else:
        payload = {"action": "reset"}
    try:
        post_faults(a.url, payload)
    except (ValueError, urllib.error.URLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
