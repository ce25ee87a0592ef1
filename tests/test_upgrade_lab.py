"""`gpuforge upgrade plan` against the lab (real API server, real Helm, the real upstream charts).

On the freshly installed lab it has nothing to do (exit 0). Then the lab's releases are moved back to the previous
pins from ../shared/upstream/previous with Helm (GPU Operator v26.3.3, Slinky 1.2.0), and the GPU Operator's CRDs
to v26.3.3's (Helm never touches a chart's crds/, so a cluster installed at v26.3.3 holds those): the plan lists
every change with the CRD and metric-contract diffs and exits 2. Afterwards the releases are rolled back and the
current CRDs put back, and the plan has nothing to do again. The plan itself writes nothing: no Helm revision.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from gpuforge.config import load_config

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO.parent / "shared" / "upstream"
PREVIOUS = UPSTREAM / "previous"
# Release -> the previous pin's chart archive.
PREVIOUS_CHARTS = {
    "gpu-operator": PREVIOUS / "gpu-operator-v26.3.3.tgz",
    "slurm-operator-crds": PREVIOUS / "slurm-operator-crds-1.2.0.tgz",
    "slurm-operator": PREVIOUS / "slurm-operator-1.2.0.tgz",
    "slurm": PREVIOUS / "slurm-1.2.0.tgz",
}


@pytest.fixture(scope="module")
def cfg(lab_config):
    return load_config(lab_config)


def run_plan(config: Path) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "gpuforge_cli", "upgrade", "plan", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def revisions(cfg) -> dict[str, int]:
    from tasks.helm import release_records

    return {name: r.revision for (_, name), r in release_records(cfg.kubeconfig_path()).items()}


def chart_crds(archive: Path) -> dict[str, dict]:
    """The CRDs of a chart's own crds/ folder, as written."""
    with tarfile.open(archive) as tar:
        docs = [
            doc
            for m in tar.getmembers()
            if m.isfile() and m.name.count("/") == 2 and m.name.split("/")[1] == "crds"
            for doc in yaml.safe_load_all(tar.extractfile(m).read())
        ]
    return {d["metadata"]["name"]: d for d in docs if isinstance(d, dict)}


def put_crds(cfg, wanted: dict[str, dict], remove: list[str]) -> None:
    """Make the cluster hold exactly these CRD definitions (replaced whole: an apply would merge schemas)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from tasks.kube import api_client

    with api_client(cfg.kubeconfig_path()) as api:
        ext = client.ApiextensionsV1Api(api)
        for name, crd in wanted.items():
            body = copy.deepcopy(crd)
            try:
                body["metadata"]["resourceVersion"] = ext.read_custom_resource_definition(
                    name
                ).metadata.resource_version
                ext.replace_custom_resource_definition(name, body)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                ext.create_custom_resource_definition(body)
        for name in remove:
            ext.delete_custom_resource_definition(name)


def helm(cfg, *args: str) -> None:
    from tasks.helm import helm_executable

    env = {"KUBECONFIG": str(cfg.kubeconfig_path()), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    proc = subprocess.run([helm_executable(), *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"


def test_fresh_lab_has_nothing_to_do_and_plan_writes_nothing(installed, lab_config, cfg):
    before = revisions(cfg)
    code, report = run_plan(lab_config)
    assert report["errors"] == [] and code == 0 == report["exit_code"], report
    assert not any(c["changes"] for c in report["components"])
    assert report["crd_changes"] == [] and report["kubernetes_path"] == [] and report["metric_contract"] is None
    assert revisions(cfg) == before


def test_previous_pins_are_listed_with_crd_and_contract_diffs(installed, lab_config, cfg, tmp_path):
    from gpuforge.render import chart_archive, chart_mirror, render_releases

    releases = {r.name: r for r in render_releases(cfg)}
    current_archive = chart_archive(releases["gpu-operator"], chart_mirror(cfg, os.environ))
    current, previous = chart_crds(current_archive), chart_crds(PREVIOUS_CHARTS["gpu-operator"])
    before = revisions(cfg)
    try:
        put_crds(cfg, previous, remove=sorted(set(current) - set(previous)))
        for name, archive in PREVIOUS_CHARTS.items():
            # The values gpuforge renders, as an install at the previous pins passed them; --reuse-values would
            # carry the current chart's coalesced defaults (its driver and exporter versions) into the release.
            values = tmp_path / f"{name}.json"
            values.write_text(json.dumps(releases[name].values))
            helm(
                cfg, "upgrade", name, str(archive), "-n", releases[name].namespace, "--reset-values", "-f", str(values)
            )
        moved = revisions(cfg)
        code, report = run_plan(lab_config)
        assert revisions(cfg) == moved  # the plan itself wrote nothing
    finally:
        for name in PREVIOUS_CHARTS:
            helm(cfg, "rollback", name, str(before[name]), "-n", releases[name].namespace)
        put_crds(cfg, current, remove=[])

    assert code == 2 == report["exit_code"] and report["errors"] == [], report
    changed = {c["component"]: (c["live"], c["target"]) for c in report["components"] if c["changes"]}
    assert changed == {
        "helm/gpu-operator": ("v26.3.3", "v26.7.0"),
        "helm/slurm-operator-crds": ("1.2.0", "1.2.1"),
        "helm/slurm-operator": ("1.2.0", "1.2.1"),
        "helm/slurm": ("1.2.0", "1.2.1"),
        "dcgm-exporter": ("4.5.3-4.8.2-distroless", "4.6.0-4.8.3-distroless"),
    }
    crds = {(c["crd"], c["change"]) for c in report["crd_changes"]}
    assert {(name, "new") for name in set(current) - set(previous)} <= crds
    assert ("clusterpolicies.nvidia.com", "schema") in crds
    assert all(c["release"] == "gpu-operator" and not c["helm_upgrades_it"] for c in report["crd_changes"])
    contract = report["metric_contract"]
    assert (contract["from"], contract["to"]) == ("4.8.2", "4.8.3")
    assert contract["changes"] == ["label renamed: node: Hostname -> hostname"]
    risks = "\n".join(report["risks"])
    assert "driver 580.126.20 -> 595.91.07" in risks and "toolkit v1.19.1 -> v1.20.0" in risks
    assert "clusterpolicies.nvidia.com" in risks and "helm upgrade does not apply it" in risks
    assert "Slinky charts move but their CRDs do not change" in risks


def test_put_back_the_plan_has_nothing_to_do_again(installed, lab_config):
    code, report = run_plan(lab_config)
    assert code == 0 and report["crd_changes"] == [] and report["errors"] == [], report
