"""FSDP2 for the training engine (``run.parallel=fsdp`` under torchrun).

:func:`shard` applies ``torch.distributed.fsdp.fully_shard`` to every transformer block of the
method (encoder, decoder, EMA copies), to every frozen sub-network (teachers, EMA targets) as
its own unit, and to the root (patch embedding, tokens, heads). Frozen units never enter the
optimizer (the engine's parameter groups skip ``requires_grad=False``); an EMA target is
sharded exactly like its online network (same shapes, ``Shard(0)`` on the same mesh), so
``ema_update_`` runs shard by shard without communication. Mixed precision: parameters are
all-gathered in the autocast dtype (``run.precision``), gradients reduced in float32.

Checkpoints are directories ``checkpoints/<name>.dcp`` written with
``torch.distributed.checkpoint`` (each rank writes its shards; model and optimizer keyed by
parameter name), plus ``meta.pt`` (rank 0: the schema fields without weights, the engine's
counters and log window) and ``rng-rank<R>.pt`` (every rank's RNG states). They are written to
``<name>.dcp.tmp`` and renamed, so a kill leaves the previous checkpoint intact.
:func:`mimlab.io.checkpoint.read` turns such a directory into one ordinary checkpoint dict
(``mimlab export``, ``load_encoder`` read both forms); :func:`mimlab.io.checkpoint.consolidate`
writes it as one file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn as nn
from timm.models.vision_transformer import Block

from ..core import dist


def _frozen_subtrees(module: nn.Module, prefix: str = "") -> list[nn.Module]:
    """Maximal sub-modules whose parameters are all frozen (teachers, EMA targets)."""
    out = []
    for name, child in module.named_children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(child)
        else:
            out += _frozen_subtrees(child, f"{prefix}{name}.")
    return out


def check_gloo_avg_reduce_scatter() -> None:
    """pytorch#162338: some torch versions' gloo backend *sums* in an AVG reduce-scatter, which
    FSDP2 uses for gradients; probe it once (2+ processes, CPU) and refuse to train if so."""
    if not dist.is_dist() or tdist.get_backend() != "gloo":
        return
    w, r = dist.world_size(), dist.rank()
    x = torch.full((w,), float(r + 1))
    out = torch.empty(1)
    tdist.reduce_scatter_tensor(out, x, op=tdist.ReduceOp.AVG)
    want = (w + 1) / 2  # mean of 1..w
    if abs(float(out[0]) - want) > 1e-6:
        raise RuntimeError(
            f"gloo reduce-scatter with ReduceOp.AVG returned {float(out[0])}, expected {want} "
            f"(pytorch#162338, torch {torch.__version__}): FSDP gradients would be wrong; use "
            "run.parallel=ddp or another torch version"
        )


def shard(method: nn.Module, param_dtype) -> nn.Module:
    """Apply FSDP2 in place (blocks, frozen sub-networks, root) after broadcasting rank 0's
    parameters and buffers; returns ``method``."""
    from torch.distributed.fsdp import (  # lazy: torch.distributed.fsdp only for fsdp runs
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
    )

    check_gloo_avg_reduce_scatter()
    with torch.no_grad():  # rank 0's initial weights everywhere (as DDP does at wrap time)
        for t in [*method.parameters(), *method.buffers()]:
            tdist.broadcast(t, src=0)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for m in method.modules():
        if isinstance(m, Block):
            fully_shard(m, mp_policy=mp)
    for m in _frozen_subtrees(method):
        if not isinstance(m, FSDPModule):  # a frozen block is a unit already
            fully_shard(m, mp_policy=mp)
    fully_shard(method, mp_policy=mp)
    return method


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's ``no_sync``: skip the reduce-scatter on the micro-batches before the last."""
    model.set_requires_gradient_sync(sync)  # type: ignore[operator]


def save(engine, name: str, rng: dict) -> Path:
    """Write ``checkpoints/<name>.dcp`` (see the module docstring); a collective."""
    from torch.distributed.checkpoint import save as dcp_save  # lazy: fsdp runs only
    from torch.distributed.checkpoint.state_dict import get_state_dict  # lazy: fsdp runs only

    final = engine.ckpt_dir / f"{name}.dcp"
    tmp = final.with_name(final.name + ".tmp")
    if engine.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(engine.method, engine.optimizer)
    dcp_save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save(rng, tmp / f"rng-rank{engine.rank}.pt")
    if engine.main:
        meta = engine.state_dict(model_state={})
        meta.pop("optimizer", None)
        meta.pop("rng", None)
        meta.pop("rng_ranks", None)  # each rank's RNG lives in its own rng-rank<R>.pt
        meta["sharded"] = {"world_size": engine.world, "format": "torch.distributed.checkpoint"}
        torch.save(meta, tmp / "meta.pt")
    dist.barrier()
    if engine.main:
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(engine, path: Path) -> dict:
    """Load model and optimizer shards from ``path`` (a ``.dcp`` directory) into the engine;
    returns ``meta.pt`` with this rank's RNG states as ``rng`` (what ``Engine.load`` reads)."""
    from torch.distributed.checkpoint import load as dcp_load  # lazy: fsdp runs only
    from torch.distributed.checkpoint.state_dict import (  # lazy: fsdp runs only
        get_state_dict,
        set_state_dict,
    )

    msd, osd = get_state_dict(engine.method, engine.optimizer)
    state = {"model": msd, "optim": osd}
    dcp_load(state, checkpoint_id=str(path))
    set_state_dict(
        engine.method,
        engine.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
    )
    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    rng = path / f"rng-rank{engine.rank}.pt"
    if rng.exists():
        meta["rng"] = torch.load(rng, map_location="cpu", weights_only=True)
    return meta
