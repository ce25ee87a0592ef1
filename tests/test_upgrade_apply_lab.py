"""`gpuforge upgrade apply` against the lab (real API server, real Helm, the real upstream charts at both pins).

The lab is moved to the previous pins as tests/test_upgrade_lab.py does (GPU Operator v26.3.3 and its crds/ CRDs,
Slinky 1.2.0, installed with gpuforge's rendered values). Then, through the CLI:

1. apply brings it to the current pins: pre-checks, the GPU Operator's crds/ CRDs applied, the GPU Operator and Slurm
   steps, each with a green validation gate; one new Helm revision per moved release; the plan then exits 0.
2. a second apply is a no-op: exit 0, no new Helm revision.
3. back at the previous pins, an apply whose config gives the slurm release a value the API server refuses (a
   PriorityClass name that is no DNS subdomain): the GPU Operator step passes its gate, the Slurm step fails in
   Helm's words, its releases go back to their revisions from before the step (Helm's --atomic rollback for slurm,
   gpuforge's `helm rollback` for the Slinky releases the step had already moved), exit 1.
4. apply with the lab's own config then finishes the upgrade (the lab is left at the pins for later modules).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuforge.config import load_config
from tests.conftest import config_variant
from tests.test_upgrade_lab import PREVIOUS_CHARTS, chart_crds, helm, put_crds, revisions, run_plan

pytestmark = pytest.mark.timeout(1800)

REPO = Path(__file__).resolve().parents[1]
BAD_NAME = "Not_A_DNS_Name"
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def cfg(lab_config):
    return load_config(lab_config)


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """The CLI runs' own Prefect database (not the shared ~/.prefect of other work on this machine)."""
    return tmp_path_factory.mktemp("prefect-home")


def to_previous_pins(cfg, folder: Path) -> None:
    """The releases at the previous charts with gpuforge's rendered values, the GPU Operator's CRDs at v26.3.3's."""
    from gpuforge.render import chart_archive, chart_mirror, render_releases

    releases = {r.name: r for r in render_releases(cfg)}
    current = chart_crds(chart_archive(releases["gpu-operator"], chart_mirror(cfg, os.environ)))
    previous = chart_crds(PREVIOUS_CHARTS["gpu-operator"])
    put_crds(cfg, previous, remove=sorted(set(current) - set(previous)))
    for name, archive in PREVIOUS_CHARTS.items():
        values = folder / f"{name}.json"
        values.write_text(json.dumps(releases[name].values))
        helm(cfg, "upgrade", name, str(archive), "-n", releases[name].namespace, "--reset-values", "-f", str(values))


