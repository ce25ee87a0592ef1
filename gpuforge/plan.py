"""`gpuforge plan`: write every rendered object to a folder, touching nothing else."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.representer import SafeRepresenter
from ruamel.yaml.resolver import VersionedResolver

from gpuforge import render
from gpuforge.desired import MONITORING_RELEASE, DesiredState

# Helm (go-yaml) and Ansible (PyYAML) read YAML 1.1, where YES, on, ~ and the like are not strings.
_YAML_1_1 = VersionedResolver(version=(1, 1))
_STR_TAG = "tag:yaml.org,2002:str"


class _Representer(SafeRepresenter):
    """A string that a YAML 1.1 reader would take for a boolean, null or number is double-quoted."""

    def represent_str(self, data: str) -> ScalarNode:
        implicit = _YAML_1_1.resolve(ScalarNode, data, (True, False))
        return self.represent_scalar(_STR_TAG, data, style='"' if implicit != _STR_TAG else None)


_Representer.add_representer(str, _Representer.represent_str)


def dump_yaml(data: Any) -> str:
    yaml = YAML(typ="safe", pure=True)
    yaml.Representer = _Representer
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # keep the order the renderer chose
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def plan_files(state: DesiredState) -> dict[str, str]:
    """Relative path -> file content, for everything `install` will apply."""
    config = state.config
    files = {"hosts.yaml": dump_yaml(render.render_inventory(config))}
    for name, group_vars in render.render_group_vars(config).items():
        files[f"group_vars/{name}.yml"] = dump_yaml(group_vars)
    for release in state.releases:
        files[f"values/{release.name}.yaml"] = dump_yaml(release.values)
    if config.enabled("gpu-operator"):
        files["dcgm-metrics.csv"] = render.render_dcgm_counters()
    if config.enabled("monitoring_stack"):
        files["dashboards/gpuforge-gpus.json"] = json.dumps(render.render_dashboard(), indent=2) + "\n"
        files["rules/gpuforge-gpu-alerts.yaml"] = dump_yaml(alert_rules(state))
    summary = render_summary(state)
    files["summary.md"] = render.summary_markdown(summary)
    files["summary.json"] = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    return files


def alert_rules(state: DesiredState) -> dict[str, Any]:
    """The GPU PrometheusRule, in the monitoring release's namespace, with the desired thresholds."""
    return render.render_alert_rules(state.thresholds, state.namespace(MONITORING_RELEASE), state.expected_gpus())


def render_summary(state: DesiredState) -> dict[str, Any]:
    return render.render_summary(state.config, state.nodes, state.releases)


def write_plan(state: DesiredState, out_dir: Path) -> list[Path]:
    written = []
    for rel, content in plan_files(state).items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        written.append(path)
    return written
