"""Self-supervised pretraining as a function: :func:`pretrain` (``mimlab pretrain``)."""

from __future__ import annotations

import logging

from ..core.config import PretrainConfig
from ..data.datasets import build_dataset
from ..data.resident import resident_dataset
from ..methods import build_method
from ..methods.teacher_cache import attach_teacher_cache
from .engine import Engine, autocast_dtype
from .online import build_online_evaluator
from .rundir import owns_run_dir, prepare_run, write_results

log = logging.getLogger("mimlab")


@owns_run_dir
def pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain ``cfg.method`` on ``cfg.data``; writes the run directory (checkpoints in
    ``checkpoints/``) and returns its ``results.json`` as a dict."""
    # MoCo v3 (method.view2=crop) crops and flips each view itself: a loader crop before it
    # would crop twice, so the loader's augmentation is turned off (and saved as such)
    loader_aug_off = cfg.method.view2 == "crop" and (
        [float(v) for v in cfg.data.crop_scale] != [1.0, 1.0] or cfg.data.hflip
    )
    if loader_aug_off:
        cfg.data.crop_scale, cfg.data.hflip = [1.0, 1.0], False
    run_dir, device = prepare_run(cfg, f"pretrain-{cfg.method.name}")
    if loader_aug_off:
        log.info(
            "method.view2=crop makes its own random resized crops and flips: the loader's are "
            "off (data.crop_scale=[1, 1], data.hflip=false in config.yaml)"
        )
    ds = build_dataset(
        cfg.data,
        "train",
        cfg.model.img_size,
        cfg.model.in_chans,
        cfg.run.seed,
        train_aug=True,
        labelled=False,
    )
    if cfg.data.resident:
        ds = resident_dataset(ds, cfg.model.img_size, cfg.data.crop_scale, cfg.data.hflip)
    method = build_method(cfg, data_mean=ds.mean, data_std=ds.std)  # teachers need the stats
    log.info(
        "pretrain %s on %d images (%s), %s params",
        cfg.method.name,
        len(ds),
        cfg.data.path,
        f"{sum(p.numel() for p in method.parameters()) / 1e6:.2f}M",
    )
    batch_fn = cache = None
    if cfg.method.cache_teacher:  # precomputed teacher features, looked up by sample position
        batch_fn, cache = attach_teacher_cache(method, ds, cfg, device)
    online = build_online_evaluator(
        cfg.eval,
        cfg.data,
        cfg.model,
        cfg.run.seed,
        ds.mean,
        ds.std,
        device,
        run_dir,
        autocast_dtype(cfg.run.precision, device),
    )
    eng = Engine(
        method,
        ds,
        cfg,
        cfg.optim,
        cfg.run,
        run_dir,
        batch_fn=batch_fn,
        device=device,
        evaluators=[online] if online is not None else [],
    )
    res = eng.fit()
    out = {
        "command": "pretrain",
        "method": cfg.method.name,
        "run_dir": str(run_dir),
        "steps": res.global_step,
        "epochs": res.epochs_done,
        "seconds": round(res.seconds, 1),
        "images_per_s": round(res.images_per_s, 1),
        "final_loss": res.last_metrics.get("loss"),
        "skipped_files": res.skipped_files,
        "checkpoint": str(eng.last_ckpt or run_dir / "checkpoints/last.pt"),
        "world_size": res.world_size,
        "ddp_max_param_divergence": res.ddp_max_param_divergence,
        "data_mean": ds.mean,
        "data_std": ds.std,
    }
    if res.online_metrics.get("online"):  # last online evaluation (eval.online_every)
        out["online"] = res.online_metrics["online"]
    if cache is not None:
        out.update(teacher_cache=str(cache.path), teacher_cache_built=cache.built)
    write_results(run_dir, out)
    return out
