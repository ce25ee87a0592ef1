"""The install phase catalogue (gpuforge.phases) and everything that must agree with it: the install flow's
runbooks, the CLI's phase options, the config's services and the flows prefect.yaml deploys."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from prefect import Flow
from pydantic import ValidationError
from ruamel.yaml import YAML

from gpuforge.config import Services
from gpuforge.phases import INSTALL_PHASES, PHASE_NAMES, selected_phases

REPO = Path(__file__).resolve().parents[1]


def names(phases) -> list[str]:
    return [p.name for p in phases]


def test_a_run_covers_every_phase_in_catalogue_order_by_default():
    assert names(selected_phases()) == [
        "preflight",
        "kubespray",
        "monitoring",
        "gpu-operator",
        "slurm",
        "dashboard",
        "validate",
    ]


def test_only_keeps_catalogue_order_whatever_order_it_was_given_in():
    assert names(selected_phases(["validate", "preflight", "slurm"])) == ["preflight", "slurm", "validate"]


def test_from_starts_at_that_phase():
    assert names(selected_phases(from_phase="slurm")) == ["slurm", "dashboard", "validate"]


def test_every_phase_service_is_a_service_the_config_switches():
    services = set(Services().by_key())
    assert {p.service for p in INSTALL_PHASES if p.service} <= services


def test_the_install_flow_has_one_runbook_per_phase_and_takes_only_catalogue_names():
    from flows.install import RUNBOOKS, InstallParams

    assert list(RUNBOOKS) == list(PHASE_NAMES)
    assert InstallParams(only=["slurm"], from_phase="monitoring", force_phases=["kubespray"]).only == ["slurm"]
    with pytest.raises(ValidationError):
        InstallParams(only=["bogus"])


def test_the_cli_offers_the_catalogue_phases():
    from gpuforge_cli.app import app

    install = app.commands["install"]
    for option in ("only", "from_phase", "force_phase"):
        param = next(p for p in install.params if p.name == option)
        assert list(param.type.choices) == list(PHASE_NAMES), option


def test_every_prefect_yaml_deployment_runs_an_existing_flow():
    deployments = YAML(typ="safe").load((REPO / "prefect.yaml").read_text())["deployments"]
    assert deployments
    for d in deployments:
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).is_file(), d["entrypoint"]
        module = importlib.import_module(Path(path).with_suffix("").as_posix().replace("/", "."))
        assert isinstance(getattr(module, func, None), Flow), f"{d['entrypoint']} is not a Prefect flow"