def start_apply(config: Path, prefect_home: Path, *args: str) -> tuple[subprocess.Popen, float]:
    """`gpuforge upgrade apply --json` started in the background, and when (finish it with `finish_apply`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "gpuforge_cli", "upgrade", "apply", "--config", str(config), "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PREFECT_HOME": str(prefect_home)},
    ), time.monotonic()


def finish_apply(
    running: tuple[subprocess.Popen, float], timings: dict[str, float], label: str
) -> tuple[int, dict, str]:
    proc, started = running
    try:
        stdout, stderr = proc.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    timings[f"{label} ({len(timings) + 1})"] = round(time.monotonic() - started, 1)
    assert stdout, stderr[-3000:]
    return proc.returncode, json.loads(stdout), stderr


def apply(config: Path, prefect_home: Path, *args: str, timings: dict[str, float] = TIMINGS) -> tuple[int, dict, str]:
    return finish_apply(start_apply(config, prefect_home, *args), timings, f"apply {config.name}")


def history(cfg, name: str) -> list[dict]:
    from tasks.helm import release_history, release_records

    namespace = next(r.namespace for (_, n), r in release_records(cfg.kubeconfig_path()).items() if n == name)
    return release_history(cfg.kubeconfig_path(), name, namespace)


def wait_node_label(lab, node: str, label: str, timeout: float = 30) -> None:
    """Until the DCGM simulator serves `node`'s series under `label` (the lab reconciler tells it the exporter
    version the ClusterPolicy deploys)."""
    deadline = time.monotonic() + timeout
    while f'{label}="{node}"' not in lab.dcgm.scrape(node):
        assert time.monotonic() < deadline, f"the DCGM simulator does not serve {label} for {node}"
        time.sleep(0.5)


def records(cfg) -> dict:
    from tasks.helm import release_records

    return {name: r for (_, name), r in release_records(cfg.kubeconfig_path()).items()}


def test_apply_brings_the_previous_pins_to_the_current_ones_gate_after_gate(
    installed, lab_config, cfg, tmp_path, prefect_home
):
    to_previous_pins(cfg, tmp_path)
    gpu = cfg.gpu_nodes[0].name
    # v26.3.3's dcgm-exporter (4.5.3-4.8.2) writes the node label `Hostname`; the config's pin (v26.7.0) `hostname`.
    wait_node_label(installed, gpu, "Hostname")
    code, report = run_plan(lab_config)
    assert code == 2, report
    before = revisions(cfg)

    code, report, stderr = apply(lab_config, prefect_home)

    assert code == 0, (report["outcome"], stderr[-2000:])
    print("\n".join(f"{r['step']}: {r['seconds']} s, {r['revisions']}, gate {r['gate']}" for r in report["steps"]))
    assert [r["step"] for r in report["steps"]] == ["pre-check", "crds", "gpu-operator", "slurm"]
    assert all(r["result"] == "done" and r["gate"].startswith("green") for r in report["steps"]), report["steps"]
    # Until the GPU Operator step the gates read the running exporter's labels, then the pinned one's.
    gates = {r["step"]: r["gate"] for r in report["steps"]}
    running_old = "DCGM read as dcgm-exporter 4.5.3-4.8.2, the one running"
    assert running_old in gates["pre-check"] and running_old in gates["crds"], gates
    assert "DCGM read as" not in gates["gpu-operator"] + gates["slurm"], gates
    assert "hostname=" in installed.dcgm.scrape(gpu) and "Hostname=" not in installed.dcgm.scrape(gpu)
    assert "clusterpolicies.nvidia.com (gpu-operator)" in report["steps"][1]["detail"]
    after = revisions(cfg)
    moved = {name for name in after if after[name] != before[name]}
    assert moved == {"gpu-operator", "slurm-operator-crds", "slurm-operator", "slurm"}
    assert all(after[name] == before[name] + 1 for name in moved)
    code, plan = run_plan(lab_config)
    assert code == 0 and plan["crd_changes"] == [], plan


def test_a_second_apply_is_a_no_op(installed, lab_config, cfg, prefect_home):
    before = revisions(cfg)
    code, report, _ = apply(lab_config, prefect_home)
    assert (code, report["outcome"], report["steps"]) == (0, "nothing to do: the cluster is at the pins", [])
    assert revisions(cfg) == before


def test_a_failed_chart_step_is_rolled_back_and_stops_in_helms_words(
    installed, lab_config, cfg, tmp_path, prefect_home
):
    to_previous_pins(cfg, tmp_path)
    previous = records(cfg)
    bad = config_variant(
        lab_config,
        tmp_path,
        lambda d: d["deepops_services"]["slurm"]["releases"].update(
            {"slurm": {"values": {"priorityClass": {"enabled": True, "create": True, "name": BAD_NAME}}}}
        ),
    )

    code, report, stderr = apply(bad, prefect_home)

    assert code == 1, (report, stderr[-2000:])
    steps = {r["step"]: r for r in report["steps"]}
    assert [r["step"] for r in report["steps"]] == ["pre-check", "crds", "gpu-operator", "slurm"]
    assert steps["gpu-operator"]["result"] == "done" and steps["gpu-operator"]["gate"].startswith("green")
    failed = steps["slurm"]
    assert failed["result"] == "rolled back" and failed["gate"] == ""
    # Helm's own words, naming the release, then the API server's refusal
    assert "helm release slurm/slurm (slurm 1.2.1)" in failed["detail"], failed["detail"]
    assert f'PriorityClass.scheduling.k8s.io "{BAD_NAME}" is invalid' in failed["detail"], failed["detail"]
    assert report["outcome"].startswith("step slurm failed and was rolled back: helm release slurm/slurm")
    assert "slurm-operator: revision" in failed["detail"] and "-> rollback to revision" in failed["detail"]
    assert "validation after it: green" in failed["detail"], failed["detail"]
    print(failed["detail"])

    now = records(cfg)
    for name in ("slurm-operator-crds", "slurm-operator", "slurm"):
        assert now[name].status == "deployed" and now[name].chart_version == "1.2.0", name
        assert now[name].values == previous[name].values, name
        last = history(cfg, name)[-1]
        assert last["description"] == f"Rollback to {previous[name].revision}", (name, history(cfg, name))
    assert now["gpu-operator"].chart_version == "v26.7.0"  # the step before passed its gate and stays
    assert now["cert-manager"].revision == previous["cert-manager"].revision
    code, plan = run_plan(lab_config)
    assert code == 2 and {c["component"] for c in plan["components"] if c["changes"]} == {
        "helm/slurm-operator-crds",
        "helm/slurm-operator",
        "helm/slurm",
    }


def test_apply_with_the_fixed_config_finishes_the_upgrade(installed, lab_config, cfg, prefect_home):
    code, report, stderr = apply(lab_config, prefect_home)
    assert code == 0, (report["outcome"], stderr[-2000:])
    assert [r["step"] for r in report["steps"]] == ["pre-check", "slurm"]
    code, plan = run_plan(lab_config)
    assert code == 0, plan
    print("apply wall times:", TIMINGS)
