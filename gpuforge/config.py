"""The one configuration model: DeepOps' `config.yml`, verbatim, plus what a real install needs.

Every command (`plan`, `install`, `validate`, `drift`, `health`, `lab`) derives its desired state from
`Config`. Loading never touches anything: a bad file raises `ConfigError`, whose issues each render as one
line `file:line:column: field.path: what is wrong; what to do`.

Pure domain code: no Prefect, no clients.
"""

from __future__ import annotations

import codecs
import difflib
import ipaddress
import os
import re
import zoneinfo
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from gpuforge import pins
from gpuforge.health import Thresholds


class Role(StrEnum):
    CONTROL_PLANE = "control-plane"
    ETCD = "etcd"
    SCHEDULABLE = "schedulable"
    GPU_WORKER = "gpu-worker"
    CPU_WORKER = "cpu-worker"


class Remediation(StrEnum):
    OFF = "off"
    CORDON = "cordon"
    CORDON_DRAIN_SLURM = "cordon+drain-slurm"


# Kubernetes label syntax (k8s.io/apimachinery validation): optional DNS-subdomain prefix, then a name.
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# POSIX portable user names (useradd's default NAME_REGEX, at most 32 characters): the SSH login that Ansible
# puts on command lines, so nothing a shell would read as syntax.
_POSIX_USER = re.compile(r"^[a-z_][a-z0-9_-]*\$?$")
# A config larger than this is not a config (a log, a disk image, the wrong --config path); reading and parsing
# it would take long for nothing. About 50,000 nodes of one flow-style line each fit in it.
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def label_key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key prefix {prefix!r} is not a DNS subdomain (lowercase letters, digits, '-', '.')"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return (
            f"label key {key!r} is invalid: the name part must be 1-63 characters of letters, digits, "
            "'-', '_', '.', starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: str) -> str | None:
    if len(value) > 63 or not _LABEL_NAME.match(value):
        return (
            f"label value {value!r} is invalid: at most 63 characters of letters, digits, '-', '_', '.', "
            "starting and ending with a letter or digit (or empty)"
        )
    return None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Taint(_Model):
    key: str
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if problem := label_key_problem(v):
            raise ValueError(problem)
        return v

    def kubespray(self) -> str:
        return f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"


class Node(_Model):
    ip: str
    role: list[Role] = Field(min_length=1)
    name: str | None = None
    gpu_count: StrictInt | None = Field(default=None, ge=1, le=64)
    gpu_model: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)
    # GPU workers join the Slurm GPU NodeSets unless this is false (their GPUs stay for Kubernetes jobs).
    slurm: StrictBool = True

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Address(v))
        except ValueError:
            pass
        try:
            ipaddress.IPv6Address(v)
        except ValueError:
            raise ValueError(f'{v!r} is not an IPv4 address; write it as four numbers like "192.168.1.11"') from None
        # Kubespray could take it, but gpuforge's CIDRs, inventory and checks are IPv4 only.
        raise ValueError(
            f"{v!r} is an IPv6 address; gpuforge installs IPv4 clusters only: give the node's IPv4 address"
        )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 63 or not _DNS_LABEL.match(v)):
            raise ValueError(f"{v!r} must be a DNS label: lowercase letters, digits and '-', at most 63 characters")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not isinstance(value, str):
                raise ValueError(f"label {key!r} must have a string value; quote it")
            if problem := label_key_problem(key) or label_value_problem(value):
                raise ValueError(problem)
        return v

    @property
    def is_gpu(self) -> bool:
        return Role.GPU_WORKER in self.role

    @property
    def is_control_plane(self) -> bool:
        return Role.CONTROL_PLANE in self.role

    @property
    def is_etcd(self) -> bool:
        return Role.ETCD in self.role

    @property
    def is_worker(self) -> bool:
        return bool({Role.SCHEDULABLE, Role.GPU_WORKER, Role.CPU_WORKER} & set(self.role))


