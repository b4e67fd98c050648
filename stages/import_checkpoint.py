"""`micronet import`: a submission's released checkpoint as a micronet checkpoint (then `micronet score`
and the compression stages can read it). As a pipeline stage it reads the `import` section of the params file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

IMPORTERS = ("kaist", "micronet")  # micronet.importers.IMPORTERS, named here so `--help` needs no torch
WHERE = {  # where a missing released file comes from
    "kaist": "download it from KAIST's repository, github.com/Kthyeon/KAIST-AI-NeurIPS2019-MicroNet-2nd-place-"
             "solution (Checkpoint_ver1/micronet_v1_pr_60.t7, Checkpoint_ver2/micronet_v2_pr_60.t7)",
    "micronet": "run the pipeline that writes it first",
}


def resolve_source(params_path: Path) -> tuple[str, Path, str]:
    """(format, file, arch) of the params' `import` section; a missing file fails naming the key and the fix."""
    from micronet.config import load_params
    from micronet.errors import MicronetError

    params = load_params(params_path)
    cfg = params.import_
    if cfg is None:
        raise MicronetError(f"{params_path}: no `import` section (source, format, arch) to import from")
    src = params_path.parent / cfg.source
    if not src.is_file():
        raise MicronetError(f"{params_path}: key 'import.source' = {cfg.source!r}: no such file; {WHERE[cfg.format]}, "
                            f"and set import.source to its path")
    return cfg.format, src, cfg.arch


def import_command(
    source: Optional[str] = typer.Argument(None, help=f"whose checkpoint format: {', '.join(IMPORTERS)}"),
    src: Optional[Path] = typer.Argument(None, help="their checkpoint file, e.g. Checkpoint_ver1/micronet_v1_pr_60.t7"),
    arch: Optional[str] = typer.Option(None, "--arch", help="the registered architecture it holds, e.g. "
                                       "kaist_micronet_v1"),
    output: Path = typer.Option(..., "--output", help="micronet checkpoint to write, e.g. models/import.pt"),
    params_path: Optional[Path] = typer.Option(None, "--params", help="read SOURCE, SRC and --arch from the "
                                               "params file's `import` section (the pipeline stage)"),
) -> None:
    """Map SRC's weights key for key onto ARCH and write them as a micronet checkpoint."""
    from micronet.checkpoint import atomic_save, build_from_checkpoint
    from micronet.compression.sparsity import overall_sparsity, sparsity_report
    from micronet.errors import MicronetError
    from micronet.importers import import_checkpoint

    if params_path is not None:
        if source or src or arch:
            raise MicronetError("give either --params or SOURCE SRC --arch, not both")
        source, src, arch = resolve_source(params_path)
    elif not (source and src and arch):
        raise MicronetError("name the checkpoint: SOURCE SRC --arch ARCH (or --params with an `import` section)")
    ckpt = import_checkpoint(source, src, arch)
    atomic_save(ckpt, output)
    sparsity = overall_sparsity(sparsity_report(build_from_checkpoint(ckpt, output)))
    masks = ckpt["source"].get("masks_folded", 0)
    typer.echo(f"wrote {output}: {arch}, {len(ckpt['state_dict'])} tensors from {src.name}"
               f" ({masks} masks folded into their weights), conv/linear sparsity {sparsity:.2%}")


def synth_kaist_command(params_path: Path = typer.Option(Path("params.yaml"), "--params")) -> None:
    """Write the random KAIST-layout file `import.synthetic` describes at `import.source`, unless a file is there."""
    from micronet.checkpoint import atomic_save
    from micronet.config import load_params
    from micronet.errors import MicronetError
    from micronet.importers import kaist_layout, synthetic_kaist_model

    cfg = load_params(params_path).import_
    if cfg is None or cfg.synthetic is None or cfg.format != "kaist":
        raise MicronetError(f"{params_path}: key 'import.synthetic' is not set for a kaist import; nothing to write")
    src = params_path.parent / cfg.source
    if src.is_file():
        typer.echo(f"{src} exists: left as it is")
        return
    model, masks = synthetic_kaist_model(cfg.arch, cfg.synthetic.sparsity, cfg.synthetic.seed)
    atomic_save(kaist_layout(model, masks), src)
    typer.echo(f"wrote a random {cfg.arch} in KAIST's layout ({cfg.synthetic.sparsity:.0%} masked) to {src}")
