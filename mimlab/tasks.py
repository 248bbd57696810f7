"""Commands as Python functions: pretrain, finetune, linprobe, knn (the CLI calls these).

Each takes a resolved config, creates its run directory (resolved ``config.yaml``, ``log.txt``,
metrics, checkpoints, ``results.json``) and returns a dict of results.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt_format
from . import dist
from .config import (ConfigError, FinetuneConfig, ModelConfig, PretrainConfig, ProbeConfig,
                     RunConfig, save_yaml, to_dict)
from .data import build_dataset, default_data_path
from .engine import Engine, TrainingError, autocast_dtype, seed_everything
from .eval.knn import knn_classify
from .eval.linear import train_linear_heads
from .eval.online import build_online_evaluator
from .methods import Method, build_method
from .models import ViTEncoder, build_encoder
from .sources import SourceError, SourceModel, load_encoder
from .stats import pack_correct

log = logging.getLogger("mimlab")


# ------------------------------------------------------------------------- run dirs
def make_run_dir(run: RunConfig, command: str) -> Path:
    """``run.out_dir/run.name`` (default ``<command>-<YYYYmmdd-HHMMSS>``); all ranks agree."""
    if run.name is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if dist.is_dist():
            obj = [stamp]
            torch.distributed.broadcast_object_list(obj, src=0)
            stamp = obj[0]
        run.name = f"{command}-{stamp}"
    d = Path(run.out_dir) / run.name
    if dist.is_main():
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"cannot create run directory {d}: {e.strerror or e}") from None
    dist.barrier()
    return d


LOG_FORMAT = ("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


def setup_logging(run_dir: Optional[Path] = None, verbose: bool = True) -> None:
    """The ``mimlab`` logger: rank 0 logs INFO and up to stderr (``verbose``) and to
    ``run_dir/log.txt``; other ranks (torchrun) log only warnings and errors, to stderr, in
    the same format. Nothing propagates to the root logger (whose ``basicConfig`` handler
    would print a second, unformatted copy)."""
    root = logging.getLogger("mimlab")
    main = dist.is_main()
    root.setLevel(logging.INFO if main else logging.WARNING)
    root.propagate = False
    for h in list(root.handlers):
        if getattr(h, "_mimlab", False):
            root.removeHandler(h)
    fmt = logging.Formatter(*LOG_FORMAT)
    if verbose or not main:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh._mimlab = True
        root.addHandler(sh)
    if run_dir is not None and main:
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(fmt)
        fh._mimlab = True
        root.addHandler(fh)


def _prepare(cfg: Any, command: str) -> tuple[Path, torch.device]:
    device = dist.init(cfg.run.device)
    if cfg.data.path is None:
        cfg.data.path = default_data_path()
        if cfg.data.path is None:
            raise ConfigError("no dataset: pass --data PATH (ImageFolder, image folder, "
                              "Fashion-MNIST IDX folder, or builtin:photos)")
    if cfg.run.resume == "auto" and cfg.run.name is None:
        raise ConfigError("run.resume=auto needs run.name (the run directory to continue)")
    run_dir = make_run_dir(cfg.run, command)
    setup_logging(run_dir)
    if dist.is_main():
        save_yaml(cfg, run_dir / "config.yaml")
    seed_everything(cfg.run.seed + dist.rank())
    return run_dir, device


def _write_results(run_dir: Path, results: dict) -> None:
    if dist.is_main():
        (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))


# ------------------------------------------------------------------------- pretrain
def pretrain(cfg: PretrainConfig) -> dict:
    run_dir, device = _prepare(cfg, f"pretrain-{cfg.method.name}")
    ds = build_dataset(cfg.data, "train", cfg.model.img_size, cfg.model.in_chans, cfg.run.seed,
                       train_aug=True, labelled=False)
    method = build_method(cfg, data_mean=ds.mean, data_std=ds.std)  # teachers need the stats
    method.data_mean, method.data_std = ds.mean, ds.std
    log.info("pretrain %s on %d images (%s), %s params", cfg.method.name, len(ds), cfg.data.path,
             f"{sum(p.numel() for p in method.parameters()) / 1e6:.2f}M")
    batch_fn = cache = None
    if cfg.method.cache_teacher:  # precomputed teacher features, looked up by sample position
        from .methods.teacher_cache import attach_teacher_cache
        ds, batch_fn, cache = attach_teacher_cache(method, ds, cfg, device)
    online = build_online_evaluator(cfg.eval, cfg.data, cfg.model, cfg.run.seed, ds.mean, ds.std,
                                    device, run_dir, autocast_dtype(cfg.run.precision, device))
    eng = Engine(method, ds, cfg, cfg.optim, cfg.run, run_dir, batch_fn=batch_fn, device=device,
                 evaluators=[online] if online is not None else [])
    res = eng.fit()
    out = {"command": "pretrain", "method": cfg.method.name, "run_dir": str(run_dir),
           "steps": res.global_step, "epochs": res.epochs_done, "seconds": round(res.seconds, 1),
           "images_per_s": round(res.images_per_s, 1), "final_loss": res.last_metrics.get("loss"),
           "skipped_files": res.skipped_files, "checkpoint": str(run_dir / "checkpoints/last.pt"),
           "world_size": res.world_size,
           "ddp_max_param_divergence": res.ddp_max_param_divergence,
           "data_mean": ds.mean, "data_std": ds.std}
    if res.online_metrics.get("online"):  # last online evaluation (eval.online_every)
        out["online"] = res.online_metrics["online"]
    if cache is not None:
        out.update(teacher_cache=str(cache.path), teacher_cache_built=cache.built)
    _write_results(run_dir, out)
    return out


# ------------------------------------------------------------------------- checkpoints
def model_config_of(ckpt: dict) -> ModelConfig:
    """The architecture of a mimlab checkpoint (any layout; :mod:`mimlab.checkpoint`)."""
    return ckpt_format.model_config(ckpt_format.upgrade(ckpt))


def encoder_state(ckpt: dict) -> dict:
    """Encoder weights of a mimlab checkpoint (pretrain or finetune), keys without prefix."""
    return ckpt_format.encoder_state(ckpt_format.upgrade(ckpt))


def load_encoder_weights(encoder: ViTEncoder, source: "str | SourceModel",
                         trust: bool = False) -> SourceModel:
    """Copy a pretrained encoder (any model source, or an already loaded
    :class:`~mimlab.sources.SourceModel`) into ``encoder``; architecture mismatches fail in
    one line listing the keys. ``encoder`` keeps its own random init order (so seeded runs
    are unchanged); its LayerNorm eps becomes the source's."""
    sm = source if isinstance(source, SourceModel) else load_encoder(source, trust=trust)
    sd = sm.encoder.state_dict()
    own = encoder.state_dict()
    sd = {k: v for k, v in sd.items() if not (k == "mask_token" and k not in own)}
    if "norm.weight" not in own:  # classifier encoders use fc_norm instead of the final norm
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    bad_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
                 if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and k != "mask_token"
               and not (k.startswith("norm.") and sm.fc_norm is not None)]
    unexpected = [k for k in sd if k not in own]
    if bad_shape or missing or unexpected:
        raise TrainingError(
            f"{sm.spec} does not fit this model: "
            + "; ".join(x for x in [
                f"shape mismatches: {', '.join(bad_shape[:6])}" if bad_shape else "",
                f"missing: {', '.join(missing[:6])}" if missing else "",
                f"unexpected: {', '.join(unexpected[:6])}" if unexpected else ""] if x)
            + " (set model.* to the pretraining model, e.g. model.preset=...)")
    encoder.load_state_dict(sd, strict=False)
    for m in encoder.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = sm.eps
    return sm


