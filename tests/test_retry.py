"""Which errors gpuforge retries: plain functions, no cluster."""

from __future__ import annotations

import pytest
from kubernetes.client.rest import ApiException

from tasks.retry import is_transient_error, retry_transient


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
