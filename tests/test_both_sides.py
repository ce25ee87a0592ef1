"""Acting on both sides of a node: the plan (gpuforge.remediation.steps_per_node) and its one executor
(flows.common.act_on_both_sides), with fake changes in place of kubectl and scontrol."""

from __future__ import annotations

import pytest

from flows.common import act_on_both_sides
from gpuforge.remediation import CORDON, DRAIN_SLURM, RESUME_SLURM, UNCORDON, Action, Change, steps_per_node


def take_out(node: str = "gpu-0") -> list[Action]:
    # As remediation.decide lists them: the cordon first, the drain after it.
    return [
        Action(node, CORDON, "GPU 3 unhealthy", "slurm-0", annotation="gpuforge: GPU 3 unhealthy"),
        Action(node, DRAIN_SLURM, "Slurm node slurm-0: idle -> drain", "slurm-0", slurm_reason="gpuforge: GPU 3"),
    ]


def give_back(node: str = "gpu-0") -> list[Action]:
    # As remediation.release_decision lists them: the uncordon first, the resume after it.
    return [
        Action(node, UNCORDON, "re-validated: ok"),
        Action(node, RESUME_SLURM, "Slurm node slurm-0: drained -> resume", "slurm-0"),
    ]


class FakeSides:
    """Records the changes it is asked for; raises for the kinds listed in `fail`."""

    def __init__(self, *fail: str) -> None:
        self.fail = set(fail)
        self.applied: list[Change] = []
        self.log: list[str] = []

    def apply(self, change: Change) -> None:
        if change.kind in self.fail:
            raise RuntimeError(f"{change.kind} {change.target}: refused")
        self.applied.append(change)


def run(steps, sides: FakeSides) -> bool:
    return act_on_both_sides(steps, sides.apply, sides.log.append)


def test_taking_out_drains_slurm_first_then_cordons_and_each_undo_reverses_it():
    steps = steps_per_node(take_out())["gpu-0"]
    assert [s.change for s in steps] == [
        Change(DRAIN_SLURM, "slurm-0", "gpuforge: GPU 3"),
        Change(CORDON, "gpu-0", "gpuforge: GPU 3 unhealthy"),
    ]
    assert [s.undo for s in steps] == [Change(RESUME_SLURM, "slurm-0"), Change(UNCORDON, "gpu-0")]


def test_returning_resumes_slurm_first_then_uncordons_and_undoes_with_the_notes_given():
    steps = steps_per_node(give_back(), cordon_note="why it is out", drain_reason="gpuforge: put back")["gpu-0"]
    assert [s.change for s in steps] == [Change(RESUME_SLURM, "slurm-0"), Change(UNCORDON, "gpu-0")]
    assert [s.undo for s in steps] == [
        Change(DRAIN_SLURM, "slurm-0", "gpuforge: put back"),
        Change(CORDON, "gpu-0", "why it is out"),
    ]


def test_only_planned_actions_become_steps_grouped_per_node():
    skipped = Action("gpu-2", CORDON, "limit reached", status="skipped")
    per_node = steps_per_node([*take_out("gpu-0"), skipped, *take_out("gpu-1")])
    assert list(per_node) == ["gpu-0", "gpu-1"]


@pytest.mark.parametrize("actions", [take_out, give_back], ids=["take out", "give back"])
def test_all_steps_succeed(actions):
    planned = actions()
    steps = steps_per_node(planned, cordon_note="n", drain_reason="r")["gpu-0"]
    sides = FakeSides()
    assert run(steps, sides) is True
    assert sides.applied == [s.change for s in steps]
    assert [a.status for a in planned] == ["done", "done"]
    assert sides.log == [str(s.change) for s in steps]


def test_second_step_fails_the_first_is_undone():
    planned = take_out()
    cordon, drain = planned
    sides = FakeSides(CORDON)
    assert run(steps_per_node(planned)["gpu-0"], sides) is False
    assert sides.applied == [Change(DRAIN_SLURM, "slurm-0", "gpuforge: GPU 3"), Change(RESUME_SLURM, "slurm-0")]
    assert cordon.status == "failed" and cordon.detail == "GPU 3 unhealthy; cordon gpu-0: refused"
    assert drain.status == "undone" and drain.detail.endswith("; undone: cordon failed")


def test_first_step_fails_nothing_else_is_done():
    planned = give_back()
    uncordon, resume = planned
    sides = FakeSides(RESUME_SLURM)
    assert run(steps_per_node(planned, cordon_note="n", drain_reason="r")["gpu-0"], sides) is False
    assert sides.applied == []
    assert resume.status == "failed" and resume.detail.endswith("; resume-slurm slurm-0: refused")
    assert uncordon.status == "skipped" and uncordon.detail.endswith("; not done: resume-slurm failed")


def test_an_undo_that_fails_is_reported_next_to_the_original_error():
    planned = give_back()
    uncordon, resume = planned
    sides = FakeSides(UNCORDON, DRAIN_SLURM)  # returning fails at the uncordon, and draining again fails too
    assert run(steps_per_node(planned, cordon_note="n", drain_reason="r")["gpu-0"], sides) is False
    assert sides.applied == [Change(RESUME_SLURM, "slurm-0")]
    assert uncordon.status == "failed" and uncordon.detail.endswith("; uncordon gpu-0: refused")
    assert resume.status == "done"  # it is still resumed: the report must not say otherwise
    assert resume.detail.endswith(
        "; uncordon failed and undoing this failed too (drain-slurm slurm-0: refused): fix by hand"
    )
    assert any("could not undo" in line for line in sides.log)
