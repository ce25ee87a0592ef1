"""The fleet's deployments: prefect.yaml generated from deployments/*/config.yml and the WORKFLOWS table.
No server here (tests/test_fleet_postgres.py deploys the result against a PostgreSQL-backed one)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from gpuforge import fleet

REPO = Path(__file__).resolve().parents[1]


def write_cluster(root: Path, env: str, **changes) -> Path:
    """deployments/<env>/config.yml under `root`: the prod example with `changes` applied."""
    yaml = YAML()
    data = yaml.load((REPO / "deployments" / "prod" / "config.yml").read_text())
    data.update(changes)
    path = root / "deployments" / env / "config.yml"
    path.parent.mkdir(parents=True)
    with path.open("w") as f:
        yaml.dump(data, f)
    return path


def test_committed_prefect_yaml_is_the_generated_one():
    assert (REPO / "prefect.yaml").read_text() == fleet.generate(REPO), "run `python -m gpuforge.fleet`"
    assert fleet.main(["--check", "--root", str(REPO)]) == 0


def test_every_cluster_folder_gets_every_workflow():
    data = YAML(typ="safe").load((REPO / "prefect.yaml").read_text())
    envs = sorted(p.parent.name for p in (REPO / "deployments").glob("*/config.yml"))
    assert envs == ["lab", "prod"]
    declared = {(d["entrypoint"], d["name"]) for d in data["deployments"]}
    assert declared == {(w.entrypoint, env) for w in fleet.WORKFLOWS for env in envs}
    assert len(data["deployments"]) == len(declared)
    for d in data["deployments"]:
        assert d["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
        assert d["work_pool"] == {"name": "gpuforge", "work_queue_name": "default"}
        assert d["parameters"] == {"params": {"config": f"deployments/{d['name']}/config.yml"}}
    install_prod = next(d for d in data["deployments"] if d["entrypoint"].endswith(":install") and d["name"] == "prod")
    assert install_prod["tags"] == ["install", "prod", "cluster:gpuforge"]  # prod's config names no cluster


def test_workflow_table_names_the_real_flows():
    """`<flow>/<env>` is what `prefect deployment run` takes: the table's flow name is the @flow's name."""
    for workflow in fleet.WORKFLOWS:
        path, func = workflow.entrypoint.split(":")
        module = path.removesuffix(".py").replace("/", ".")
        assert getattr(importlib.import_module(module), func).name == workflow.flow
    assert [(w.flow, w.cron) for w in fleet.WORKFLOWS] == [
        ("install", None),
        ("validate", None),
        ("upgrade", None),
        ("gpu-health", "0 2 * * *"),
        ("drift", "0 * * * *"),
    ]


def test_adding_a_cluster_is_adding_a_folder(tmp_path):
    write_cluster(tmp_path, "prod")
    write_cluster(tmp_path, "tokyo", cluster_name="train-tokyo", timezone="Asia/Tokyo")
    data = YAML(typ="safe").load(fleet.generate(tmp_path))
    tokyo = {d["entrypoint"].split(":")[1]: d for d in data["deployments"] if d["name"] == "tokyo"}
    assert set(tokyo) == {"install", "validate", "upgrade", "gpu_health", "drift"}
    assert tokyo["gpu_health"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "Asia/Tokyo", "active": True}]
    assert tokyo["drift"]["schedules"] == [{"cron": "0 * * * *", "timezone": "Asia/Tokyo", "active": True}]
    assert not {"schedules"} & (tokyo["install"].keys() | tokyo["validate"].keys() | tokyo["upgrade"].keys())
    assert tokyo["install"]["tags"] == ["install", "tokyo", "cluster:train-tokyo"]
    assert tokyo["install"]["parameters"] == {"params": {"config": "deployments/tokyo/config.yml"}}
    assert len(data["deployments"]) == 10


def test_check_reports_a_stale_file(tmp_path, capsys):
    write_cluster(tmp_path, "prod")
    assert fleet.main(["--root", str(tmp_path)]) == 0
    assert fleet.main(["--check", "--root", str(tmp_path)]) == 0
    write_cluster(tmp_path, "edge", cluster_name="edge")
    assert fleet.main(["--check", "--root", str(tmp_path)]) == 1
    assert "is stale: run `python -m gpuforge.fleet`" in capsys.readouterr().err


def test_clusters_that_would_collide_are_refused(tmp_path):
    write_cluster(tmp_path, "a", cluster_name="same")
    write_cluster(tmp_path, "b", cluster_name="same")
    write_cluster(tmp_path, "Bad_Name")
    write_cluster(tmp_path, "broken", timezone="Mars/Olympus")
    with pytest.raises(fleet.FleetError) as err:
        fleet.generate(tmp_path)
    lines = str(err.value).splitlines()
    assert any("cluster_name 'same' is also the cluster of" in line for line in lines)
    assert any("folder name 'Bad_Name' must be lowercase" in line for line in lines)
    assert any("'Mars/Olympus' is not an IANA time zone" in line for line in lines)
    assert fleet.main(["--root", str(tmp_path)]) == 2
    assert not (tmp_path / "prefect.yaml").exists()