def _adopt_model_config(cfg: Any, pretrained: Optional[str], explicit_model: bool
                        ) -> Optional[SourceModel]:
    """Read ``pretrained`` (any model source, :mod:`mimlab.sources`) and use its architecture
    unless the user set model.* explicitly (then the weights must fit; the position embeddings
    follow ``model.img_size``). A foreign source also brings its normalisation when
    ``data.mean/std`` are not set. Returns the loaded model (None without one)."""
    if not pretrained:
        return None
    try:
        sm = load_encoder(pretrained, img_size=cfg.model.img_size if explicit_model else None,
                          trust=cfg.run.trust_checkpoints)
    except (SourceError, ckpt_format.CheckpointError) as e:
        raise TrainingError(str(e)) from None
    if not explicit_model:
        keep_dp = cfg.model.drop_path
        cfg.model = replace(sm.model_config)
        cfg.model.drop_path = keep_dp
    if sm.kind != "mimlab" and cfg.data.mean is None and sm.mean is not None:
        cfg.data.mean, cfg.data.std = list(sm.mean), list(sm.std)
    return sm


# ------------------------------------------------------------------------- finetune
class Classifier(Method):
    """Fine-tuning / supervised model: ViT -> mean of patch tokens -> fresh LayerNorm -> linear."""

    def __init__(self, encoder: ViTEncoder, num_classes: int, label_smoothing: float = 0.0):
        super().__init__()
        self.encoder = encoder
        # MAE fine-tuning: the encoder's final norm is replaced by fc_norm after pooling
        self.encoder.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        self.label_smoothing = label_smoothing

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """fc_norm(mean of patch tokens): [B, D]."""
        t = self.encoder.forward_features(images)
        return self.fc_norm(t[:, 1:, :].mean(1))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def forward(self, images, labels=None):
        logits = self.logits(images)
        if labels is None:
            return {"logits": logits}
        if labels.ndim == 2:  # soft targets from mixup/cutmix (already smoothed)
            loss = torch.sum(-labels * F.log_softmax(logits.float(), -1), -1).mean()
            acc = (logits.argmax(-1) == labels.argmax(-1)).float().mean()
        else:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}