class ChartPin(_Model):
    """Where one Helm release's chart comes from: a repo URL, an OCI registry, or a local chart path."""

    repo: str | None = None
    chart: str | None = None
    version: str | None = None
    path: str | None = None
    values: dict[str, Any] = Field(default_factory=dict)
    values_file: str | None = None


class Service(_Model):
    enabled: StrictBool
    releases: dict[str, ChartPin] = Field(default_factory=dict)


class Services(_Model):
    gpu_operator: Service = Field(default_factory=lambda: Service(enabled=False), alias="gpu-operator")
    k8s_dashboard: Service = Field(default_factory=lambda: Service(enabled=False), alias="k8s-dashboard")
    monitoring_stack: Service = Field(default_factory=lambda: Service(enabled=False))
    slurm: Service = Field(default_factory=lambda: Service(enabled=False))

    def by_key(self) -> dict[str, Service]:
        return {
            "monitoring_stack": self.monitoring_stack,
            "gpu-operator": self.gpu_operator,
            "slurm": self.slurm,
            "k8s-dashboard": self.k8s_dashboard,
        }


def _version_ranges(versions: tuple[str, ...]) -> str:
    """'1.33.0-1.33.11, 1.34.0-1.34.7': each minor release's patch range, oldest first."""
    patches: dict[tuple[int, int], list[int]] = {}
    for v in versions:
        major, minor, patch = (int(x) for x in v.split("."))
        patches.setdefault((major, minor), []).append(patch)
    return ", ".join(
        f"{major}.{minor}.{min(p)}-{major}.{minor}.{max(p)}" for (major, minor), p in sorted(patches.items())
    )


