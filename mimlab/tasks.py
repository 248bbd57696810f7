"""Commands as Python functions: pretrain, finetune, linprobe, knn (the CLI calls these).

Each takes a resolved config, creates its run directory (resolved ``config.yaml``, ``log.txt``,
metrics, checkpoints, ``results.json``) and returns a dict of results.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist
from .config import (ConfigError, FinetuneConfig, ModelConfig, PretrainConfig, ProbeConfig,
                     RunConfig, from_dict, save_yaml, to_dict)
from .data import build_dataset, default_data_path
from .engine import Engine, TrainingError, load_checkpoint, seed_everything
from .methods import Method, build_method
from .models import ViTEncoder, build_encoder

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


def setup_logging(run_dir: Optional[Path] = None, verbose: bool = True) -> None:
    root = logging.getLogger("mimlab")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_mimlab", False):
            root.removeHandler(h)
    if not dist.is_main():
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if verbose:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh._mimlab = True
        root.addHandler(sh)
    if run_dir is not None:
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(fmt)
        fh._mimlab = True
        root.addHandler(fh)
    root.propagate = False


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
    eng = Engine(method, ds, cfg, cfg.optim, cfg.run, run_dir, batch_fn=batch_fn, device=device)
    res = eng.fit()
    out = {"command": "pretrain", "method": cfg.method.name, "run_dir": str(run_dir),
           "steps": res.global_step, "epochs": res.epochs_done, "seconds": round(res.seconds, 1),
           "images_per_s": round(res.images_per_s, 1), "final_loss": res.last_metrics.get("loss"),
           "skipped_files": res.skipped_files, "checkpoint": str(run_dir / "checkpoints/last.pt"),
           "world_size": res.world_size,
           "ddp_max_param_divergence": res.ddp_max_param_divergence,
           "data_mean": ds.mean, "data_std": ds.std}
    if cache is not None:
        out.update(teacher_cache=str(cache.path), teacher_cache_built=cache.built)
    _write_results(run_dir, out)
    return out


# ------------------------------------------------------------------------- checkpoints
def model_config_of(ckpt: dict) -> ModelConfig:
    return from_dict(ModelConfig, ckpt["config"]["model"])


def encoder_state(ckpt: dict) -> dict:
    """Encoder weights of a mimlab checkpoint (pretrain or finetune), keys without prefix."""
    sd = ckpt["model"] if "model" in ckpt else ckpt
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if not enc:
        raise TrainingError("checkpoint holds no encoder weights (no 'encoder.*' keys)")
    return enc


def load_encoder_weights(encoder: ViTEncoder, path: str, ckpt: Optional[dict] = None,
                         trust: bool = False) -> dict:
    """Load a pretrained encoder into ``encoder``; architecture mismatches fail listing keys.

    ``ckpt``: the already loaded checkpoint at ``path`` (saves reading it twice)."""
    ck = load_checkpoint(path, trust=trust) if ckpt is None else ckpt
    sd = encoder_state(ck)
    own = encoder.state_dict()
    sd = {k: v for k, v in sd.items() if not (k == "mask_token" and k not in own)}
    if "norm.weight" not in own:  # classifier encoders use fc_norm instead of the final norm
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    bad_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
                 if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and k != "mask_token"]
    unexpected = [k for k in sd if k not in own]
    if bad_shape or missing or unexpected:
        raise TrainingError(
            f"checkpoint {path} does not fit this model: "
            + "; ".join(x for x in [
                f"shape mismatches: {', '.join(bad_shape[:6])}" if bad_shape else "",
                f"missing: {', '.join(missing[:6])}" if missing else "",
                f"unexpected: {', '.join(unexpected[:6])}" if unexpected else ""] if x)
            + " (set model.* to the pretraining model, e.g. model.preset=...)")
    encoder.load_state_dict(sd, strict=False)
    return ck


def _adopt_model_config(cfg: Any, pretrained: Optional[str], explicit_model: bool
                        ) -> Optional[dict]:
    """Use the checkpoint's architecture unless the user set model.* explicitly; returns the
    loaded checkpoint (None without one) so callers do not read the file again."""
    if not pretrained:
        return None
    ck = load_checkpoint(pretrained, trust=cfg.run.trust_checkpoints)
    if not explicit_model:
        keep_dp = cfg.model.drop_path
        cfg.model = model_config_of(ck)
        cfg.model.drop_path = keep_dp
    return ck


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
def evaluate_top1(model: Classifier, ds, batch_size: int, device, num_workers: int = 2) -> float:
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    correct = n = 0
    for x, y, _ in loader:
        pred = model.logits(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        n += len(y)
    return 100.0 * correct / max(n, 1)


def finetune(cfg: FinetuneConfig, explicit_model: bool = False) -> dict:
    ft = cfg.finetune
    ck = _adopt_model_config(cfg, ft.pretrained, explicit_model)
    run_dir, device = _prepare(cfg, "finetune")
    train = build_dataset(cfg.data, "train", cfg.model.img_size, cfg.model.in_chans, cfg.run.seed,
                          train_aug=True, labelled=True, label_fraction=ft.label_fraction)
    val = build_dataset(cfg.data, "val", cfg.model.img_size, cfg.model.in_chans, cfg.run.seed,
                        train_aug=False, labelled=True, mean=train.mean, std=train.std)
    nc = ft.num_classes or len(train.classes)
    enc = build_encoder(cfg.model, mask_token=False)
    if ft.pretrained:
        load_encoder_weights(enc, ft.pretrained, ckpt=ck)
        log.info("fine-tuning from %s", ft.pretrained)
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

    def eval_fn(m, epoch):
        return {"top1": evaluate_top1(m, val, 256, device, nw)}

    eng = Engine(model, train, cfg, cfg.optim, cfg.run, run_dir, eval_fn=eval_fn,
                 eval_every=ft.eval_every, batch_fn=batch_fn, device=device)
    res = eng.fit()
    out = {"command": "finetune", "run_dir": str(run_dir), "pretrained": ft.pretrained,
           "top1": res.eval_metrics.get("top1"), "train_images": len(train),
           "val_images": len(val), "epochs": res.epochs_done, "steps": res.global_step,
           "seconds": round(res.seconds, 1), "images_per_s": round(res.images_per_s, 1),
           "label_fraction": ft.label_fraction, "world_size": res.world_size,
           "ddp_max_param_divergence": res.ddp_max_param_divergence}
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


class _ClassifierFeatures(nn.Module):
    """Frozen features of a fine-tuned / supervised checkpoint: fc_norm(mean patch tokens)."""

    def __init__(self, clf: "Classifier"):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return self.clf.features(x)


def _probe_encoder(cfg: ProbeConfig, device, ck: Optional[dict]) -> nn.Module:
    """``x -> [B, D]`` frozen feature function for probing (encoder + pooling); ``ck`` is the
    loaded ``probe.pretrained`` checkpoint (None for a random initialisation)."""
    enc = build_encoder(cfg.model, mask_token=False)
    path = cfg.probe.pretrained
    if ck is not None and "fc_norm.weight" in ck["model"]:
        sd = ck["model"]
        clf = Classifier(enc, sd["head.weight"].shape[0])
        clf.load_state_dict(sd)
        return _ClassifierFeatures(clf).to(device)
    if ck is not None:
        load_encoder_weights(enc, path, ckpt=ck)
    pool = cfg.probe.feature
    return _Pooled(enc, pool).to(device)


class _Pooled(nn.Module):
    def __init__(self, enc: ViTEncoder, pool: str):
        super().__init__()
        self.enc, self.pool = enc, pool

    def forward(self, x):
        return self.enc.pool(self.enc.forward_features(x), self.pool)


def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, k: int,
                 temperature: float, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN (cosine similarity, votes exp(sim / T)); returns predicted labels."""
    tr = F.normalize(train_f, dim=1)
    te = F.normalize(test_f, dim=1)
    k = min(k, len(tr))
    preds = []
    for i in range(0, len(te), chunk):
        sim = te[i:i + chunk] @ tr.T
        s, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(s), num_classes)
        votes.scatter_add_(1, train_y[idx], (s / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


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
           "train_images": len(train), "val_images": len(val)}
    _write_results(run_dir, out)
    log.info("k-NN top-1 %.2f%%", top1)
    return out


def train_linear_heads(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor,
                       num_classes: int, lrs: list[float], epochs: int, batch_size: int,
                       weight_decay: float = 0.0, seed: int = 0) -> dict[float, torch.Tensor]:
    """Train one linear head per lr *in the same pass* over cached features.

    Features go through BatchNorm without affine (here with the statistics of the whole cached
    training set, i.e. BN's running statistics), then a linear layer; SGD momentum 0.9, cosine
    lr. Returns ``{lr: logits on fte}``.
    """
    g = torch.Generator().manual_seed(seed)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    xtr, xte = (ftr - mu) / sd, (fte - mu) / sd
    L, D = len(lrs), ftr.shape[1]
    W = torch.zeros(L, D, num_classes, requires_grad=True)
    b = torch.zeros(L, 1, num_classes, requires_grad=True)
    with torch.no_grad():
        W.normal_(0, 0.01, generator=g)
    lr_t = torch.tensor(lrs).view(L, 1, 1)
    mom_W, mom_b = torch.zeros_like(W), torch.zeros_like(b)
    n = len(xtr)
    steps = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x, y = xtr[idx], ytr[idx]
            logits = torch.einsum("nd,ldc->lnc", x, W) + b
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y.repeat(L), reduction="sum") / len(idx)
            gW, gb = torch.autograd.grad(loss, [W, b])
            scale = 0.5 * (1 + math.cos(math.pi * step / steps))
            with torch.no_grad():
                gW = gW + weight_decay * W
                mom_W.mul_(0.9).add_(gW)
                mom_b.mul_(0.9).add_(gb)
                W -= lr_t * scale * mom_W
                b -= lr_t * scale * mom_b
            step += 1
    with torch.no_grad():
        logits = torch.einsum("nd,ldc->lnc", xte, W) + b
    return {lr: logits[i] for i, lr in enumerate(lrs)}


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
           "train_images": len(train), "val_images": len(val)}
    _write_results(run_dir, out)
    log.info("linear probe top-1 %.2f%% (lr %g chosen on held-out training features)",
             test_acc[best_lr], best_lr)
    return out
