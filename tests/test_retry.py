"""Which errors gpuforge retries, and for how long: plain functions and a Prefect task, no cluster."""

from __future__ import annotations

import pytest
from kubernetes.client.rest import ApiException

from tasks.retry import is_transient_error, retry_transient, transient_within


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ApiException(status=429, reason="Too Many Requests"), True),  # "storage is (re)initializing"
        (ApiException(status=503, reason="Service Unavailable"), True),
        (ApiException(status=404, reason="Not Found"), False),
        (ApiException(status=422, reason="Unprocessable Entity"), False),
        (ConnectionRefusedError("connection refused"), True),
        (RuntimeError("another operation (install/upgrade/rollback) is in progress"), True),
        (RuntimeError("values don't meet the specifications of the schema"), False),
        # The API server's words when its storage did not answer (Helm quotes them without the status code).
        (
            RuntimeError(
                "UPGRADE FAILED: pre-upgrade hooks failed: Timeout: request did not complete within requested timeout - context deadline exceeded"
            ),
            True,
        ),
        (
            RuntimeError(
                "the server was unable to return a response in the time allotted, but may still be processing the request"
            ),
            True,
        ),
        # Helm's own wait running out is the release not becoming ready: final.
        (RuntimeError("UPGRADE FAILED: context deadline exceeded"), False),
    ],
)
def test_is_transient_error(exc: BaseException, transient: bool) -> None:
    assert is_transient_error(exc) is transient


def test_retry_transient_retries_only_transient_errors() -> None:
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ApiException(status=429, reason="Too Many Requests")
        return "ok"

    assert retry_transient(flaky, first_delay_s=0.01) == "ok" and len(calls) == 3

    def broken():
        calls.append(1)
        raise ApiException(status=422, reason="Unprocessable Entity")

    calls.clear()
    with pytest.raises(ApiException):
        retry_transient(broken, first_delay_s=0.01)
    assert len(calls) == 1


def attempts_of_failing_task(error: Exception, timeout_s: float, attempt_takes_s: float = 0.0) -> int:
    """How many times a Prefect task with 3 retries runs when every attempt fails with `error`, its retry
    condition being transient_within(timeout_s)."""
    import time

    from prefect import flow, task

    attempts = []

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=transient_within(timeout_s))
    def failing() -> None:
        attempts.append(1)
        time.sleep(attempt_takes_s)
        raise error

    @flow
    def run() -> None:
        failing(return_state=True)

    run()
    return len(attempts)


def test_transient_failures_are_retried_within_the_timeout_only(prefect_server) -> None:
    timeout = RuntimeError("Timeout: request did not complete within requested timeout - context deadline exceeded")
    assert attempts_of_failing_task(timeout, timeout_s=60) == 4
    # The first try alone took longer than the timeout: no second one.
    assert attempts_of_failing_task(timeout, timeout_s=1, attempt_takes_s=1.2) == 1
    # Counted from the first try, not from each: three tries of 1.2 s are past a 3 s timeout.
    assert attempts_of_failing_task(timeout, timeout_s=3, attempt_takes_s=1.2) <= 3
    assert attempts_of_failing_task(RuntimeError("values don't meet the schema"), timeout_s=60) == 1
