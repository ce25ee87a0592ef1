"""The metric contract: the dcgm-exporter metric names, labels and units gpuforge's GPU health rules, the
validation's DCGM check, the GPU dashboard and the alert rules are written against, per exporter version.

gpuforge pins the GPU Operator, and the GPU Operator pins dcgm-exporter (its chart's `dcgmExporter.version`).
An upgrade of the GPU Operator can therefore rename a metric or a label, or change a unit, under every rule
that reads it: a PromQL selector on a name that no longer exists answers nothing, and "no data" looks like a
quiet fleet. This module keeps those facts as data, one :class:`Contract` per exporter version, so that

* the readers (health, validation, dashboard, alerts) can take their names from the contract of the pinned
  exporter instead of string constants of their own,
* :func:`diff` says what an upgrade changes (``gpuforge upgrade plan`` prints it), and
* :func:`explain_missing` turns a missing metric into a named rename ("DCGM_FI_X missing: renamed to
  DCGM_FI_Y in 4.9.0"), never a silent "no data".

Each metric is keyed by its *role* (the value key of ``gpuforge.health``: ``gpu_temp``, ``fb_used`` …), which is
what stays the same when the exporter renames the metric that carries it.

Sources, read at the tags named (NVIDIA/dcgm-exporter):

* 4.5.3-4.8.2 (GPU Operator v26.3.3, ``dcgmExporter.version: 4.5.3-4.8.2-distroless`` in its values.yaml): metric
  names and units from ``etc/default-counters.csv`` and ``etc/dcp-metrics-included.csv`` at that tag (units as
  their help texts give them: "(in C)", "(in W)", "(in MiB)", "(in %)"); the node label ``Hostname`` from
  ``internal/pkg/rendermetrics/render_metrics.go`` at that tag.
* 4.6.0-4.8.3 (GPU Operator v26.7.0, ``4.6.0-4.8.3-distroless``): the same metric names (the CSVs at the tag
  are unchanged); the node label renamed ``Hostname`` -> ``hostname`` by commit d5e5f51 ("Rename Hostname label
  to hostname (#655)", 2026-05-12), released in 4.6.0-4.8.3 (its release notes: "Rename the Hostname label to
  hostname (#655)").
* 4.9.0 (no GPU Operator release ships it yet): its release notes say it renames "the 23 default and
  profiling-preset fields that DCGM 4.7 deprecates to their new DCGM 4.7 names", eleven with a new unit
  ("clocks from MHz to hertz ... GPU memory from MiB to bytes ..."), and renames the driver-version label
  ``DCGM_FI_DRIVER_VERSION`` -> ``DCGM_FI_SYSTEM_DRIVER_VERSION``. The new names below are DCGM 4.7's canonical
  field identifiers (DCGM "Field Identifiers" reference; go-dcgm's alias tables) for the fields gpuforge reads;
  the 4.9.0 tag's CSV itself was not available here, so the 4.9.0 entry is ``verified=False`` until it is.

Fields gpuforge reads that are not in the exporter's default CSV (ECC, NVLink errors, PCIe link, power limit,
row-remap pending, clock-event reasons, the XID counter) come from gpuforge's own collector ConfigMap
(``gpuforge.render.DCGM_COUNTERS``); their names are DCGM's field names and follow the same renames.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuforge import pins

# Units, spelled once so that a unit change is a plain inequality.
CELSIUS, WATT, MIB, BYTE, PERCENT, COUNT, FLAG, BITMASK, XID, GENERATION, LANES = (
    "°C",
    "W",
    "MiB",
    "B",
    "%",
    "count",
    "0/1",
    "bitmask",
    "XID code",
    "PCIe generation",
    "lanes",
)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # Prometheus type: gauge or counter
    unit: str


@dataclass(frozen=True)
class Contract:
    """What one dcgm-exporter version serves under the names gpuforge reads."""

    exporter: str  # dcgm-exporter's own version (the part after the DCGM version in its tags)
    tag: str  # the release tag, <DCGM version>-<exporter version>
    gpu_operator: tuple[str, ...]  # GPU Operator releases whose chart pins this exporter
    labels: dict[str, str]  # label role (node, model, gpu, uuid, driver) -> label name
    metrics: dict[str, Metric]  # value role (gpuforge.health's keys) -> metric
    verified: bool = True  # False: names derived from release notes, not read from the tag's files

    def metric(self, role: str) -> str:
        return self.metrics[role].name

    def role_of(self, name: str) -> str | None:
        return next((role for role, m in self.metrics.items() if m.name == name), None)


def _metrics(**rows: tuple[str, str, str]) -> dict[str, Metric]:
    return {role: Metric(*row) for role, row in rows.items()}


# The metrics every contract up to 4.8.x serves (names are DCGM's pre-4.7 field names).
_METRICS_4_8 = _metrics(
    gpu_temp=("DCGM_FI_DEV_GPU_TEMP", "gauge", CELSIUS),
    memory_temp=("DCGM_FI_DEV_MEMORY_TEMP", "gauge", CELSIUS),
    power_usage=("DCGM_FI_DEV_POWER_USAGE", "gauge", WATT),
    power_limit=("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", "gauge", WATT),
    gpu_util=("DCGM_FI_DEV_GPU_UTIL", "gauge", PERCENT),
    fb_used=("DCGM_FI_DEV_FB_USED", "gauge", MIB),
    fb_free=("DCGM_FI_DEV_FB_FREE", "gauge", MIB),
    ecc_sbe_vol=("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", COUNT),
    ecc_dbe_vol=("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", COUNT),
    remap_correctable=("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", COUNT),
    remap_uncorrectable=("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter", COUNT),
    remap_pending=("DCGM_FI_DEV_ROW_REMAP_PENDING", "gauge", FLAG),
    remap_failure=("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", FLAG),
    clock_event_reasons=("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "gauge", BITMASK),
    pcie_link_gen=("DCGM_FI_DEV_PCIE_LINK_GEN", "gauge", GENERATION),
    pcie_link_width=("DCGM_FI_DEV_PCIE_LINK_WIDTH", "gauge", LANES),
    pcie_link_gen_max=("DCGM_FI_DEV_PCIE_MAX_LINK_GEN", "gauge", GENERATION),
    pcie_link_width_max=("DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH", "gauge", LANES),
    xid_last=("DCGM_FI_DEV_XID_ERRORS", "gauge", XID),
    xid_count=("DCGM_EXP_XID_ERRORS_COUNT", "gauge", COUNT),
    nvlink_crc_flit=("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "counter", COUNT),
    nvlink_crc_data=("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "counter", COUNT),
    nvlink_replay=("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "counter", COUNT),
    nvlink_recovery=("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "counter", COUNT),
)

_LABELS_4_8_2 = {
    "node": "Hostname",
    "model": "modelName",
    "gpu": "gpu",
    "uuid": "UUID",
    "driver": "DCGM_FI_DRIVER_VERSION",
}

CONTRACTS: dict[str, Contract] = {
    c.exporter: c
    for c in (
        Contract("4.8.2", "4.5.3-4.8.2", ("v26.3.3",), _LABELS_4_8_2, _METRICS_4_8),
        Contract("4.8.3", "4.6.0-4.8.3", ("v26.7.0",), {**_LABELS_4_8_2, "node": "hostname"}, _METRICS_4_8),
        Contract(
            "4.9.0",
            "4.9.0",
            (),
            {**_LABELS_4_8_2, "node": "hostname", "driver": "DCGM_FI_SYSTEM_DRIVER_VERSION"},
            {
                **_METRICS_4_8,
                **_metrics(
                    gpu_temp=("DCGM_FI_DEV_GPU_TEMP_CELSIUS", "gauge", CELSIUS),
                    memory_temp=("DCGM_FI_DEV_MEMORY_TEMP_CELSIUS", "gauge", CELSIUS),
                    power_usage=("DCGM_FI_DEV_BOARD_POWER_WATTS", "gauge", WATT),
                    fb_used=("DCGM_FI_DEV_FB_USED_BYTES", "gauge", BYTE),
                    fb_free=("DCGM_FI_DEV_FB_FREE_BYTES", "gauge", BYTE),
                    remap_correctable=("DCGM_FI_DEV_ROW_REMAP_CORRECTABLE_TOTAL", "counter", COUNT),
                    remap_uncorrectable=("DCGM_FI_DEV_ROW_REMAP_UNCORRECTABLE_TOTAL", "counter", COUNT),
                    remap_failure=("DCGM_FI_DEV_ROW_REMAP_FAILED", "gauge", FLAG),
                    xid_last=("DCGM_FI_DEV_XID_ERROR", "gauge", XID),
                ),
            },
            verified=False,
        ),
    )
}

_TAG = re.compile(r"^(?P<dcgm>\d+\.\d+\.\d+)-(?P<exporter>\d+\.\d+\.\d+)(?:-[\w.]+)?$|^(?P<alone>\d+\.\d+\.\d+)$")


class UnknownExporter(ValueError):
    """An exporter image tag gpuforge has no contract for."""


def exporter_version(image_tag: str) -> str:
    """dcgm-exporter's own version from an image tag: "4.6.0-4.8.3-distroless" -> "4.8.3" (DCGM 4.6.0's build).
    From 4.9.0 on the tags carry the exporter version alone."""
    m = _TAG.match(image_tag.strip())
    if not m:
        raise UnknownExporter(f"dcgm-exporter image tag {image_tag!r} is not <dcgm>-<exporter>[-variant]")
    return m["exporter"] or m["alone"]


def contract_for(image_tag: str) -> Contract:
    version = exporter_version(image_tag)
    if version not in CONTRACTS:
        known = ", ".join(CONTRACTS)
        raise UnknownExporter(
            f"no metric contract for dcgm-exporter {version} (image tag {image_tag}); gpuforge knows {known}: "
            "add its names, labels and units to gpuforge/metric_contract.py before pinning it"
        )
    return CONTRACTS[version]


def for_gpu_operator(chart_version: str) -> Contract:
    """The contract of the exporter a GPU Operator release's chart pins (its default `dcgmExporter.version`):
    what the readers use unless the config overrides that value (then: :func:`contract_for` of the override)."""
    for contract in CONTRACTS.values():
        if chart_version in contract.gpu_operator:
            return contract
    raise UnknownExporter(
        f"no metric contract for the dcgm-exporter of GPU Operator {chart_version}: read its chart's "
        "dcgmExporter.version and add that exporter to gpuforge/metric_contract.py"
    )


def of_gpu_operator_release(chart_version: str, values: Mapping[str, Any]) -> Contract:
    """The contract of the exporter a GPU Operator release runs: the image tag its values set
    (`dcgmExporter.version`, a config override), else the one its chart pins."""
    tag = (values.get("dcgmExporter") or {}).get("version")
    return contract_for(str(tag)) if tag else for_gpu_operator(chart_version)


def of_live_release(chart_version: str | None, values: Mapping[str, Any], desired: Contract) -> Contract:
    """The contract of the exporter running now, from the live gpu-operator release's chart version and values
    (None: not installed): what a check of the series served now reads while an upgrade moves the pin. `desired`
    where nothing runs yet or the live exporter is one no table describes (its checks then name the renames)."""
    if chart_version is None:
        return desired
    try:
        return of_gpu_operator_release(chart_version, values)
    except UnknownExporter:
        return desired


#: The contract of the exporter the pinned GPU Operator ships: what every reader uses unless told otherwise.
PINNED: Contract = for_gpu_operator(next(pin[4] for pin in pins.CHARTS["gpu-operator"] if pin[0] == "gpu-operator"))

#: The NVLink error counters' roles: the health rules judge their sum.
NVLINK_ROLES = ("nvlink_crc_flit", "nvlink_crc_data", "nvlink_replay", "nvlink_recovery")


@dataclass(frozen=True)
class Change:
    """One difference between two contracts; `role` is the value or label role."""

    kind: str  # "metric renamed", "unit changed", "label renamed", "metric removed", "metric added"
    role: str
    old: str
    new: str
    detail: str = ""

    def line(self) -> str:
        arrow = f"{self.old} -> {self.new}" if self.old and self.new else self.old or self.new
        return f"{self.kind}: {self.role}: {arrow}{f' ({self.detail})' if self.detail else ''}"


@dataclass(frozen=True)
class ContractDiff:
    old: str  # exporter versions
    new: str
    changes: tuple[Change, ...] = field(default_factory=tuple)

    def of(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]

    def lines(self) -> list[str]:
        return [c.line() for c in self.changes]


def diff(old: Contract, new: Contract) -> ContractDiff:
    """What moving from `old` to `new` changes for gpuforge's readers: renamed metrics (with their unit change, if
    any), unit changes under the same name, renamed labels, metrics gone and metrics new."""
    changes: list[Change] = []
    for role, before in old.metrics.items():
        after = new.metrics.get(role)
        if after is None:
            changes.append(Change("metric removed", role, before.name, ""))
            continue
        units = f"unit {before.unit} -> {after.unit}" if before.unit != after.unit else ""
        if before.name != after.name:
            changes.append(Change("metric renamed", role, before.name, after.name, units))
        elif units:
            changes.append(Change("unit changed", role, before.name, after.name, units))
    changes += [Change("metric added", role, "", m.name) for role, m in new.metrics.items() if role not in old.metrics]
    changes += [
        Change("label renamed", role, name, new.labels[role])
        for role, name in old.labels.items()
        if role in new.labels and new.labels[role] != name
    ]
    return ContractDiff(old.exporter, new.exporter, tuple(changes))


# How many of the second unit make one of the first: what a reader needs to keep its thresholds (written in the
# units of RULE_UNITS) when the exporter serves another unit.
_FACTORS: dict[tuple[str, str], float] = {(BYTE, MIB): 1 / 2**20, (MIB, BYTE): float(2**20)}

#: The units gpuforge's rules are written in (health thresholds, alert expressions, dashboard panels): 4.8's.
RULE_UNITS: dict[str, str] = {role: m.unit for role, m in _METRICS_4_8.items()}


def in_rule_units(role: str, value: float, contract: Contract) -> float:
    """A value `contract`'s exporter served for `role`, in the unit the rules are written in."""
    have, want = contract.metrics[role].unit, RULE_UNITS[role]
    if have == want:
        return value
    if (have, want) not in _FACTORS:
        raise UnknownExporter(f"{role}: no conversion from {have} to {want} (dcgm-exporter {contract.exporter})")
    return value * _FACTORS[(have, want)]


