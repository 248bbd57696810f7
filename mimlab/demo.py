"""``mimlab demo``: brief MAE pretraining on real offline images, evaluation, figure, summary.

Data: ``--data PATH`` (ImageFolder or plain folder), else the CIFAR-10 copy at
``../shared/data/cifar10``, else natural photos bundled with scikit-image (random crops).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import PretrainConfig, ProbeConfig, resolve
from .data import DataError, build_dataset, default_data_path, detect_kind
from .engine import load_checkpoint


def _labelled(path: str) -> bool:
    p = Path(path)
    if path.startswith("builtin:") or not p.is_dir():
        return False
    try:
        if detect_kind(p) == "fmnist":
            return True
        return (p / "train").is_dir() and (p / "test").is_dir() and \
            detect_kind(p / "train") == "imagefolder"
    except OSError:
        return False


def demo(data: Optional[str] = None, out: str = "runs", epochs: Optional[int] = None,
         images: Optional[int] = None, preset: Optional[str] = None,
         overrides: Sequence[str] = ()) -> dict:
    from . import tasks
    from .analysis.recon import reconstruct, reconstruction_psnr, save_grid
    from .methods import build_method
    t0 = time.time()
    path = data or default_data_path() or "builtin:photos"
    labelled = _labelled(path)
    photos = path.startswith("builtin:photos")
    run_dir = Path(out) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=False)
    n_img = images or (5000 if labelled or not photos else 5)
    ov = [f"data.path={path}", f"run.out_dir={run_dir}", "run.name=pretrain",
          f"model.preset={preset or 'tiny'}", f"optim.epochs={epochs or 3}",
          "optim.batch_size=64", "optim.base_lr=1.5e-3", "optim.warmup_epochs=0.5",
          "run.log_every=10"]
    if photos:  # 5 photos: many random crops of each
        ov += ["data.repeat=1000", "data.crop_scale=[0.02,0.2]", "data.train_split=''"]
    elif not labelled:
        ov += ["data.train_split=''"]
    if not photos:
        ov.append(f"data.limit={n_img}")
    cfg = resolve(PretrainConfig, overrides=ov + list(overrides))
    pre = tasks.pretrain(cfg)
    ckpt = pre["checkpoint"]

    # reconstructions of held-out images (training images when there is no held-out split)
    method = build_method(cfg)
    sd = load_checkpoint(ckpt)["model"]
    method.load_state_dict(sd)
    split = "val" if labelled else "train"
    dcfg = cfg.data
    if labelled:
        dcfg.val_limit = 64
    ds = build_dataset(dcfg, split, cfg.model.img_size, cfg.model.in_chans, cfg.run.seed,
                       train_aug=not labelled, labelled=False, mean=pre["data_mean"],
                       std=pre["data_std"])
    n = min(64, len(ds))
    x = torch.stack([ds[(i, 0)][0] for i in range(n)])
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(n, method.encoder.num_patches, generator=g)
    rec = reconstruct(method, x, noise)
    ps = reconstruction_psnr(rec, pre["data_mean"], pre["data_std"])
    fig = save_grid(rec, pre["data_mean"], pre["data_std"], run_dir / "reconstructions.png",
                    n=8, title=f"MAE after {pre['epochs']} epoch(s), mask ratio "
                               f"{cfg.method.mask_ratio:g}")
    results = {"data": path, "pretrain": pre, "reconstruction": ps, "figure": str(fig)}

    if labelled:
        for tag, pretrained in (("mae", ckpt), ("random", None)):
            pov = [f"data.path={path}", f"run.out_dir={run_dir}", f"run.name=knn-{tag}",
                   f"data.limit={n_img}", "data.val_limit=2000", "run.progress=false"]
            pov += [f"probe.pretrained={pretrained}"] if pretrained else \
                [f"model.preset={cfg.model.preset}"]
            pc = resolve(ProbeConfig, overrides=pov)
            results[f"knn_{tag}"] = tasks.knn(pc, explicit_model=pretrained is None)
    results["seconds"] = round(time.time() - t0, 1)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [f"# mimlab demo ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"- data: `{path}` ({'labelled' if labelled else 'unlabelled'}), "
             f"{pre['steps']} steps of MAE ({cfg.model.preset} ViT, {cfg.model.img_size} px, "
             f"patch {cfg.model.patch_size}) in {pre['seconds']} s "
             f"({pre['images_per_s']} images/s)",
             f"- final training loss: {pre['final_loss']:.4f}",
             f"- reconstruction PSNR on {n} {'held-out' if labelled else 'training'} images: "
             f"{ps['psnr']:.2f} dB (visible patches pasted back), "
             f"{ps['psnr_all_predicted']:.2f} dB (every patch predicted)",
             "- figure: `reconstructions.png`"]
    if labelled:
        lines.append(f"- k-NN top-1 (k=20, {results['knn_mae']['train_images']} train / "
                     f"{results['knn_mae']['val_images']} held-out images): "
                     f"MAE {results['knn_mae']['top1']:.2f}% vs random init "
                     f"{results['knn_random']['top1']:.2f}%")
    lines += ["", f"Pretraining run: `{pre['run_dir']}` (config.yaml, metrics.csv, tb/, "
              "checkpoints/)", f"Total time: {results['seconds']} s", ""]
    (run_dir / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return {"run_dir": str(run_dir), **results}
