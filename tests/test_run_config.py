"""flows.common.desired_state: a run parses its config once and hands the desired state down to the phases it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import common
from gpuforge import desired

REPO_SEED = str(Path(__file__).resolve().parents[1] / "deployments" / "prod" / "config.yml")


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = common.load_config

    def counting(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(common, "load_config", counting)
    return seen


def test_a_phase_inside_a_run_reads_the_handed_down_state_without_parsing(parses):
    params = common.ClusterParams(config=REPO_SEED)
    state = common.desired_state(params)
    assert parses == [REPO_SEED] and isinstance(state, desired.DesiredState)
    with common.handing_down(params, state):
        assert common.desired_state(common.ClusterParams(config=REPO_SEED)) is state
        assert parses == [REPO_SEED]
    # Outside the run (a phase run on its own), the file is read again: nothing is cached across runs.
    assert common.desired_state(params) is not state and parses == [REPO_SEED, REPO_SEED]


def test_a_different_config_inside_a_run_is_parsed_not_mixed_up(parses, tmp_path):
    other = tmp_path / "config.yml"
    other.write_text(
        'cluster_name: other\nk8s_cluster_nodes:\n  - { ip: "198.51.100.7", role: [control-plane, etcd] }\n'
    )
    params = common.ClusterParams(config=REPO_SEED)
    with common.handing_down(params, common.desired_state(params)):
        assert common.desired_state(common.ClusterParams(config=str(other))).cluster == "other"
    assert parses == [REPO_SEED, str(other)]


def test_a_bad_config_is_a_precondition_failure(tmp_path):
    bad = tmp_path / "config.yml"
    bad.write_text("k8s_cluster_nodes: []\n")
    with pytest.raises(common.PreconditionFailed, match="k8s_cluster_nodes"):
        common.desired_state(common.ClusterParams(config=str(bad)))


def test_a_values_file_that_cannot_be_read_is_a_precondition_failure_naming_it(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text(
        "k8s_cluster_nodes:\n"
        '  - { ip: "198.51.100.7", role: [control-plane, etcd, gpu-worker] }\n'
        "deepops_services:\n"
        "  gpu-operator:\n"
        "    enabled: true\n"
        "    releases: { gpu-operator: { values_file: missing.yaml } }\n"
    )
    with pytest.raises(common.PreconditionFailed, match="cannot be read.*missing.yaml"):
        common.desired_state(common.ClusterParams(config=str(config)))
