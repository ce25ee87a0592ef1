"""An XID cannot slip by: a real Prometheus scraping the DCGM simulator every second; XID 79 shown for 20 s, then
cleared. The fleet evaluation reports it at every instant of the window after, and not once the window is over."""

from __future__ import annotations

import shutil
import time

import pytest
from prometheus_api_client import PrometheusConnect

from gpuforge import health
from gpuforge.health import Verdict
from lab.dcgm_sim import DcgmSim
from lab.prometheus import PrometheusLab
from tasks.prometheus import evaluate_fleet

pytestmark = pytest.mark.skipif(not shutil.which("prometheus"), reason="needs the prometheus package")

NODE, MODEL = "xid-a", "NVIDIA H100 80GB HBM3"
WINDOW_S = 40  # short, so that the test sees the window end


def test_an_xid_visible_for_20_s_is_reported_for_the_whole_window(tmp_path):
    table = health.resolve_thresholds({"default": {"xid_window": f"{WINDOW_S}s"}})
    sim, prom = DcgmSim(tmp_path / "dcgm"), PrometheusLab(tmp_path / "prom")
    try:
        sim.up({NODE: (2, MODEL)})
        prom.up(targets=sim.targets(), scrape_interval="1s")
        deadline = time.monotonic() + 30
        while len(prom.query("DCGM_FI_DEV_GPU_TEMP")) < 2:
            assert time.monotonic() < deadline, "the simulator's series never showed"
            time.sleep(0.2)
        time.sleep(2)  # a few scrapes of XID 0 first
        sim.set_value(NODE, 1, "XID_ERRORS", 79)
        shown = time.time()
        time.sleep(20)
        sim.set_value(NODE, 1, "XID_ERRORS", 0)
        cleared = time.time()
        time.sleep(2)
        assert {r["metric"]["err_code"] for r in prom.query('DCGM_FI_DEV_XID_ERRORS{gpu="1"}')} == {"0"}

        # End to end, as gpu-health runs it: XID 79 after it was cleared, the other GPU healthy.
        fleet, sent = evaluate_fleet(PrometheusConnect(url=prom.url), {NODE: 2}, table)
        assert sent == len(health.fleet_queries(table)) + 3 <= 10  # + the node's values, freshness and exact XIDs
        verdicts = fleet.verdicts
        assert [(v.gpu, v.verdict) for v in verdicts] == [(0, Verdict.HEALTHY), (1, Verdict.UNHEALTHY)]
        assert verdicts[1].reasons == [f"XID 79 (GPU has fallen off the bus) within {WINDOW_S}s"]

        def xids_at(t: float) -> list[tuple[str, str]]:
            """The fleet's two XID questions asked at instant `t`: (gpu, XID) reported."""
            at = {"time": f"{t:.3f}"}
            seen = prom.api("query", query=health.fleet_queries(table)[health.XID_SEEN], **at)["result"]
            exact = health.xid_recent_query(table, seen)
            if exact is None:
                return []
            answer = prom.api("query", query=exact, **at)["result"]
            return sorted((r["metric"]["gpu"], r["metric"]["err_code"]) for r in answer)

        # The XID happened when it was first shown: reported at every instant after it was cleared until the window
        # from then ends (its first sample was scraped within a second of `shown`), and not after.
        time.sleep(max(0.0, shown + WINDOW_S + 5 - time.time()))
        for t in range(int(cleared - shown) + 2, WINDOW_S - 1, 2):
            assert xids_at(shown + t) == [("1", "79")], f"not reported {t} s after it happened"
        assert xids_at(shown + WINDOW_S + 3) == []  # the window is over
    finally:
        prom.down()
        sim.down()
