"""Failure notifications: a failed or unhealthy run reaches people through the config's Apprise URL or
Prefect notification block, naming the cluster, the flow and the top reasons."""

from __future__ import annotations

import logging

from flows.common import ClusterParams, desired_state

log = logging.getLogger("gpuforge.notify")


def message_for(cluster: str, flow_name: str, reasons: list[str]) -> tuple[str, str]:
    subject = f"gpuforge: {flow_name} failed on cluster {cluster}"
    body = "\n".join(f"- {r}" for r in reasons[:5]) or "- (no reason recorded)"
    return subject, body


def send(config, subject: str, body: str) -> bool:
    """Deliver to the config's notification target; False when none is configured."""
    target = config.notifications
    if target.block:
        from prefect.blocks.core import Block

        Block.load(target.block).notify(body=body, subject=subject)
        return True
    if target.url:
        import apprise

        sender = apprise.Apprise()
        if not sender.add(target.url):
            raise ValueError(f"notifications.url is not a URL Apprise understands: {target.url.split('://')[0]}://...")
        if not sender.notify(title=subject, body=body):
            raise RuntimeError(f"notification to {target.url.split('://')[0]}://... was not delivered")
        return True
    return False


def notify_failure(flow, flow_run, state) -> None:
    """on_failure / on_crashed hook of the scheduled and install flows."""
    try:
        params = ClusterParams.model_validate(dict(flow_run.parameters.get("params") or {}))
        config = desired_state(params).config
    except Exception as exc:  # noqa: BLE001 - a hook must not hide the run's own failure
        log.warning("no notification: the run's config cannot be read (%s)", exc)
        return
    reasons = [line for line in (state.message or "").splitlines() if line.strip()]
    subject, body = message_for(config.cluster_name, flow.name, reasons)
    try:
        if send(config, subject, body):
            log.info("notified: %s", subject)
    except Exception as exc:  # noqa: BLE001
        log.warning("notification failed: %s", exc)
