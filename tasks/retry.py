"""Which failures are worth another try: the transient ones, never a real error."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

# Words of errors that go away by themselves: an API server restarting, a Helm release lock held by a
# run that was killed a moment ago, a proxy hiccup, the API server's storage not answering in time (its own
# words for a 504: the request timed out in its timeout filter, or etcd did not reply; seen for a minute or two
# after etcd comes back, while the server's per-resource etcd clients wait out their reconnect backoff). Anything
# else (a bad value, a failed rollout) is final.
_TRANSIENT = re.compile(
    r"connection refused|connection reset|"
    r"request did not complete within requested timeout|unable to return a response in the time allotted|"
    r"another operation \(install/upgrade/rollback\) is in progress|"
    r"Kubernetes cluster unreachable|the server is currently unable to handle the request|"
    r"etcdserver: leader changed|TLS handshake timeout|i/o timeout|"
    r"\b(500|502|503|504)\b|Service Unavailable|Internal Server Error|"
    r"Max retries exceeded|RemoteDisconnected|ProtocolError",
    re.IGNORECASE,
)


def is_transient_error(exc: BaseException) -> bool:
    status = getattr(exc, "status", None)
    # 429: the API server's own "retry after" (e.g. "storage is (re)initializing" just after a restart).
    if isinstance(status, int) and (status == 429 or status >= 500):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return bool(_TRANSIENT.search(str(exc)))


def is_transient(state) -> bool:
    """Prefect retry_condition_fn helper: retry only when the failed state holds a transient error."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as raised:  # noqa: BLE001 - whatever the state held
        exc = raised
    return isinstance(exc, BaseException) and is_transient_error(exc)


def transient_within(timeout_s: float) -> Callable[[Any, Any, Any], bool]:
    """Prefect retry_condition_fn: retry a transient error only while less than `timeout_s` has passed since the
    task run's first attempt began, so that retries never stretch a phase far past the timeout it was given."""

    def condition(task, task_run, state) -> bool:
        started = task_run.start_time
        elapsed = (datetime.now(UTC) - started).total_seconds() if started else 0.0
        return elapsed < timeout_s and is_transient(state)

    return condition


def retry_transient(fn, *, attempts: int = 6, first_delay_s: float = 1.0, max_delay_s: float = 8.0):
    """Call `fn()`; on a transient error wait (1, 2, 4, 8, 8 s) and try again, at most `attempts` times."""
    import time

    delay = first_delay_s
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - only transient errors are retried, the rest re-raised
            if attempt == attempts - 1 or not is_transient_error(exc):
                raise
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)
    raise AssertionError("unreachable")
