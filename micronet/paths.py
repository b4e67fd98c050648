"""Where the repository is, also from inside DVC's temporary experiment copies.

Each pipeline folder is its own DVC project (`dvc init --subdir`), so DVC runs queued and temporary experiments in
a copy of the whole git repository under `<pipeline>/.dvc/tmp/exps/<tmp>/` (or `<root>/.dvc/tmp/exps/<tmp>/` for the
root pipeline). Everything that must outlive the copy (the MLflow store, untracked data) is found in the original."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

EXPS_MARKER = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file read in 1 MiB blocks: checkpoints and data files can be larger than one wants in memory
    twice."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_with(start: Path, names: tuple[str, ...], stop: Optional[Path] = None) -> Optional[Path]:
    for folder in (start, *start.parents):
        if stop is not None and folder == stop:
            return None
        if any((folder / name).exists() for name in names):
            return folder
    return None


def _experiment_copy(cwd: Path) -> Optional[tuple[Path, Path]]:
    """(copy root, original root) when `cwd` lies in a DVC experiment copy: the copy's git root and the git root
    of the repository it copies."""
    text = str(cwd)
    if EXPS_MARKER not in text:
        return None
    dvc_root = Path(text.split(EXPS_MARKER)[0])
    exps = dvc_root / ".dvc" / "tmp" / "exps"
    copy_root = _first_with(cwd, (".git",), stop=exps) or _first_with(cwd, (".dvc",), stop=exps)
    original = _first_with(dvc_root, (".git",)) or dvc_root
    return (copy_root, original) if copy_root is not None else None


def repository_root(start: Path | None = None) -> Path:
    """The git repository this process works in (where mlflow.db lives); for DVC's experiment copies, the
    original one."""
    start = (start or Path.cwd()).resolve()
    copy = _experiment_copy(start)
    if copy is not None:
        return copy[1]
    return _first_with(start, (".git",)) or _first_with(start, (".dvc",)) or start


def untracked_input(path: str | Path) -> Path:
    """A relative path to data DVC does not track (e.g. real CIFAR-100): queued and temporary experiments run
    in a copy that lacks it, so fall back to the same place in the original workspace."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    cwd = Path.cwd().resolve()
    copy = _experiment_copy(cwd)
    if copy is None:
        return path
    copy_root, original_root = copy
    original = original_root / cwd.relative_to(copy_root) / path
    return original if original.exists() else path