class Kubespray(_Model):
    version: str = pins.KUBESPRAY_VERSION
    kube_version: str = pins.KUBE_VERSION
    # Kubespray at `version`: a checkout (a folder holding cluster.yml) or a release tarball (.tar.gz, extracted
    # once into the cache). Unset: the `version` tag, cloned once into the cache (needs GitHub). Relative paths
    # are taken from the config file's folder. Either way its galaxy.yml must name `version`.
    checkout: str | None = None
    # A venv that holds Kubespray's pinned ansible. Unset: gpuforge builds one from the checkout's
    # requirements.txt (from the package index, once per requirements.txt) and caches it.
    venv: str | None = None
    # The playbook to run: a path inside the checkout (cluster.yml, scale.yml, ...), or your own playbook when it
    # starts with ./ or ../ or / (then taken from the config file's folder, like every path here; it runs with
    # the checkout as its working directory, and `gpuforge_kubespray_dir` names the checkout).
    playbook: str = "cluster.yml"
    # Kubespray tags not to run (ansible-playbook --skip-tags).
    skip_tags: list[str] = Field(default_factory=list)
    container_manager: Literal["containerd", "crio", "docker"] = "containerd"
    network_plugin: Literal["calico", "cilium", "flannel", "kube-ovn", "kube-router", "custom_cni", "cni"] = "calico"
    service_cidr: str = "10.233.0.0/18"
    pod_cidr: str = "10.233.64.0/18"
    extra_vars: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kube_version")
    @classmethod
    def _kube_version(cls, v: str, info: ValidationInfo) -> str:
        if not re.fullmatch(r"\d+\.\d+\.\d+", v):
            raise ValueError(f"{v!r} must look like \"1.35.4\" (no leading 'v', as Kubespray wants)")
        # Only the pinned release's list is known here; another release's own inventory asserts judge the version.
        if info.data.get("version") == pins.KUBESPRAY_VERSION and v not in pins.KUBE_VERSIONS:
            raise ValueError(
                f"{v} is not supported by Kubespray {pins.KUBESPRAY_VERSION} (it supports "
                f"{_version_ranges(pins.KUBE_VERSIONS)}); use one of those, such as {pins.KUBE_VERSION}"
            )
        return v

    @field_validator("playbook")
    @classmethod
    def _playbook(cls, v: str) -> str:
        if not v.endswith((".yml", ".yaml")):
            raise ValueError(f'{v!r} is not a playbook; name a .yml file such as "cluster.yml"')
        return v

    def own_playbook(self) -> bool:
        """Whether `playbook` is the operator's own file rather than one of the checkout's."""
        return self.playbook.startswith(("./", "../", "/", "~"))

    @field_validator("service_cidr", "pod_cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Network(v, strict=True))
        except ValueError as exc:
            raise ValueError(f'{v!r} is not a valid IPv4 CIDR ({exc}); write it like "10.233.0.0/18"') from None


class Health(_Model):
    # Per GPU model family ("H100", "H200", "A100", "default"): overrides of gpuforge.health's defaults.
    thresholds: dict[str, Thresholds] = Field(default_factory=dict)


class Notifications(_Model):
    # An Apprise URL (e.g. "json://127.0.0.1:8080/hook", "slack://...") or a plain webhook URL.
    url: str | None = None
    # Or the name of a Prefect notification block.
    block: str | None = None


class Timeouts(_Model):
    """Seconds each phase may take before it fails."""

    preflight: StrictInt = Field(600, ge=1)
    kubespray: StrictInt = Field(7200, ge=1)
    monitoring: StrictInt = Field(900, ge=1)
    gpu_operator: StrictInt = Field(900, ge=1, alias="gpu-operator")
    slurm: StrictInt = Field(900, ge=1)
    dashboard: StrictInt = Field(600, ge=1)
    validate_: StrictInt = Field(900, ge=1, alias="validate")


class Validation(_Model):
    cuda_image: str = pins.CUDA_SMOKE_IMAGE
    slurm_namespace: str = "slurm"


class Drift(_Model):
    # JSON pointers (e.g. "/helm/gpu-operator/values/driver/version") whose differences are known and accepted.
    ignore: list[str] = Field(default_factory=list)

    @field_validator("ignore")
    @classmethod
    def _pointers(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/"):
                raise ValueError(f"{p!r} must be a JSON pointer starting with '/'")
        return v


class Config(_Model):
    # --- DeepOps' config.yml, as in the seed ---
    ansible_user: str = "root"
    ansible_ssh_private_key_file: str | None = None
    # Python on the nodes; Ansible discovers it when unset.
    ansible_python_interpreter: str | None = None
    k8s_cluster_nodes: list[Node] = Field(min_length=1)
    deepops_services: Services = Field(default_factory=Services)
    # --- gpuforge extensions, all optional ---
    cluster_name: str = "gpuforge"
    timezone: str = "UTC"
    # A Prefect Secret block holding the SSH private key, instead of a key file.
    ansible_ssh_private_key_secret: str | None = None
    # SSH host keys, kept in the cluster's known_hosts beside its state (gpuforge.hostkeys): `accept-new` pins a
    # host's key on first use and refuses a changed one; `strict` takes only keys already pinned there or listed
    # in ssh_known_hosts; `off` checks nothing.
    ssh_host_key_checking: Literal["accept-new", "strict", "off"] = "accept-new"
    # A known_hosts file of host keys you checked out of band (e.g. from ssh-keyscan, compared with
    # `ssh-keygen -lf` on each host); relative to the config file's folder.
    ssh_known_hosts: str | None = None
    kubeconfig: str | None = None
    prometheus_url: str | None = None
    # A folder of packaged charts named as `helm pull` names them (<chart>-<version>.tgz), consulted before the
    # chart repositories (air-gapped sites); relative to the config file's folder. $GPUFORGE_CHART_MIRROR
    # stands in when this is unset.
    chart_mirror: str | None = None
    kubespray: Kubespray = Field(default_factory=Kubespray)
    health: Health = Field(default_factory=Health)
    remediate: Remediation = Remediation.OFF
    remediation_max_fraction: float = Field(0.25, gt=0, le=1)
    notifications: Notifications = Field(default_factory=Notifications)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    validation: Validation = Field(default_factory=Validation)
    drift: Drift = Field(default_factory=Drift)

    # Folder of the config file: relative paths in the config are taken from here.
    base_dir: Path = Field(default=Path("."), exclude=True)
    source: str = Field(default="<config>", exclude=True)

    @field_validator("ansible_user")
    @classmethod
    def _ansible_user(cls, v: str) -> str:
        if len(v) > 32 or not _POSIX_USER.match(v):
            raise ValueError(
                f"{v!r} is not a user name: at most 32 lowercase letters, digits, '_' and '-', starting with a "
                "letter or '_'; write the login name on the nodes, such as \"ubuntu\""
            )
        return v

    @field_validator("cluster_name")
    @classmethod
    def _cluster_name(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > 40:
            raise ValueError(f"{v!r} must be lowercase letters, digits and '-', at most 40 characters")
        return v

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f'{v!r} is not an IANA time zone such as "Europe/Berlin" or "UTC"') from None
        return v

    @field_validator("prometheus_url")
    @classmethod
    def _prom_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f'{v!r} must be an http(s) URL like "http://127.0.0.1:9090"')
        return v.rstrip("/") if v else v

    # --- derived views ---
    def path(self, value: str) -> Path:
        """A path from the config: `~` expanded, relative to the config file's folder."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def nodes(self) -> list[NamedNode]:
        return name_nodes(self.k8s_cluster_nodes)

    @property
    def gpu_nodes(self) -> list[NamedNode]:
        return [n for n in self.nodes if n.spec.is_gpu]

    @property
    def slurm_gpu_nodes(self) -> list[NamedNode]:
        return [n for n in self.gpu_nodes if n.spec.slurm]

    def enabled(self, service: str) -> bool:
        return self.deepops_services.by_key()[service].enabled

    def kubeconfig_path(self) -> Path:
        return self.path(self.kubeconfig or "~/.kube/config")


@dataclass(frozen=True)
class NamedNode:
    name: str
    spec: Node


_ROLE_PREFIX = [(Role.CONTROL_PLANE, "cp"), (Role.GPU_WORKER, "gpu"), (Role.CPU_WORKER, "cpu")]


def name_nodes(nodes: list[Node]) -> list[NamedNode]:
    """Give every node its name: the configured one, else `<role prefix>-<n>` in file order (cp-1, gpu-1)."""
    counters: dict[str, int] = {}
    named = []
    for node in nodes:
        if node.name:
            named.append(NamedNode(node.name, node))
            continue
        prefix = next((p for r, p in _ROLE_PREFIX if r in node.role), "node")
        counters[prefix] = counters.get(prefix, 0) + 1
        named.append(NamedNode(f"{prefix}-{counters[prefix]}", node))
    return named


# ----------------------------------------------------------------------------------------------------------
# Errors with file:line:column


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _position(doc: Any, path: tuple[Any, ...]) -> tuple[int, int]:
    """1-based line/column of the deepest element of `path` present in the YAML document."""
    line, col = 1, 1
    node = doc
    for part in path:
        if isinstance(node, CommentedMap) and part in node:
            line, col = node.lc.key(part)
            line, col = line + 1, col + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line, col = node.lc.item(part)
            line, col = line + 1, col + 1
            node = node[part]
        else:
            break
    return line, col


def _value_position(doc: Any, path: tuple[Any, ...]) -> tuple[int, int]:
    """Position of the value at `path` (for a mapping key, where its value starts)."""
    *parent_path, last = path or ("",)
    parent = doc
    for part in parent_path:
        try:
            parent = parent[part]
        except (KeyError, IndexError, TypeError):
            return _position(doc, path)
    if (
        isinstance(parent, CommentedMap)
        and last in parent
        and not isinstance(parent[last], (CommentedMap, CommentedSeq))
    ):
        line, col = parent.lc.value(last)
        return line + 1, col + 1
    return _position(doc, path)


def _known_fields(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Field names (aliases) accepted at `path` inside `model`, to suggest a fix for an unknown key."""
    current: Any = model
    for part in path:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = next(
                (f for n, f in current.model_fields.items() if part in (n, f.alias)),
                None,
            )
            if field is None:
                return []
            current = field.annotation
        elif isinstance(part, int) or getattr(current, "__origin__", None) is dict:
            args = getattr(current, "__args__", ())
            current = args[-1] if args else None
        # unwrap Optional[...] / X | None
        args = getattr(current, "__args__", ())
        if args and type(None) in args:
            current = next(a for a in args if a is not type(None))
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items() if not f.exclude]
    return []


