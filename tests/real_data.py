"""Where the real data sets are for tests: `shared/` beside the repository (this machine's layout). A user's clone
has none of it, so tests that need it skip in one line instead of failing."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_CIFAR100 = SHARED_DATA / "cifar100"  # holds cifar-100-python/{train,test,meta,MANIFEST.json}; read-only
KAIST_RELEASES = REPO.parent / "shared" / "models" / "kaist"  # micronet_v{1,2}_pr_60.t7, as KAIST released them


def real_cifar100() -> Path:
    """The real CIFAR-100's data.root, or skip the calling test (one line) where it is not there."""
    folder = REAL_CIFAR100 / "cifar-100-python"
    missing = [f for f in ("train", "test", "meta", "MANIFEST.json") if not (folder / f).is_file()]
    if missing:
        pytest.skip(f"real CIFAR-100 not at ../shared/data/cifar100 (a user's clone): {folder} lacks "
                    f"{', '.join(missing)}")
    return REAL_CIFAR100


def kaist_release(version: int) -> Path:
    """KAIST's released micronet_v<version>_pr_60.t7, or skip the calling test (one line) where it is not there."""
    path = KAIST_RELEASES / f"micronet_v{version}_pr_60.t7"
    if not path.is_file():
        pytest.skip(f"KAIST's release not at ../shared/models/kaist (a user's clone): {path.name} missing")
    return path
