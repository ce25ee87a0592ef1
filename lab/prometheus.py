"""The real Prometheus server (Debian ``prometheus`` 2.42) as a lab daemon.

* Listens on 127.0.0.1 (or a lab address) only: ``--web.listen-address=127.0.0.1:0`` by default, never the
  packaged default 0.0.0.0:9090. The real port is read from this process's own log line
  ``msg="Listening on" address=127.0.0.1:NNNNN`` -- not from probing a port, since with a taken port
  Prometheus dies while another server may answer ``/-/ready``.
* Config ``<workdir>/prometheus.yml``: one job ``gpu-metrics`` with ``honor_labels: true`` and one static
  target per scrape URL; a URL ``http://H:P/node/<node>/metrics`` (the DCGM simulator) gets
  ``instance=<node>`` and ``__metrics_path__=/node/<node>/metrics``, so ``up{job="gpu-metrics",
  instance="<node>"}`` tells per node whether its exporter answers. Targets must be loopback or lab
  addresses. ``scrape_timeout`` = ``scrape_interval`` (Prometheus rejects a timeout above the interval).
* Rule files (``rule_files=[...]``) are evaluated every ``scrape_interval``; ``promtool check config``
  validates config and rules before start when promtool is installed.
* ``--web.enable-lifecycle``: :meth:`PrometheusLab.reload` POSTs ``/-/reload``.
* Timing seen here: ready in < 1 s; the first scraped series ~5-6 s after start (first-scrape delay).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from lab import procs
from lab.sshhosts import LAB_SUBNET

JOB = "gpu-metrics"
_NODE_PATH = re.compile(r"^/node/([^/]+)/metrics/?$")


def _check_host(host: str, what: str) -> str:
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError as exc:
        raise ValueError(f"{what} {host!r} must be an IP address (loopback or lab subnet)") from exc
    if not (addr.is_loopback or addr in LAB_SUBNET):
        raise ValueError(f"{what} {host} is not loopback or in the lab subnet {LAB_SUBNET}")
    return str(addr)


def static_configs(targets: Sequence[str] | Mapping[str, str]) -> list[dict]:
    """Prometheus static_configs for scrape URLs (list, or {instance: url})."""
    items = list(targets.items()) if isinstance(targets, Mapping) else [(None, t) for t in targets]
    out = []
    for instance, url in items:
        u = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if u.scheme not in ("http", "https") or not u.hostname or not u.port:
            raise ValueError(f"scrape target {url!r} must be http://IP:PORT/path")
        _check_host(u.hostname, "scrape target")
        labels: dict[str, str] = {}
        path = u.path or "/metrics"
        if path != "/metrics":
            labels["__metrics_path__"] = path
        m = _NODE_PATH.match(path)
        if instance or m:
            labels["instance"] = instance or urllib.parse.unquote(m.group(1))
        if u.scheme == "https":
            labels["__scheme__"] = "https"
        out.append({"targets": [u.netloc], "labels": labels})
    return out


class PrometheusLab:
    """Prometheus under `workdir` (config, tsdb, log); daemon name ``prometheus``."""

    NAME = "prometheus"

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir).resolve()
        self.config = self.workdir / "prometheus.yml"
        self._meta = self.workdir / "prometheus-lab.json"

    @property
    def url(self) -> str:
        try:
            return json.loads(self._meta.read_text())["url"]
        except (FileNotFoundError, KeyError):
            raise RuntimeError("Prometheus lab is not up") from None

    def up(
        self,
        listen: str = "127.0.0.1:0",
        targets: Sequence[str] | Mapping[str, str] = (),
        scrape_interval: str = "2s",
        rule_files: Sequence[str | Path] = (),
        timeout: float = 30.0,
    ) -> str:
        """Write the config, validate it, start Prometheus; returns its URL. Idempotent: a running server
        gets the new config through a reload instead of a restart."""
        host, _, port = listen.rpartition(":")
        _check_host(host, "listen address")
        int(port)
        self.workdir.mkdir(parents=True, exist_ok=True)
        rules = [str(Path(r).resolve()) for r in rule_files]
        cfg = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": scrape_interval,
            },
            "rule_files": rules,
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "honor_labels": True,
                    "scrape_interval": scrape_interval,
                    "scrape_timeout": scrape_interval,
                    "static_configs": static_configs(targets),
                }
            ],
        }
        # JSON is YAML: no YAML library needed for the config.
        self.config.write_text(json.dumps(cfg, indent=1) + "\n")
        self.check_config()
        if procs.is_running(self.workdir, self.NAME):
            self.reload()
            return self.url
        self._meta.write_text(json.dumps({"listen": listen}))
        return self._start(listen, timeout)

    def check_config(self) -> None:
        promtool = shutil.which("promtool")
        if not promtool:
            return
        proc = subprocess.run(
            [promtool, "check", "config", str(self.config)], capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            raise ValueError(f"promtool rejects {self.config}:\n{proc.stdout}{proc.stderr}")

    def down(self, purge: bool = False) -> None:
        """Stop the server. `purge` also deletes its folder: the TSDB would show the next lab the old samples
        (a fault's XID inside the health window)."""
        procs.stop_daemon(self.workdir, self.NAME, timeout=15)
        self._meta.unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop(self) -> None:
        """Stop the server (fault tests); :meth:`start` brings it back on the same port if it is free."""
        procs.stop_daemon(self.workdir, self.NAME, timeout=15)

    def start(self, timeout: float = 30.0) -> str:
        if procs.is_running(self.workdir, self.NAME):
            return self.url
        meta = json.loads(self._meta.read_text())
        last = meta.get("url")
        if last:
            try:
                return self._start(urllib.parse.urlsplit(last).netloc, timeout)
            except RuntimeError:
                pass  # the port was taken meanwhile: take a new one
        return self._start(meta["listen"], timeout)

    def running(self) -> bool:
        return procs.is_running(self.workdir, self.NAME)

    def reload(self) -> None:
        req = urllib.request.Request(self.url + "/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()

    # ----- HTTP API helpers --------------------------------------------------------------------------
    def api(self, path: str, **params: str) -> dict:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{'?' + q if q else ''}", timeout=15) as resp:
            data = json.loads(resp.read())
        if data.get("status") != "success":
            raise RuntimeError(f"Prometheus API {path}: {data}")
        return data["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; returns the result vector ([{"metric": {...}, "value": [ts, "v"]}, ...])."""
        return self.api("query", query=expr)["result"]

    def target_health(self) -> dict[str, str]:
        """instance -> "up" | "down" | "unknown" for the gpu-metrics job."""
        data = self.api("targets", state="active")
        return {t["labels"].get("instance", t["scrapeUrl"]): t["health"] for t in data["activeTargets"]}

    # ----- internals ---------------------------------------------------------------------------------
    def _start(self, listen: str, timeout: float) -> str:
        log = procs.log_file(self.workdir, self.NAME)
        log.unlink(missing_ok=True)
        procs.start_daemon(
            self.workdir,
            self.NAME,
            [
                "prometheus",
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                "--storage.tsdb.retention.time=1d",
                f"--web.listen-address={listen}",
                "--web.enable-lifecycle",
                "--log.level=info",
            ],
        )
        line = procs.wait_for_log(self.workdir, self.NAME, 'msg="Listening on"', timeout=timeout)
        m = re.search(r"address=(\S+)", line)
        if not m:
            raise RuntimeError(f"cannot read Prometheus' address from {line!r}")
        address = m.group(1).strip('"')
        _check_host(address.rpartition(":")[0], "Prometheus listen address")
        url = f"http://{address}"
        deadline = time.monotonic() + timeout
        while True:
            if not procs.is_running(self.workdir, self.NAME):
                raise RuntimeError(f"prometheus exited:\n{log.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready within {timeout:.0f}s")
            time.sleep(0.1)
        meta = json.loads(self._meta.read_text()) if self._meta.exists() else {"listen": listen}
        meta["url"] = url
        self._meta.write_text(json.dumps(meta))
        return url