def reading_roles() -> dict[str, tuple[str, float]]:
    """Every metric name any known exporter version serves -> (its role, the factor that brings its values to
    the rules' units). Readers parse with it, so that a series is understood under whichever spelling the running
    exporter uses; which names they *ask* for follows one contract."""
    table: dict[str, tuple[str, float]] = {}
    for contract in CONTRACTS.values():
        for role, metric in contract.metrics.items():
            table[metric.name] = (role, in_rule_units(role, 1.0, contract))
    return table


def _by_version(versions: Iterable[str]) -> list[str]:
    return sorted(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def _spellings(role: str) -> dict[str, Metric]:
    """Every known exporter version's metric for `role`, oldest version first."""
    return {v: CONTRACTS[v].metrics[role] for v in _by_version(CONTRACTS) if role in CONTRACTS[v].metrics}


def _renamed_in(role: str, name: str) -> str:
    """The first exporter version that spells `role` as `name` after an older one spelled it otherwise."""
    previous = None
    for version, m in _spellings(role).items():
        if m.name == name and previous is not None and previous != name:
            return version
        previous = m.name
    return next(v for v, m in _spellings(role).items() if m.name == name)


def _unit_note(before: Metric, after: Metric) -> str:
    return f", unit {before.unit} -> {after.unit}" if before.unit != after.unit else ""


def explain_missing(metric: str, contract: Contract, present: Collection[str] = ()) -> str:
    """Why `metric` is missing from what Prometheus holds (`present`: the metric names it does hold), for a
    cluster whose pinned exporter has `contract`. Names the rename whenever a known exporter version spells the
    same role differently:

    * `metric` is not the contract's name (a rule still written against another version): "renamed to Y in V";
    * another version's spelling is present: the running exporter is not the pinned one;
    * a later version renames it: the exporter may be newer than the pin."""
    role = contract.role_of(metric) or next(filter(None, (c.role_of(metric) for c in CONTRACTS.values())), None)
    if role is None:
        return f"{metric} missing (not a metric of any dcgm-exporter contract gpuforge knows)"
    spellings = _spellings(role)
    if contract.role_of(metric) is None:
        if role not in contract.metrics:
            return f"{metric} missing: dcgm-exporter {contract.exporter} no longer serves it"
        now = contract.metrics[role]
        before = next(m for m in spellings.values() if m.name == metric)
        return (
            f"{metric} missing: renamed to {now.name} in dcgm-exporter {_renamed_in(role, now.name)}"
            f"{_unit_note(before, now)}"
        )
    expected = contract.metrics[role]
    for version, m in spellings.items():
        if m.name != metric and m.name in present:
            return (
                f"{metric} missing: the exporter serves {m.name} instead (dcgm-exporter {version}'s name"
                f"{_unit_note(expected, m)}): the running exporter is not {contract.exporter}, the pinned one"
            )
    for version, m in spellings.items():
        if _by_version([version, contract.exporter])[0] == contract.exporter and m.name != metric:
            return (
                f"{metric} missing: renamed to {m.name} in dcgm-exporter {version}{_unit_note(expected, m)} "
                f"(is the exporter newer than the pinned {contract.exporter}?)"
            )
    return (
        f"{metric} missing: no dcgm-exporter version gpuforge knows renamed it; check the exporter's collector "
        "CSV (gpuforge's ConfigMap) and that the exporter pods run"
    )


def explain_missing_label(role: str, contract: Contract, labels: Collection[str]) -> str | None:
    """None when the series carry the label the contract names for `role`; else which spelling they carry."""
    expected = contract.labels[role]
    if expected in labels:
        return None
    for version in _by_version(CONTRACTS):
        other = CONTRACTS[version].labels.get(role)
        if other and other != expected and other in labels:
            return (
                f"label {expected} missing: the series carry {other} (dcgm-exporter {version}'s spelling), "
                f"gpuforge is configured for {contract.exporter}"
            )
    return f"label {expected} missing from the dcgm-exporter series"