def _intended_key(loc: tuple[Any, ...]) -> str | None:
    """The known key that the unknown key at `loc` most likely means: the same with spaces, or a close spelling."""
    known = _known_fields(Config, loc[:-1])
    field = str(loc[-1])
    if field.strip() in known:
        return field.strip()
    guess = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
    return guess[0] if guess else None


def _message(error: dict[str, Any]) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    field = loc[-1] if loc else ""
    if kind == "extra_forbidden":
        intended = _intended_key(loc)
        if intended == str(field).strip():
            return f"unknown key {field!r}: the spaces around it are part of the key; write {intended!r}"
        if intended:
            return f"unknown key {field!r}; did you mean {intended!r}?"
        return f"unknown key {field!r}; known keys: {', '.join(sorted(_known_fields(Config, loc[:-1])))}"
    if kind == "missing":
        return "is required; add it"
    if kind == "bool_type":
        return (
            f"must be true or false, not {error['input']!r}; write an unquoted YAML boolean "
            '("yes"/"no"/"on" are strings)'
        )
    if kind in ("int_type", "int_parsing"):
        return f"must be a whole number, not {error['input']!r}"
    if kind == "enum":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{error['input']!r} is not allowed; use one of {expected}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{error['input']!r} is not allowed; use one of {expected}"
    if kind == "too_short":
        return "must not be empty; list at least one entry"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"{error['input']!r} is out of range: {error['msg'].lower()}"
    if kind in ("dict_type", "model_type"):
        return f"must be a mapping (key: value), not {type(error['input']).__name__}"
    if kind == "list_type":
        if isinstance(error["input"], str):
            return f"must be a list, not the string {error['input']!r}; write it as [{error['input']}]"
        return f"must be a list, not {type(error['input']).__name__}"
    if kind == "string_type":
        return f"must be a string, not {error['input']!r}; quote it"
    if kind == "value_error":
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return error["msg"]