@torch.no_grad()
def predict_correct(model: Classifier, ds, batch_size: int, device, num_workers: int = 2
                    ) -> torch.Tensor:
    """Per-image correctness [N] (bool, dataset order) of ``model`` on ``ds``."""
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    out = []
    for x, y, _ in loader:
        out.append(model.logits(x.to(device)).argmax(-1).cpu() == y)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def finetune(cfg: FinetuneConfig, explicit_model: bool = False) -> dict:
    ft = cfg.finetune
    if cfg.optim.layer_decay is None:  # MAE's 0.75 for a pretrained encoder, none from scratch
        cfg.optim.layer_decay = 0.75 if ft.pretrained else 1.0
    ck = _adopt_model_config(cfg, ft.pretrained, explicit_model)
    run_dir, device = _prepare(cfg, "finetune")
    train = build_dataset(cfg.data, "train", cfg.model.img_size, cfg.model.in_chans, cfg.run.seed,
                          train_aug=True, labelled=True, label_fraction=ft.label_fraction)
    val = build_dataset(cfg.data, "val", cfg.model.img_size, cfg.model.in_chans, cfg.run.seed,
                        train_aug=False, labelled=True, mean=train.mean, std=train.std)
    nc = ft.num_classes or len(train.classes)
    enc = build_encoder(cfg.model, mask_token=False)
    if ck is not None:
        load_encoder_weights(enc, ck)
        log.info("fine-tuning from %s", ck.description)
    else:
        log.info("fine-tuning from a random initialisation")
    model = Classifier(enc, nc, ft.label_smoothing)
    batch_fn = None
    if ft.mixup > 0 or ft.cutmix > 0:
        from timm.data import Mixup
        if cfg.optim.batch_size % 2:
            raise ConfigError("mixup/cutmix need an even optim.batch_size")
        mix = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, prob=ft.mix_prob,
                    label_smoothing=ft.label_smoothing, num_classes=nc)
        batch_fn = mix
    nw = cfg.data.num_workers

    last_correct: list = []

    def eval_fn(m, epoch):
        c = predict_correct(m, val, 256, device, nw)
        last_correct[:] = [c]
        return {"top1": 100.0 * float(c.float().sum()) / max(len(c), 1)}

    eng = Engine(model, train, cfg, cfg.optim, cfg.run, run_dir, eval_fn=eval_fn,
                 eval_every=ft.eval_every, batch_fn=batch_fn, device=device)
    res = eng.fit()
    out = {"command": "finetune", "run_dir": str(run_dir), "pretrained": ft.pretrained,
           "top1": res.eval_metrics.get("top1"), "train_images": len(train),
           "val_images": len(val), "epochs": res.epochs_done, "steps": res.global_step,
           "seconds": round(res.seconds, 1), "images_per_s": round(res.images_per_s, 1),
           "label_fraction": ft.label_fraction, "world_size": res.world_size,
           "ddp_max_param_divergence": res.ddp_max_param_divergence,
           "layer_decay": cfg.optim.layer_decay, "base_lr": cfg.optim.base_lr}
    if last_correct:  # per-image correctness for paired statistics (mimlab.stats)
        out["correct"] = pack_correct(last_correct[0].numpy())
    _write_results(run_dir, out)
    return out


