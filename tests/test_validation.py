"""The validation report's counts: a skipped check is counted as skipped, never as a failure."""

from __future__ import annotations

from gpuforge.validation import ERROR, FAIL, PASS, SKIP, CheckResult, counts, exit_code, summary


def results(*kinds: str) -> list[CheckResult]:
    return [CheckResult(f"check-{i}", "cluster", kind) for i, kind in enumerate(kinds)]


def test_a_skipped_check_is_not_a_failure():
    run = results(*[PASS] * 16, SKIP)
    assert counts(run) == {PASS: 16, FAIL: 0, SKIP: 1, ERROR: 0}
    assert summary(run) == "17 checks: 16 passed, 0 failed, 1 skipped, 0 could not run"
    assert exit_code(run) == 0


def test_each_result_is_counted_under_its_own_name():
    run = results(PASS, FAIL, FAIL, SKIP, ERROR)
    assert summary(run) == "5 checks: 1 passed, 2 failed, 1 skipped, 1 could not run"
    assert summary([]) == "0 checks: 0 passed, 0 failed, 0 skipped, 0 could not run"
