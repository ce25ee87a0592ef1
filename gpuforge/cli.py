"""The `gpuforge` command line.

Each command loads the config first (a bad config prints one line per problem and exits 1 before
anything is touched), then hands over to a flow or to the lab. Usage errors print one line and exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gpuforge.config import Config, ConfigError, load_config, node_access_problems

config_option = click.option(
    "--config",
    "-c",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The cluster's config.yml (DeepOps format plus gpuforge keys).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")


def fail(message: str, code: int = 1) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def load(path: Path, *, connects: bool = False) -> Config:
    """Load and validate the config; `connects` also checks what reaching the nodes needs (the SSH key)."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        fail(str(exc))
    if connects and (problems := node_access_problems(config)):
        fail("\n".join(str(p) for p in problems))
    return config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Stand up and keep alive a GPU Kubernetes cluster (the DeepOps recipe) as Prefect flows."""


@app.command()
@config_option
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder to write the rendered files into.",
)
@json_option
def plan(config_path: Path, out: Path, as_json: bool) -> None:
    """Render inventory, group_vars, Helm values, dashboard and alert rules; change nothing else."""
    from gpuforge import render
    from gpuforge.plan import write_plan

    cfg = load(config_path)
    written = write_plan(cfg, out)
    summary = render.render_summary(cfg)
    if as_json:
        click.echo(json.dumps({**summary, "files": [str(p) for p in written]}, indent=2, ensure_ascii=False))
    else:
        click.echo(render.summary_markdown(summary))
        click.echo(f"{len(written)} files written to {out}")


def main() -> None:
    """Console entry point: one-line usage errors instead of click's multi-line usage block."""
    try:
        app.main(prog_name="gpuforge", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        sys.exit(2)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "gpuforge"
        click.echo(f"{command}: error: {exc.format_message()} (see '{command} --help')", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("gpuforge: aborted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
