"""The layers, read from the source with `ast` (nothing is imported): the domain core `gpuforge` imports no
orchestration, no client and nothing above it, and the project's own modules import each other without cycles.
Imports inside functions count too: a deferred import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("gpuforge", "gpuforge_cli", "gpuforge_probe", "flows", "tasks", "lab")
# What the core must never import: orchestration, clients, NVML, and every layer built on top of it.
NOT_IN_CORE = {
    "prefect",
    "kubernetes",
    "pyhelm3",
    "prometheus_api_client",
    "ansible_runner",
    "pynvml",
    "flows",
    "tasks",
    "lab",
    "gpuforge_cli",
    "gpuforge_probe",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "build" not in path.relative_to(REPO).parts:
                modules[module_name(path)] = path
    return modules


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name `path` imports; `from a import b` gives both `a` and `a.b` (b may be a module)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")
                base = package[: len(package) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def test_the_core_imports_no_orchestration_no_client_and_no_layer_above_it():
    offending = []
    for module, path in project_modules().items():
        if module.split(".")[0] != "gpuforge":
            continue
        for name in sorted(imported_names(path, module)):
            if name.split(".")[0] in NOT_IN_CORE:
                offending.append(f"{path.relative_to(REPO)} imports {name}")
    assert offending == []


def test_the_project_modules_import_each_other_without_cycles():
    modules = project_modules()
    graph = {
        module: sorted(name for name in imported_names(path, module) if name in modules and name != module)
        for module, path in modules.items()
    }
    cycles: list[list[str]] = []
    done: set[str] = set()
    on_path: list[str] = []

    def visit(module: str) -> None:
        if module in done:
            return
        if module in on_path:
            cycles.append(on_path[on_path.index(module) :] + [module])
            return
        on_path.append(module)
        for imported in graph[module]:
            visit(imported)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert cycles == []


def test_the_layering_check_sees_the_imports_it_guards_against(tmp_path):
    """The checks above pass vacuously if the parser misses an import form; these are the forms used."""
    source = tmp_path / "sample.py"
    source.write_text(
        "import prefect.flows\n"
        "from flows.common import load\n"
        "from gpuforge import health\n"
        "from .render import render_summary\n"
        "def later():\n"
        "    from gpuforge_cli.day2 import drift\n"
    )
    names = imported_names(source, "gpuforge.sample")
    assert {"prefect.flows", "flows.common", "gpuforge.health", "gpuforge.render", "gpuforge_cli.day2"} <= names