def _to_plain(node: Any) -> Any:
    if isinstance(node, CommentedMap):
        return {str(k) if not isinstance(k, (str, int)) else k: _to_plain(v) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [_to_plain(v) for v in node]
    return node


def parse_yaml(text: str, source: str) -> Any:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        return yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        dup = re.search(r'duplicate key "([^"]+)"', problem)
        message = (
            f"duplicate key {dup.group(1)!r} in the same mapping; keep one of them"
            if dup
            else f"YAML syntax error: {problem}; fix the YAML there"
        )
        raise ConfigError([ConfigIssue(source, line, col, "", message)]) from None


def read_config_text(path: str | os.PathLike[str]) -> str:
    """The config file's text: UTF-8, with or without a byte-order mark; any other file is a ConfigError."""
    source = str(path)

    def issue(message: str, line: int = 1, column: int = 1) -> ConfigError:
        return ConfigError([ConfigIssue(source, line, column, "", message)])

    try:
        with open(path, "rb") as f:
            # One byte past the limit tells "too large" without reading a huge file (or a pipe) to its end.
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise issue("config file not found; check the --config path") from None
    except OSError as exc:
        raise issue(f"cannot read the config file: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise issue(
            f"the file is larger than {MAX_CONFIG_BYTES // 2**20} MiB, too large for a config; check the --config path"
        )
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise issue("the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    # Editors on Windows save UTF-8 with a byte-order mark: YAML allows it, so it is not an error. It is cut off
    # before decoding, so that a bad byte's position counts from where the user's text starts.
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        column = len(data[line_start : exc.start].decode("utf-8", errors="replace")) + 1
        raise issue(
            f"byte 0x{data[exc.start]:02x} is not UTF-8; save the file as UTF-8",
            data.count(b"\n", 0, exc.start) + 1,
            column,
        ) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError with every problem found."""
    return parse_config(read_config_text(path), str(path), base_dir=Path(path).resolve().parent)


def parse_config(text: str, source: str = "<config>", base_dir: Path | None = None) -> Config:
    doc = parse_yaml(text, source)
    if doc is None:
        raise ConfigError([ConfigIssue(source, 1, 1, "", "the config file is empty; list k8s_cluster_nodes in it")])
    if not isinstance(doc, CommentedMap):
        raise ConfigError(
            [ConfigIssue(source, 1, 1, "", "the config must be a YAML mapping with k8s_cluster_nodes at the top")]
        )
    data = _to_plain(doc)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelt key also leaves the key it meant missing; its "did you mean" line already says both.
        meant = {e["loc"][:-1] + (_intended_key(e["loc"]),) for e in errors if e["type"] == "extra_forbidden"}
        issues = []
        for err in errors:
            loc = tuple(err["loc"])
            if err["type"] == "missing" and loc in meant:
                continue
            line, col = (
                _position(doc, loc) if err["type"] in ("extra_forbidden", "missing") else _value_position(doc, loc)
            )
            issues.append(ConfigIssue(source, line, col, _dotted(loc), _message(err)))
        raise ConfigError(issues) from None
    config.base_dir = base_dir or Path.cwd()
    config.source = source
    issues = [ConfigIssue(source, *_position(doc, loc), _dotted(loc), msg) for loc, msg in semantic_problems(config)]
    if issues:
        raise ConfigError(issues)
    return config


def semantic_problems(config: Config) -> list[tuple[tuple[Any, ...], str]]:
    """Rules that span several fields; each problem is (path, message)."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    nodes = config.k8s_cluster_nodes
    seen_ip: dict[str, int] = {}
    seen_name: dict[str, int] = {}
    for i, named in enumerate(name_nodes(nodes)):
        node = named.spec
        base = ("k8s_cluster_nodes", i)
        if node.ip in seen_ip:
            problems.append(
                (
                    base + ("ip",),
                    f"duplicate IP {node.ip} (also node {seen_ip[node.ip]}); give each node its own IP, and list a "
                    "node once with all its roles",
                )
            )
        seen_ip.setdefault(node.ip, i)
        if named.name in seen_name:
            other = seen_name[named.name]
            # A name derived from the role (gpu-1) can clash with one written out; without this the clash puzzles.
            fix = (
                "names must be unique"
                if node.name and nodes[other].name
                else "a node without a name is named from its role (cp-1, gpu-1, cpu-1, ...); give it a distinct name"
            )
            problems.append(
                (
                    base + ("name",) if node.name else base,
                    f"duplicate node name {named.name!r} (also node {other}); {fix}",
                )
            )
        seen_name.setdefault(named.name, i)
        if len(set(node.role)) != len(node.role):
            problems.append((base + ("role",), "a role is listed twice; list each role once"))
        if Role.GPU_WORKER in node.role and Role.CPU_WORKER in node.role:
            problems.append((base + ("role",), "a node cannot be both gpu-worker and cpu-worker; pick one"))
        if not node.is_gpu:
            for field in ("gpu_count", "gpu_model"):
                if getattr(node, field) is not None:
                    problems.append(
                        (
                            base + (field,),
                            f"{field} is set on a node without the gpu-worker role; "
                            "add gpu-worker to its roles or remove the field",
                        )
                    )
    if nodes and not any(n.is_control_plane for n in nodes):
        problems.append(
            (
                ("k8s_cluster_nodes",),
                "no node has the control-plane role; add control-plane to at least one node's roles",
            )
        )
    etcd = sum(1 for n in nodes if n.is_etcd)
    if nodes and etcd == 0:
        problems.append((("k8s_cluster_nodes",), "no node has the etcd role; give it to 1, 3 or 5 nodes"))
    elif etcd % 2 == 0:
        problems.append(
            (("k8s_cluster_nodes",), f"{etcd} etcd nodes: etcd needs an odd number for quorum; use 1, 3 or 5")
        )
    ks = config.kubespray
    svc, pod = ipaddress.IPv4Network(ks.service_cidr), ipaddress.IPv4Network(ks.pod_cidr)
    if svc.overlaps(pod):
        problems.append(
            (
                ("kubespray", "pod_cidr"),
                f"pod_cidr {pod} overlaps service_cidr {svc}; choose ranges that don't overlap",
            )
        )
    for i, n in enumerate(nodes):
        ip = ipaddress.IPv4Address(n.ip)
        if ip in svc or ip in pod:
            problems.append(
                (
                    ("k8s_cluster_nodes", i, "ip"),
                    f"node IP {ip} lies inside the service or pod CIDR; change one of them",
                )
            )
    for key, svc_cfg in config.deepops_services.by_key().items():
        known = {r[0] for r in pins.CHARTS[key]}
        for release in svc_cfg.releases:
            if release not in known:
                guess = difflib.get_close_matches(release, sorted(known), n=1)
                hint = f"did you mean {guess[0]!r}?" if guess else f"known: {', '.join(sorted(known))}"
                problems.append(
                    (("deepops_services", key, "releases", release), f"unknown release {release!r}; {hint}")
                )
    if config.deepops_services.slurm.enabled and not config.slurm_gpu_nodes:
        # The slurm chart refuses a partition without NodeSets, and Slurm without GPU nodes has no gpu partition.
        problems.append(
            (
                ("deepops_services", "slurm", "enabled"),
                "Slurm is enabled but no GPU node is in Slurm; add a gpu-worker node, remove `slurm: false` from "
                "one, or set enabled: false",
            )
        )
    slurm_namespace = pins.release_namespace("slurm")
    if config.validation.slurm_namespace != slurm_namespace:
        # gpuforge reads Slurm where it installs it: the slurm release's namespace, which the config cannot move.
        problems.append(
            (
                ("validation", "slurm_namespace"),
                f"Slurm runs in the slurm release's namespace {slurm_namespace!r}; remove this key",
            )
        )
    if config.ansible_ssh_private_key_file and config.ansible_ssh_private_key_secret:
        problems.append(
            (("ansible_ssh_private_key_secret",), "set either ansible_ssh_private_key_file or this, not both")
        )
    if config.ssh_known_hosts and config.ssh_host_key_checking == "off":
        problems.append(
            (("ssh_known_hosts",), "ssh_host_key_checking is off, so these keys would never be checked; use strict")
        )
    return problems


def node_access_problems(config: Config) -> list[ConfigIssue]:
    """What stops the commands that connect to nodes: a missing or unreadable SSH key or known_hosts file."""
    return _key_file_problems(config) + _known_hosts_problems(config)


def _known_hosts_problems(config: Config) -> list[ConfigIssue]:
    if not config.ssh_known_hosts:
        return []
    path = config.path(config.ssh_known_hosts)
    if path.is_file() and os.access(path, os.R_OK):
        return []
    line, col = _key_line(config, "ssh_known_hosts")
    problem = f"known_hosts file {path} is missing or not readable; point to the file of the hosts' keys"
    return [ConfigIssue(config.source, line, col, "ssh_known_hosts", problem)]


def _key_file_problems(config: Config) -> list[ConfigIssue]:
    if config.ansible_ssh_private_key_secret:
        return []
    if not config.ansible_ssh_private_key_file:
        return [
            ConfigIssue(
                config.source,
                1,
                1,
                "ansible_ssh_private_key_file",
                "no SSH key configured; set ansible_ssh_private_key_file or ansible_ssh_private_key_secret",
            )
        ]
    key = config.path(config.ansible_ssh_private_key_file)
    if not key.exists():
        problem = f"key file {key} does not exist; create it or point to the right file"
    elif not os.access(key, os.R_OK) or not key.is_file():
        problem = f"key file {key} is not readable; fix its permissions (chmod 600, owned by you)"
    else:
        return []
    line, col = _key_line(config, "ansible_ssh_private_key_file")
    return [ConfigIssue(config.source, line, col, "ansible_ssh_private_key_file", problem)]


def _key_line(config: Config, key: str) -> tuple[int, int]:
    try:
        doc = parse_yaml(read_config_text(config.source), config.source)
    except ConfigError:
        return 1, 1
    return _value_position(doc, (key,))
