"""Which failures are worth another try: the transient ones, never a real error."""

from __future__ import annotations

import re

# Words of errors that go away by themselves: an API server restarting, a Helm release lock held by a
# run that was killed a moment ago, a proxy hiccup. Anything else (a bad value, a failed rollout) is final.
_TRANSIENT = re.compile(
    r"connection refused|connection reset|"
    r"another operation \(install/upgrade/rollback\) is in progress|"
    r"Kubernetes cluster unreachable|the server is currently unable to handle the request|"
    r"etcdserver: leader changed|TLS handshake timeout|i/o timeout|"
    r"\b(500|502|503|504)\b|Service Unavailable|Internal Server Error|"
    r"Max retries exceeded|RemoteDisconnected|ProtocolError",
    re.IGNORECASE,
)


def is_transient_error(exc: BaseException) -> bool:
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status >= 500:
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