# ------------------------------------------------------------------------- frozen features
@torch.no_grad()
def extract_features(feature_fn: nn.Module, ds, device, batch_size: int = 256,
                     num_workers: int = 2, progress: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features [n, D] = ``feature_fn(images)`` and labels [n], in eval mode."""
    feature_fn.eval().to(device)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    it = loader
    if progress and dist.is_main():
        from tqdm.auto import tqdm
        it = tqdm(loader, desc="features", unit="batch", leave=False)
    for x, y, _ in it:
        feats.append(feature_fn(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


class _SourceFeatures(nn.Module):
    """Frozen features of a model whose norm comes after average pooling (fine-tuned /
    supervised checkpoints): fc_norm(mean of patch tokens)."""

    def __init__(self, sm: SourceModel):
        super().__init__()
        self.sm = sm

    def forward(self, x):
        return self.sm.features(x, "avg")


def _probe_encoder(cfg: ProbeConfig, device, ck: Optional[SourceModel]) -> nn.Module:
    """``x -> [B, D]`` frozen feature function for probing (encoder + pooling); ``ck`` is the
    loaded ``probe.pretrained`` source (None for a random initialisation). Models with a norm
    after pooling (fine-tuned / supervised checkpoints, timm ``fc_norm`` models) give
    fc_norm(mean of patch tokens)."""
    enc = build_encoder(cfg.model, mask_token=False)
    if ck is not None:
        log.info("frozen features of %s", ck.description)
    if ck is not None and ck.fc_norm is not None:
        return _SourceFeatures(ck).to(device)
    if ck is not None:
        load_encoder_weights(enc, ck)
    pool = cfg.probe.feature
    return _Pooled(enc, pool).to(device)


class _Pooled(nn.Module):
    def __init__(self, enc: ViTEncoder, pool: str):
        super().__init__()
        self.enc, self.pool = enc, pool

    def forward(self, x):
        return self.enc.pool(self.enc.forward_features(x), self.pool)


def frozen_features(cfg: ProbeConfig, command: str, explicit_model: bool):
    """Shared set-up of the frozen-feature protocols: run dir, datasets (no augmentation) and
    cached features of the train and held-out splits."""
    ck = _adopt_model_config(cfg, cfg.probe.pretrained, explicit_model)
    run_dir, device = _prepare(cfg, command)
    train = build_dataset(cfg.data, "train", cfg.model.img_size, cfg.model.in_chans, cfg.run.seed,
                          train_aug=False, labelled=True,
                          label_fraction=cfg.probe.label_fraction)
    val = build_dataset(cfg.data, "val", cfg.model.img_size, cfg.model.in_chans, cfg.run.seed,
                        train_aug=False, labelled=True, mean=train.mean, std=train.std)
    fn = _probe_encoder(cfg, device, ck)
    nw, prog = cfg.data.num_workers, cfg.run.progress
    return (run_dir, train, val, extract_features(fn, train, device, num_workers=nw, progress=prog),
            extract_features(fn, val, device, num_workers=nw, progress=prog))


def knn(cfg: ProbeConfig, explicit_model: bool = False) -> dict:
    run_dir, train, val, (ftr, ytr), (fte, yte) = frozen_features(cfg, "knn",
                                                                     explicit_model)
    nc = len(train.classes)
    pred = knn_classify(ftr, ytr, fte, cfg.probe.k, cfg.probe.temperature, nc)
    top1 = 100.0 * float((pred == yte).float().mean())
    out = {"command": "knn", "run_dir": str(run_dir), "pretrained": cfg.probe.pretrained,
           "top1": top1, "k": cfg.probe.k, "temperature": cfg.probe.temperature,
           "feature": cfg.probe.feature, "train_images": len(train), "val_images": len(val),
           "correct": pack_correct((pred == yte).numpy())}
    _write_results(run_dir, out)
    log.info("k-NN top-1 %.2f%%", top1)
    return out


def linprobe(cfg: ProbeConfig, explicit_model: bool = False) -> dict:
    run_dir, train, val, (ftr, ytr), (fte, yte) = frozen_features(cfg, "linprobe",
                                                                     explicit_model)
    nc = len(train.classes)
    # choose the lr on 10 % of the training features, then retrain on all and test once
    g = torch.Generator().manual_seed(cfg.run.seed)
    perm = torch.randperm(len(ftr), generator=g)
    n_hold = max(1, len(ftr) // 10)
    hold, fit = perm[:n_hold], perm[n_hold:]
    p = cfg.probe
    sel = train_linear_heads(ftr[fit], ytr[fit], ftr[hold], nc, p.lrs, p.epochs, p.batch_size,
                             p.weight_decay, cfg.run.seed)
    sel_acc = {lr: 100.0 * float((lg.argmax(-1) == ytr[hold]).float().mean())
               for lr, lg in sel.items()}
    best_lr = max(sel_acc, key=sel_acc.get)
    final = train_linear_heads(ftr, ytr, fte, nc, p.lrs, p.epochs, p.batch_size,
                               p.weight_decay, cfg.run.seed)
    test_acc = {lr: 100.0 * float((lg.argmax(-1) == yte).float().mean())
                for lr, lg in final.items()}
    out = {"command": "linprobe", "run_dir": str(run_dir), "pretrained": p.pretrained,
           "top1": test_acc[best_lr], "best_lr": best_lr,
           "holdout_top1_per_lr": {str(k): v for k, v in sel_acc.items()},
           "test_top1_per_lr": {str(k): v for k, v in test_acc.items()},
           "feature": p.feature, "train_images": len(train), "val_images": len(val),
           "correct": pack_correct((final[best_lr].argmax(-1) == yte).numpy())}
    _write_results(run_dir, out)
    log.info("linear probe top-1 %.2f%% (lr %g chosen on held-out training features)",
             test_acc[best_lr], best_lr)
    return out
