"""The real Prometheus scraping the DCGM simulator: series, fault visibility, target health, rules."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request

import pytest

from lab import procs
from lab.dcgm_sim import DcgmSim
from lab.prometheus import JOB, PrometheusLab, static_configs

pytestmark = pytest.mark.skipif(not shutil.which("prometheus"), reason="needs the prometheus package")

NODES = {"tpm-a": (2, "NVIDIA H100 80GB HBM3"), "tpm-b": (1, "NVIDIA A100-SXM4-80GB")}
INTERVAL = 2.0
RULES = """groups:
- name: gpu
  rules:
  - alert: GpuTooHot
    expr: DCGM_FI_DEV_GPU_TEMP > 85
    labels: {severity: critical}
"""


def wait_for(fn, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("prom")
    sim = DcgmSim(work / "dcgm")
    sim.up(NODES)
    rules = work / "rules.yml"
    rules.write_text(RULES)
    prom = PrometheusLab(work / "prom")
    t0 = time.monotonic()
    try:
        url = prom.up(targets=sim.targets(), scrape_interval="2s", rule_files=[rules])
        ready = time.monotonic() - t0
        wait_for(lambda: len(prom.query("DCGM_FI_DEV_GPU_TEMP")) == 3, 30, 0.2)
        print(f"prometheus {url}: ready {ready:.2f}s, all series {time.monotonic() - t0:.2f}s after start")
        yield sim, prom
    finally:
        prom.down()
        sim.down()


def test_listens_on_loopback_with_the_port_from_its_own_log(stack):
    _sim, prom = stack
    assert prom.url.startswith("http://127.0.0.1:")
    port = prom.url.rsplit(":", 1)[1]
    assert port not in ("0", "9090")
    line = procs.wait_for_log(prom.workdir, PrometheusLab.NAME, 'msg="Listening on"', 1)
    assert f"address=127.0.0.1:{port}" in line
    ss = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
    assert f"127.0.0.1:{port} " in ss
    assert f"0.0.0.0:{port} " not in ss and "*:9090 " not in ss


def test_one_gpu_temp_series_per_configured_gpu(stack):
    _sim, prom = stack
    result = prom.query("DCGM_FI_DEV_GPU_TEMP")
    got = sorted((r["metric"]["hostname"], r["metric"]["gpu"]) for r in result)
    assert got == [("tpm-a", "0"), ("tpm-a", "1"), ("tpm-b", "0")]
    for r in result:
        m = r["metric"]
        assert m["job"] == JOB and m["instance"] == m["hostname"]  # honor_labels, one target per node
        assert m["device"] == f"nvidia{m['gpu']}" and m["UUID"].startswith("GPU-")
    assert prom.target_health() == {"tpm-a": "up", "tpm-b": "up"}


def test_injected_temperature_visible_within_two_scrape_intervals(stack):
    sim, prom = stack
    sim.set_value("tpm-a", 1, "GPU_TEMP", 97)
    t0 = time.monotonic()
    try:
        wait_for(lambda: prom.query('DCGM_FI_DEV_GPU_TEMP{hostname="tpm-a",gpu="1"} == 97'), 2 * INTERVAL + 1)
        elapsed = time.monotonic() - t0
        assert elapsed <= 2 * INTERVAL + 0.5, elapsed
        # and an alert rule over it fires
        wait_for(lambda: prom.query('ALERTS{alertname="GpuTooHot",alertstate="firing",gpu="1"}'), 3 * INTERVAL)
    finally:
        sim.reset()
    wait_for(lambda: not prom.query("DCGM_FI_DEV_GPU_TEMP > 85"), 3 * INTERVAL)


def test_stopped_node_target_goes_down_and_comes_back(stack):
    sim, prom = stack
    sim.stop_node("tpm-b")
    try:
        wait_for(lambda: prom.query(f'up{{job="{JOB}",instance="tpm-b"}} == 0'), 2 * INTERVAL + 1)
        assert prom.query(f'up{{job="{JOB}",instance="tpm-a"}} == 1')
        assert prom.target_health()["tpm-b"] == "down"
        # its series go stale: no current GPU temperature for the stopped node
        wait_for(lambda: not prom.query('DCGM_FI_DEV_GPU_TEMP{hostname="tpm-b"}'), 2 * INTERVAL + 1)
    finally:
        sim.start_node("tpm-b")
    wait_for(lambda: prom.query(f'up{{job="{JOB}",instance="tpm-b"}} == 1'), 2 * INTERVAL + 1)


def test_stop_and_start_keep_the_url(stack):
    _sim, prom = stack
    url = prom.url
    prom.stop()
    assert not prom.running()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/-/ready", timeout=2)
    assert prom.start() == url
    wait_for(lambda: len(prom.query("DCGM_FI_DEV_GPU_TEMP")) == 3, 15, 0.2)


def test_up_again_reloads_instead_of_restarting(stack):
    sim, prom = stack
    pid = procs.read_pid(prom.workdir, PrometheusLab.NAME)
    targets = sim.targets()
    prom.up(targets=targets[:1], scrape_interval="2s")
    try:
        assert procs.read_pid(prom.workdir, PrometheusLab.NAME) == pid
        wait_for(lambda: set(prom.target_health()) == {"tpm-a"}, 10)
    finally:
        prom.up(targets=targets, scrape_interval="2s")
    wait_for(lambda: set(prom.target_health()) == {"tpm-a", "tpm-b"}, 10)


def test_refuses_public_addresses(tmp_path):
    prom = PrometheusLab(tmp_path)
    with pytest.raises(ValueError):
        prom.up(listen="0.0.0.0:9090")
    with pytest.raises(ValueError):
        static_configs(["http://192.0.2.10:9400/metrics"])
    assert not prom.running()
    cfg = static_configs(["http://127.0.0.1:9400/node/n7/metrics", "198.51.100.9:9400"])
    assert cfg[0] == {
        "targets": ["127.0.0.1:9400"],
        "labels": {"__metrics_path__": "/node/n7/metrics", "instance": "n7"},
    }
    assert cfg[1] == {"targets": ["198.51.100.9:9400"], "labels": {}}


def test_bad_rules_are_rejected_by_promtool(tmp_path):
    if not shutil.which("promtool"):
        pytest.skip("promtool not installed")
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: x\n  rules:\n  - alert: A\n    expr: 'up =='\n")
    with pytest.raises(ValueError, match="promtool"):
        PrometheusLab(tmp_path / "p").up(rule_files=[bad])
