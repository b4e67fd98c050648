"""`micronet params apply`: merge an overlay (a pipeline's toy.yaml) into params.yaml, keeping its comments, so the
same dvc.yaml runs at toy scale; validated before anything is written."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import ParamsOption


def merge(base, overlay) -> None:
    """Overlay mappings key by key; anything else (scalars, lists) replaces the base value."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value


def apply_command(
    overlay: Path = typer.Argument(..., help="YAML with the keys to change, e.g. toy.yaml"),
    params_path: Path = ParamsOption,
) -> None:
    """Write OVERLAY's values into the params file (comments kept), e.g. a pipeline's toy scale (README:
    "Experiments: change one knob"). Mappings merge key by key, anything else replaces; the result is validated
    whole before params.yaml changes. `git checkout params.yaml` returns to full scale."""
    import io
    import os

    from ruamel.yaml import YAML

    from micronet.checkpoint import write_temporary
    from micronet.config import load_params, read_yaml
    from micronet.errors import MicronetError

    yaml = YAML()
    yaml.preserve_quotes = True
    for path in (overlay, params_path):
        if not path.is_file():
            raise MicronetError(f"{path}: file not found")
    for path in (overlay, params_path):  # a duplicate key or bad syntax: one line naming file and line, exit 2
        read_yaml(path)
    base = yaml.load(params_path.read_text())
    changes = yaml.load(overlay.read_text()) or {}
    if not isinstance(changes, dict):
        raise MicronetError(f"{overlay}: expected a mapping of params sections")
    merge(base, changes)
    text = io.StringIO()
    yaml.dump(base, text)
    tmp = write_temporary(params_path, lambda f: f.write(text.getvalue().encode()))  # the user's umask, not 0600
    try:
        load_params(tmp)  # a bad overlay fails here, naming the key, and params.yaml stays as it was
    except MicronetError as exc:
        tmp.unlink()
        raise MicronetError(f"{overlay} applied to {params_path}: {str(exc).split(': ', 1)[-1]}") from None
    os.replace(tmp, params_path)
    typer.echo(f"applied {overlay} to {params_path} ({', '.join(changes)})")
