"""Slurm's gres syntax, parsed (gpuforge.gres), and the Slurm node check that compares GPU counts exactly."""

from __future__ import annotations

import pytest

from gpuforge.gres import Gres, GresError, gpu_count, parse_gres
from gpuforge.remediation import SlurmNode
from gpuforge.validation import FAIL, PASS, slurm_node_results


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("gpu:8", [Gres("gpu", None, 8)]),
        ("gpu", [Gres("gpu", None, 1)]),  # no count: one
        ("gpu:h100", [Gres("gpu", "h100", 1)]),
        ("gpu:h100:8", [Gres("gpu", "h100", 8)]),
        ("gpu:h100:8(S:1)", [Gres("gpu", "h100", 8, "S:1")]),
        ("gpu:8(S:0-1)", [Gres("gpu", None, 8, "S:0-1")]),
        ("gpu:8(IDX:0-7)", [Gres("gpu", None, 8, "IDX:0-7")]),  # scontrol's GresUsed
        ("gpu:2(S:0,1),shard:4", [Gres("gpu", None, 2, "S:0,1"), Gres("shard", None, 4)]),  # comma inside (...)
        ("gpu:h100:4(S:0),gpu:a100:2", [Gres("gpu", "h100", 4, "S:0"), Gres("gpu", "a100", 2)]),
        ("gpu:1g.10gb:7", [Gres("gpu", "1g.10gb", 7)]),  # a MIG type starts with a digit
        ("mps:1K", [Gres("mps", None, 1024)]),
        ("gpu:h100:0", [Gres("gpu", "h100", 0)]),
        (" gpu:8 ", [Gres("gpu", None, 8)]),
        ("", []),
        ("(null)", []),
        ("N/A", []),
    ],
)
def test_parse_gres(text: str, parsed: list[Gres]) -> None:
    assert parse_gres(text) == parsed


@pytest.mark.parametrize(
    "text", ["gpu:", ":8", "gpu:h100:8:2", "gpu:8(S:0", "gpu:8)", "gpu,,shard:2", "gpu:-1", "gpu:h 100:8", "8"]
)
def test_malformed_gres_is_an_error_not_a_count(text: str) -> None:
    with pytest.raises(GresError, match="name\\[:type\\]"):
        parse_gres(text)


@pytest.mark.parametrize(
    ("text", "gpus"),
    [
        ("gpu:8", 8),
        ("gpu:h100:4(S:0),gpu:a100:2", 6),
        ("gpu:16", 16),
        ("gpu:80", 80),
        ("shard:8", 0),
        ("gpu:4,shard:8", 4),
        ("(null)", 0),
    ],
)
def test_gpu_count(text: str, gpus: int) -> None:
    assert gpu_count(text) == gpus


@pytest.mark.parametrize(
    ("gres", "expected", "status"),
    [
        ("gpu:8", 8, PASS),
        ("gpu:8(S:0-1)", 8, PASS),
        ("gpu:h100:8(S:1)", 8, PASS),
        ("gpu:8(IDX:0-7)", 8, PASS),
        ("gpu:1", 1, PASS),
        ("gpu:h100:4,gpu:a100:4", 8, PASS),
        # What the substring match passed:
        ("gpu:16", 8, FAIL),
        ("gpu:80", 8, FAIL),
        ("gpu:h100:8(S:1)", 1, FAIL),
        ("gpu:16", 1, FAIL),
        ("shard:8", 8, FAIL),
        ("gpu:4", 8, FAIL),
        ("(null)", 8, FAIL),
        ("gpu:8(S:0", 8, FAIL),
    ],
)
def test_slurm_node_check_compares_gpu_counts_exactly(gres: str, expected: int, status: str) -> None:
    (result,) = slurm_node_results({"n1": SlurmNode("n1", "idle", ("gpu",), gres)}, {"n1": expected})
    assert result.result == status, result.detail
    if status == FAIL:
        assert str(expected) in result.detail


def test_slurm_node_check_names_the_count_found() -> None:
    (result,) = slurm_node_results({"n1": SlurmNode("n1", "mixed", ("gpu",), "gpu:h100:16(S:0-1)")}, {"n1": 8})
    assert result.detail == "gres gpu:h100:16(S:0-1) holds 16 GPUs, expected 8"
    (missing,) = slurm_node_results({}, {"n1": 8})
    assert missing.result == FAIL and "not known to Slurm" in missing.detail
