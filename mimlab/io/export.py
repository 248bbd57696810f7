"""``mimlab export``: any model source (:mod:`mimlab.io.sources`) out to the formats other tools
load.

* ``--format timm`` (a directory; the default unless OUTPUT ends in ``.pt``): timm's Hub format,
  ``model.safetensors`` + ``config.json`` (``timm.create_model('local-dir:DIR',
  pretrained=True)``), with the classifier head of fine-tuned checkpoints;
* ``--format hf`` (a directory): transformers ``ViTMAEForPreTraining`` for an MAE with its
  decoder, ``ViTModel`` for an encoder;
* ``--format pt`` (OUTPUT ``.pt``; the original export): ``{'state_dict', 'timm_model',
  'timm_kwargs'}`` for ``timm.create_model(d['timm_model'], **d['timm_kwargs'])``;
* ``--format mimlab`` (a ``.pt`` file): one mimlab checkpoint, e.g. from the sharded
  ``checkpoints/<name>.dcp`` directory of a ``run.parallel=fsdp`` run (every format above also
  reads such a directory directly).

A pretrained encoder exports with ``global_pool='token'`` (its class token); a fine-tuned
checkpoint with ``global_pool='avg'`` whose ``fc_norm`` and ``head`` are mimlab's (same logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .checkpoint import read as read_checkpoint
from .checkpoint import save as atomic_save
from .hub import TIMM_ARCH, save_hf, save_timm, timm_model_args, timm_state_dict
from .hub import to_timm as _to_timm
from .sources import SourceError, load_encoder, parse_source

FORMATS = ("auto", "timm", "hf", "pt", "mimlab")


def to_timm(source: str | Path, num_classes: Optional[int] = None) -> torch.nn.Module:
    """The matching timm ViT with ``source``'s weights (eval mode)."""
    return _to_timm(load_encoder(str(source)), num_classes)


def _source_paths(source: str) -> list[Path]:
    """The files / folders a source spec reads (``timm:NAME@FILE`` -> FILE, ``mae:F`` -> F)."""
    try:
        src = parse_source(source)
    except SourceError:
        return []
    return [Path(p) for p in (src.target, src.file) if p]


def check_output(source: str, output: Path, fmt: str, overwrite: bool) -> None:
    """Refuse to write onto the source itself, onto an existing file or into a non-empty
    folder (unless ``overwrite``), or a folder format onto a file; one line each."""
    out = output.resolve()
    for p in _source_paths(source):
        if p.exists() and p.resolve() == out:
            raise SourceError(
                f"export: output {output} is the source itself ({source}); write to another path"
            )
    if fmt in ("pt", "mimlab"):  # one file
        if output.is_dir():
            raise SourceError(f"export: output {output} is a folder; --format {fmt} writes a file")
        if output.exists() and not overwrite:
            raise SourceError(
                f"export: {output} exists; pass --overwrite to replace it, or choose another path"
            )
        return
    if output.exists() and not output.is_dir():
        raise SourceError(
            f"export: {output} is a file; --format {fmt} writes a folder (a .pt output is "
            "--format pt)"
        )
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise SourceError(
            f"export: folder {output} is not empty; pass --overwrite to replace its files, or "
            "choose another path"
        )


def export_checkpoint(
    source: str | Path, output: str | Path, fmt: str = "auto", overwrite: bool = False
) -> dict:
    """Export ``source`` to ``output`` in ``fmt`` (see the module docstring); returns an info
    dict (paths, architecture, how to load it). Never writes onto the source; an existing
    file or non-empty folder only with ``overwrite``."""
    if fmt not in FORMATS:
        raise SourceError(f"--format must be one of {' | '.join(FORMATS)}, got '{fmt}'")
    if fmt == "auto":
        fmt = "pt" if str(output).endswith(".pt") else "timm"
    check_output(str(source), Path(output), fmt, overwrite)
    if fmt == "mimlab":
        src = Path(str(source))
        if not src.exists():
            raise SourceError(f"--format mimlab needs a mimlab checkpoint file or directory: {src}")
        ck = read_checkpoint(src)
        atomic_save(ck, Path(output))
        return {
            "format": "mimlab",
            "output": str(output),
            "from": str(src),
            "global_step": ck.get("global_step"),
        }
    sm = load_encoder(str(source))
    if fmt == "timm":
        return {**save_timm(sm, output), "loaded": sm.description}
    if fmt == "hf":
        return {**save_hf(sm, output), "loaded": sm.description}
    kw = timm_model_args(sm)
    atomic_save(
        {"state_dict": timm_state_dict(sm), "timm_model": TIMM_ARCH, "timm_kwargs": kw},
        Path(output),
    )
    return {
        "format": "pt",
        "output": str(output),
        "timm_model": TIMM_ARCH,
        "timm_kwargs": kw,
        "loaded": sm.description,
        "usage": "m = timm.create_model(d['timm_model'], pretrained=False, **d['timm_kwargs']);"
        " m.load_state_dict(d['state_dict'])",
    }
