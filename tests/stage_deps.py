"""The project files a stage command really runs: the transitive closure of its module's imports (function-level
imports included, since stages import lazily), read from the source with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("micronet", "stages")


def module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return {n for n in names if n.split(".")[0] in PACKAGES}


def closure(module: str) -> set[Path]:
    """Every project file imported, directly or not, by `module` (package __init__ files included)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo += sorted(_imports(path))
    return seen


def command_modules() -> dict[str, str]:
    """`micronet` sub-command (as dvc.yaml writes it, e.g. 'train', 'data synth') -> the module defining it."""
    from micronet.cli import app

    found: dict[str, str] = {}

    def walk(typer_app, prefix: str) -> None:
        for command in typer_app.registered_commands:
            found[f"{prefix}{command.name}"] = command.callback.__module__
        for group in typer_app.registered_groups:
            walk(group.typer_instance, f"{prefix}{group.name} ")

    walk(app, "")
    return found


def code_deps(module: str, pipeline: Path) -> list[str]:
    """The deps a stage running `module` lists for its code, relative to the pipeline folder: whole folders for
    micronet/data and micronet/nets (every file there is imported), single files elsewhere, and the assets read."""
    import os

    from test_dvc_wiring import ASSETS  # the data files the code reads

    files = closure(module)
    files |= {a for f in files for a in ASSETS.get(f, [])}
    folders = {REPO / "micronet/data", REPO / "micronet/nets"}
    deps = {next((d for d in folders if d in f.parents), f) for f in files}
    return sorted(os.path.relpath(d, pipeline) for d in deps)


def write_deps() -> None:
    """Rewrite the code deps of every stage in every dvc.yaml from the import closure (comments kept)."""
    import re
    import sys

    from ruamel.yaml import YAML

    sys.path.insert(0, str(REPO))
    modules = command_modules()
    yaml = YAML()
    yaml.width = 110
    yaml.indent(mapping=2, sequence=4, offset=2)
    for path in [REPO / "dvc.yaml", *sorted(REPO.glob("pipelines/*/dvc.yaml"))]:
        doc = yaml.load(path.read_text())
        for stage in doc["stages"].values():
            command = re.match(r"micronet ((?:data )?[a-z-]+)", " ".join(stage["cmd"].split())).group(1)
            keep = [d for d in stage.get("deps", []) if not re.match(r"(\.\./)*(micronet|stages)/", str(d))]
            stage["deps"] = keep + code_deps(modules[command], path.parent)
        import io

        text = io.StringIO()
        yaml.dump(doc, text)
        path.write_text("".join(line.rstrip() + "\n" for line in text.getvalue().splitlines()))
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    write_deps()
