"""The install phases, in the order they run: the one list the install flow, the CLI's phase options and the
checks of prefect.yaml read. Pure data; flows/install.py maps each name to the flow that runs it.

Monitoring comes before the GPU Operator so that the ServiceMonitor CRD exists when dcgm-exporter needs it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class InstallPhase:
    name: str
    # The deepops_services entry that switches the phase on; None: the phase always runs.
    service: str | None = None


INSTALL_PHASES: tuple[InstallPhase, ...] = (
    InstallPhase("preflight"),
    InstallPhase("kubespray"),
    InstallPhase("monitoring", "monitoring_stack"),
    InstallPhase("gpu-operator", "gpu-operator"),
    InstallPhase("slurm", "slurm"),
    InstallPhase("dashboard", "k8s-dashboard"),
    InstallPhase("validate"),
)
PHASE_NAMES: tuple[str, ...] = tuple(p.name for p in INSTALL_PHASES)
# A phase name as a parameter type (validated by pydantic, listed in the Prefect UI's parameter form).
PhaseName = Literal[PHASE_NAMES]  # type: ignore[valid-type]


def selected_phases(only: Iterable[str] = (), from_phase: str | None = None) -> list[InstallPhase]:
    """The phases a run covers, in catalogue order: `only` these, or every phase from `from_phase` on."""
    if only:
        wanted = set(only)
        return [p for p in INSTALL_PHASES if p.name in wanted]
    start = PHASE_NAMES.index(from_phase) if from_phase else 0
    return list(INSTALL_PHASES[start:])
