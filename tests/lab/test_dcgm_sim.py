"""DCGM-exporter simulator: exposition format, exact labels, fault injection over HTTP, CLI and Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab import procs
from lab.dcgm_sim import METRICS, DcgmSim, check_listen, gpu_uuid, node_label_of

NODES = {"tdc-a": (8, "NVIDIA H100 80GB HBM3"), "tdc-b": (2, "NVIDIA A100-SXM4-80GB")}
LABELS = {"gpu", "UUID", "pci_bus_id", "device", "modelName", "hostname", "DCGM_FI_DRIVER_VERSION"}
REQUIRED = [
    "SM_CLOCK", "MEM_CLOCK", "MEMORY_TEMP", "GPU_TEMP", "POWER_USAGE", "TOTAL_ENERGY_CONSUMPTION",
    "PCIE_REPLAY_COUNTER", "GPU_UTIL", "MEM_COPY_UTIL", "ENC_UTIL", "DEC_UTIL", "XID_ERRORS", "FB_FREE",
    "FB_USED", "FB_RESERVED", "NVLINK_BANDWIDTH_TOTAL", "UNCORRECTABLE_REMAPPED_ROWS",
    "CORRECTABLE_REMAPPED_ROWS", "ROW_REMAP_FAILURE", "ECC_SBE_VOL_TOTAL", "ECC_DBE_VOL_TOTAL",
    "ROW_REMAP_PENDING", "CLOCK_THROTTLE_REASONS", "NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
    "NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "NVLINK_REPLAY_ERROR_COUNT_TOTAL", "NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
]  # fmt: skip


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = DcgmSim(tmp_path_factory.mktemp("dcgm"))
    url = s.up(NODES)
    assert url.startswith("http://127.0.0.1:")
    yield s
    s.down()


@pytest.fixture(autouse=True)
def _clean(sim):
    yield
    sim.reset()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(sim: DcgmSim, node: str, metric: str) -> dict[str, tuple[dict, float]]:
    out = {}
    for line in sim.scrape(node).splitlines():
        if line.startswith(f"DCGM_FI_DEV_{metric}{{"):
            fam = families(line)
            s = next(iter(fam.values())).samples[0]
            out[s.labels["gpu"]] = (s.labels, s.value)
    return out


def test_every_metric_once_per_gpu_with_the_exact_label_set(sim):
    text = sim.scrape("tdc-a")
    assert {m[0] for m in METRICS} >= set(REQUIRED)
    for name in REQUIRED:
        full = f"DCGM_FI_DEV_{name}"
        assert f"# HELP {full} " in text
        assert f"# TYPE {full} " in text
        rows = samples(sim, "tdc-a", name)
        assert sorted(rows, key=int) == [str(i) for i in range(8)], name
        for gpu, (labels, _value) in rows.items():
            expected = LABELS | ({"err_code", "err_msg"} if name == "XID_ERRORS" else set())
            assert set(labels) == expected, (name, labels)
            assert labels["device"] == f"nvidia{gpu}"
            assert labels["hostname"] == "tdc-a"
            assert labels["modelName"] == "NVIDIA H100 80GB HBM3"
            assert labels["UUID"] == gpu_uuid("tdc-a", int(gpu)) and labels["UUID"].startswith("GPU-")
    assert samples(sim, "tdc-a", "GPU_TEMP")["0"][0]["pci_bus_id"] == "00000000:18:00.0"
    assert len(samples(sim, "tdc-b", "GPU_TEMP")) == 2
    fam = families(text)
    assert fam["DCGM_FI_DEV_GPU_TEMP"].type == "gauge"
    assert fam["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].type == "counter"


def test_healthy_defaults(sim):
    temps = [v for _, v in samples(sim, "tdc-a", "GPU_TEMP").values()]
    assert all(25 <= t <= 50 for t in temps)
    for name in ("XID_ERRORS", "ECC_DBE_VOL_TOTAL", "ROW_REMAP_PENDING", "ROW_REMAP_FAILURE",
                 "CLOCK_THROTTLE_REASONS", "NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL"):  # fmt: skip
        assert {v for _, v in samples(sim, "tdc-a", name).values()} == {0.0}, name
    labels, _ = samples(sim, "tdc-a", "XID_ERRORS")["0"]
    assert labels["err_code"] == "0"
    used = samples(sim, "tdc-a", "FB_USED")["0"][1]
    free = samples(sim, "tdc-a", "FB_FREE")["0"][1]
    reserved = samples(sim, "tdc-a", "FB_RESERVED")["0"][1]
    assert used + free + reserved == 81559
    e1 = samples(sim, "tdc-a", "TOTAL_ENERGY_CONSUMPTION")["0"][1]
    time.sleep(0.3)
    assert samples(sim, "tdc-a", "TOTAL_ENERGY_CONSUMPTION")["0"][1] > e1  # a counter that counts


def test_set_value_through_the_python_api(sim):
    sim.set_value("tdc-a", 3, "GPU_TEMP", 93)
    sim.set_value("tdc-a", 1, "DCGM_FI_DEV_XID_ERRORS", 79)
    temps = samples(sim, "tdc-a", "GPU_TEMP")
    assert temps["3"][1] == 93 and temps["2"][1] != 93
    labels, value = samples(sim, "tdc-a", "XID_ERRORS")["1"]
    assert value == 79 and labels["err_code"] == "79" and labels["err_msg"] == "GPU has fallen off the bus"
    sim.set_value("tdc-a", 0, "FB_USED", 40000)
    assert samples(sim, "tdc-a", "FB_FREE")["0"][1] == 81559 - 556 - 40000
    with pytest.raises(ValueError, match="unknown DCGM metric"):
        sim.set_value("tdc-a", 0, "NOT_A_METRIC", 1)
    with pytest.raises(ValueError, match="no GPU 2"):
        sim.set_value("tdc-b", 2, "GPU_TEMP", 1)
    sim.reset()
    assert samples(sim, "tdc-a", "GPU_TEMP")["3"][1] != 93


def test_remove_gpu_and_stop_node(sim):
    sim.remove_gpu("tdc-a", 5)
    assert "5" not in samples(sim, "tdc-a", "GPU_TEMP") and len(samples(sim, "tdc-a", "GPU_TEMP")) == 7
    sim.stop_node("tdc-b")
    with pytest.raises(urllib.error.HTTPError) as err:
        sim.scrape("tdc-b")
    assert err.value.code == 503
    assert len(samples(sim, "tdc-a", "GPU_TEMP")) == 7  # other nodes keep serving
    sim.start_node("tdc-b")
    assert len(samples(sim, "tdc-b", "GPU_TEMP")) == 2
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{sim.url}/node/nope/metrics", timeout=5)
    assert err.value.code == 404


def test_fault_injection_over_http_and_cli(sim):
    body = json.dumps([{"action": "set", "node": "tdc-b", "gpu": 1, "metric": "ECC_DBE_VOL_TOTAL", "value": 4}])
    req = urllib.request.Request(sim.url + "/faults", data=body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    assert samples(sim, "tdc-b", "ECC_DBE_VOL_TOTAL")["1"][1] == 4

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lab.dcgm_sim", *args], capture_output=True, text=True,
                              timeout=30, env={**os.environ, "DCGM_SIM_URL": sim.url})  # fmt: skip

    assert cli("set", "tdc-a", "2", "GPU_TEMP=88", "POWER_USAGE=650").returncode == 0
    assert samples(sim, "tdc-a", "GPU_TEMP")["2"][1] == 88
    assert samples(sim, "tdc-a", "POWER_USAGE")["2"][1] == 650
    assert cli("remove-gpu", "--url", sim.url, "tdc-a", "0").returncode == 0
    assert "0" not in samples(sim, "tdc-a", "GPU_TEMP")
    assert cli("stop-node", "tdc-a").returncode == 0
    with pytest.raises(urllib.error.HTTPError):
        sim.scrape("tdc-a")
    assert cli("start-node", "tdc-a").returncode == 0
    bad = cli("set", "tdc-a", "0", "BOGUS=1")
    assert bad.returncode == 1 and "unknown DCGM metric" in bad.stderr
    faults = json.loads(urllib.request.urlopen(sim.url + "/faults", timeout=5).read())
    assert faults["removed"] == {"tdc-a": [0]}
    assert cli("reset").returncode == 0
    assert len(samples(sim, "tdc-a", "GPU_TEMP")) == 8


def test_faults_survive_a_restart_but_not_a_new_up(sim):
    sim.set_value("tdc-b", 0, "GPU_TEMP", 77)
    pid, url = procs.read_pid(sim.workdir, DcgmSim.NAME), sim.url
    assert sim.restart() == url
    assert procs.read_pid(sim.workdir, DcgmSim.NAME) != pid
    assert samples(sim, "tdc-b", "GPU_TEMP")["0"][1] == 77
    sim.down()
    assert not procs.is_running(sim.workdir, DcgmSim.NAME)
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=2)
    sim.up(NODES)
    assert samples(sim, "tdc-b", "GPU_TEMP")["0"][1] == 33  # up() starts from a clean state


def test_listen_address_must_be_loopback_or_lab():
    assert check_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert check_listen("198.51.100.7:9400") == ("198.51.100.7", 9400)
    for bad in ("0.0.0.0:9400", "10.1.1.1:9400", "localhost:9400"):
        with pytest.raises(ValueError):
            check_listen(bad)


def test_scales_to_1024_nodes_of_8_gpus(tmp_path):
    big = DcgmSim(tmp_path)
    nodes = {f"bench-{i:04d}": (8, "NVIDIA H100 80GB HBM3") for i in range(1024)}
    big.up(nodes)
    try:
        targets = big.targets()
        assert len(targets) == 1024
        t0 = time.monotonic()
        total = 0
        for url in targets[::64]:
            with urllib.request.urlopen(url, timeout=10) as resp:
                text = resp.read().decode()
            total += sum(1 for line in text.splitlines() if line.startswith("DCGM_FI_DEV_GPU_TEMP{"))
        assert total == 16 * 8
        print(f"16 of 1024 targets scraped in {time.monotonic() - t0:.2f}s")
        big.set_value("bench-1023", 7, "GPU_TEMP", 99)
        assert 'gpu="7"' in [ln for ln in big.scrape("bench-1023").splitlines() if ln.endswith(" 99")][0]
    finally:
        big.down()


@pytest.mark.parametrize(
    ("tag", "label"),
    [("4.5.3-4.8.2-distroless", "Hostname"), ("4.6.0-4.8.3-distroless", "hostname"), ("4.2.3-4.1.3-ubuntu22.04", "Hostname"),
     ("4.6.0-4.9.0", "hostname"), ("", "hostname"), ("latest", "hostname")],
)  # fmt: skip
def test_the_node_label_follows_the_exporter_version(tag, label):
    assert node_label_of(tag) == label


def test_the_exporter_the_operator_deploys_decides_the_node_label_and_outlives_reset_and_restart(sim):
    def node_labels() -> set[str]:
        return {k for labels, _ in samples(sim, "tdc-b", "GPU_TEMP").values() for k in labels} & {
            "hostname",
            "Hostname",
        }

    try:
        assert node_labels() == {"hostname"}
        sim.set_exporter("4.5.3-4.8.2-distroless")  # GPU Operator v26.3.3's
        assert node_labels() == {"Hostname"}
        sim.reset()
        sim.restart()
        assert node_labels() == {"Hostname"}, "an exporter version is not a fault"
        sim.set_exporter("4.6.0-4.8.3-distroless")  # v26.7.0's
        assert node_labels() == {"hostname"}
    finally:
        sim.set_exporter("")
