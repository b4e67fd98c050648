"""Where the repository is, also from inside DVC's temporary experiment copies (.dvc/tmp/exps/...)."""

from __future__ import annotations

import os
from pathlib import Path

EXPS_MARKER = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"


def repository_root(start: Path | None = None) -> Path:
    """The DVC repository this process works in; for DVC's temporary experiment copies, the original one."""
    start = (start or Path.cwd()).resolve()
    text = str(start)
    if EXPS_MARKER in text:
        return Path(text.split(EXPS_MARKER)[0])
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return start


def untracked_input(path: str | Path) -> Path:
    """A relative path to data DVC does not track (e.g. real CIFAR-100): queued and temporary experiments run
    in a copy that lacks it, so fall back to the same place in the original workspace."""
    path = Path(path)
    cwd = Path.cwd().resolve()
    if path.is_absolute() or path.exists() or EXPS_MARKER not in str(cwd):
        return path
    copy_root = next((f for f in (cwd, *cwd.parents) if (f / ".dvc").is_dir()), None)
    if copy_root is None:
        return path
    original = repository_root(cwd) / cwd.relative_to(copy_root) / path
    return original if original.exists() else path
