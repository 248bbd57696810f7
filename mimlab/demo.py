"""``mimlab demo``: a few minutes of MAE pretraining on real offline images, evaluation,
reconstruction figure and summary.

Data: ``--data PATH`` (ImageFolder or plain folder), else the CIFAR-10 copy at
``../shared/data/cifar10``, else natural photos bundled with scikit-image (random crops).

Budget: the ``mini`` ViT (patch 4, 32 px), batch 128, base lr 1.5e-3, and :data:`DEMO_STEPS`
optimizer steps (5 epochs of a 10,000-image CIFAR-10 subset). The learning curves of this
recipe measured by protocol v1's ``core`` stage (``docs/results/standard/report.md``)
put the point where MAE's k-NN accuracy passes a random initialisation's between 156 and 312
steps, so the demo trains past it; fewer steps can show MAE *below* random
init, which says nothing about MAE. A labelled data set is evaluated with k-NN for the MAE
encoder and for a random initialisation of the same architecture, and both figures are printed
with their budget.

Small data sets are repeated within an epoch (``data.repeat``, as the small-data pretraining of
Kong & Zhang, Tables 6-7, does) so that an epoch has at least :data:`MIN_STEPS_PER_EPOCH`
steps; the epochs are then chosen to give about :data:`DEMO_STEPS` steps in all, whatever the
size of the data set. The summary says when this happened.

The reconstruction figure shows one held-out image per class (where there are classes) and
de-normalises masked ``norm_pix`` patches with statistics of the visible patches only (no
leak; see :mod:`mimlab.analysis.recon`), labelled as such.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import tasks
from .analysis.recon import (
    load_reconstructive,
    reconstruct,
    reconstruction_psnr,
    save_grid,
    stats_label,
)
from .core.config import (
    DataConfig,
    PretrainConfig,
    ProbeConfig,
    data_workers,
    parse_overrides,
    resolve,
)
from .data.datasets import (
    build_dataset,
    default_data_path,
    detect_kind,
    scan_source,
    subset_indices,
)

DEMO_STEPS = 390  # optimizer steps of pretraining (5 epochs of 10,000 images)
DEMO_BATCH = 128
DEMO_IMAGES = 10_000  # labelled data: training subset for pretraining and k-NN
MIN_STEPS_PER_EPOCH = 10  # smaller data sets are repeated within an epoch (data.repeat)
GRID_ROWS = 10  # reconstruction figure: images (one per class where labelled)
PSNR_IMAGES = 200  # held-out images for the reconstruction PSNR


def _labelled(path: str) -> bool:
    p = Path(path)
    if path.startswith("builtin:") or not p.is_dir():
        return False
    try:
        if detect_kind(p) == "fmnist":
            return True
        return (
            (p / "train").is_dir()
            and (p / "test").is_dir()
            and detect_kind(p / "train") == "imagefolder"
        )
    except OSError:
        return False


def plan_budget(
    n_images: int, steps: int = DEMO_STEPS, batch: int = DEMO_BATCH, epochs: Optional[int] = None
) -> dict:
    """Epochs and ``data.repeat`` that give about ``steps`` optimizer steps of ``batch`` images
    on ``n_images`` distinct images.

    The set is repeated ``repeat = ceil(MIN_STEPS_PER_EPOCH * batch / n_images)`` times per epoch
    when it has fewer than ``MIN_STEPS_PER_EPOCH`` batches (7 photos, batch 128: repeat 183, an
    epoch of 1,281 images = 10 steps); ``epochs`` (default ``round(steps / steps_per_epoch)``,
    at least 1). Returns ``{'epochs', 'repeat', 'steps_per_epoch', 'steps'}``."""
    if n_images < 1:
        raise ValueError(f"the data set has no images (n_images={n_images})")
    repeat = 1
    if n_images < MIN_STEPS_PER_EPOCH * batch:
        repeat = math.ceil(MIN_STEPS_PER_EPOCH * batch / n_images)
    spe = n_images * repeat // batch
    ep = epochs if epochs is not None else max(1, round(steps / spe))
    return {"epochs": ep, "repeat": repeat, "steps_per_epoch": spe, "steps": ep * spe}


def _count_images(path: str, train_split: Optional[str]) -> int:
    cfg = DataConfig(path=path)
    if train_split is not None:
        cfg.train_split = train_split
    return len(scan_source(cfg, "train", labelled=False).items)


def _spread_over_classes(labels: Sequence[int], n: int) -> list[int]:
    """Indices of ``n`` items taking the classes in turn (first unused item of each class in
    order, then the next round): one image per class when ``n`` >= the number of classes."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    out: list[int] = []
    while len(out) < min(n, len(labels)):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def _knn_line(name: str, r: dict, budget: str) -> str:
    return f"{name} {r['top1']:.2f}% ({budget})"


def demo(
    data: Optional[str] = None,
    out: str = "runs",
    epochs: Optional[int] = None,
    images: Optional[int] = None,
    preset: Optional[str] = None,
    overrides: Sequence[str] = (),
    steps: Optional[int] = None,
) -> dict:
    """Run the demo (see the module docstring); returns the results and the run directory.

    ``epochs`` / ``steps``: pretraining length (default about :data:`DEMO_STEPS` steps);
    ``images``: distinct training images (default 10,000 for a labelled set, all for a plain
    folder); ``preset``: model preset (default ``mini``); ``overrides``: pretraining
    ``key=value`` overrides, applied last (an explicit ``data.repeat`` or ``optim.epochs``
    wins over the plan)."""
    t0 = time.time()
    path = data or default_data_path() or "builtin:photos"
    labelled = _labelled(path)
    photos = path.startswith("builtin:photos")
    run_dir = Path(out) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=False)
    train_split = None if labelled else ""
    n_avail = _count_images(path, train_split)
    n_img = min(n_avail, images or (DEMO_IMAGES if labelled else n_avail))
    user = parse_overrides(list(overrides))
    batch = int((user.get("optim") or {}).get("batch_size", DEMO_BATCH))
    plan = plan_budget(n_img, steps or DEMO_STEPS, batch, epochs)
    ov = [
        f"data.path={path}",
        f"run.out_dir={run_dir}",
        "run.name=pretrain",
        f"model.preset={preset or 'mini'}",
        f"optim.epochs={plan['epochs']}",
        f"optim.batch_size={batch}",
        "optim.base_lr=1.5e-3",
        "optim.warmup_epochs=0.5",
        f"data.repeat={plan['repeat']}",
        "run.log_every=10",
    ]
    if plan["steps"] > (steps or DEMO_STEPS) and epochs is None:  # fewer steps than one epoch
        ov.append(f"run.max_steps={steps or DEMO_STEPS}")
    if photos:  # a few photos: many small random crops of each
        ov += ["data.crop_scale=[0.02,0.2]"]
    if not labelled:
        ov += ["data.train_split=''"]
    if not photos:
        ov.append(f"data.limit={n_img}")
    cfg = resolve(PretrainConfig, overrides=ov + list(overrides))
    repeated = cfg.data.repeat > 1
    if repeated:
        print(
            f"[demo] {n_img} images are fewer than {MIN_STEPS_PER_EPOCH} batches of {batch}: "
            f"repeating the set {cfg.data.repeat}x per epoch (data.repeat, as the paper's "
            f"small-data pretraining does), {cfg.optim.epochs} epochs",
            flush=True,
        )
    pre = tasks.pretrain(cfg)
    ckpt = pre["checkpoint"]
    mean, std = pre["data_mean"], pre["data_std"]
    seen = pre["steps"] * batch
    budget = (
        f"{cfg.model.preset} ViT, {pre['steps']} steps x {batch} = {seen:,} images seen "
        f"({n_img:,} distinct"
        + (f", repeated {cfg.data.repeat}x per epoch" if repeated else "")
        + f"), {pre['seconds']:.0f} s of pretraining"
    )

    # reconstructions: held-out images (training images when there is no held-out split)
    method, _ = load_reconstructive(ckpt)
    split = "val" if labelled else "train"
    ds = build_dataset(
        cfg.data,
        split,
        cfg.model.img_size,
        cfg.model.in_chans,
        cfg.run.seed,
        train_aug=not labelled,
        labelled=labelled,
        mean=mean,
        std=std,
    )
    if labelled and ds.classes:
        labels = ds.labels
        rows = _spread_over_classes(labels, min(GRID_ROWS, len(ds)))
        row_names = [ds.classes[labels[i]] for i in rows]
        extra = [
            i
            for i in subset_indices(labels, PSNR_IMAGES, "one_per_class", cfg.run.seed)
            if i not in set(rows)
        ]
    else:
        rows = list(range(min(8, len(ds))))
        row_names = None
        extra = list(range(len(rows), min(PSNR_IMAGES, len(ds))))
    idx = rows + extra[: max(0, PSNR_IMAGES - len(rows))]
    x = torch.stack([ds[(i, 0)].images for i in idx])
    noise = torch.rand(
        len(idx), method.encoder.num_patches, generator=torch.Generator().manual_seed(0)
    )
    rec = reconstruct(method, x, noise)
    ps = reconstruction_psnr(rec, mean, std)
    fig = save_grid(
        rec,
        mean,
        std,
        run_dir / "reconstructions.png",
        n=len(rows),
        title=f"MAE, {cfg.model.preset} ViT after {pre['steps']} steps x {batch} "
        f"images, mask ratio {cfg.method.mask_ratio:g}; "
        f"{'held-out' if labelled else 'training'} images",
        stats="visible",
        row_labels=row_names,
    )
    results = {
        "data": path,
        "pretrain": pre,
        "budget": budget,
        "distinct_images": n_img,
        "repeat": cfg.data.repeat,
        "reconstruction": ps,
        "reconstruction_images": len(idx),
        "figure": str(fig),
        "figure_stats": "visible",
        "figure_rows": row_names,
    }

    if labelled:
        for tag, pretrained in (("mae", ckpt), ("random", None)):
            t1 = time.time()
            pov = [
                f"data.path={path}",
                f"run.out_dir={run_dir}",
                f"run.name=knn-{tag}",
                f"data.limit={n_img}",
                "data.val_limit=2000",
                "run.progress=false",
                f"data.num_workers={data_workers(cfg.data.num_workers)}",
            ]
            pov += (
                [f"probe.pretrained={pretrained}"]
                if pretrained
                else [f"model.preset={cfg.model.preset}", f"run.seed={cfg.run.seed}"]
            )
            pc = tasks.resolve_run_config(ProbeConfig, overrides=pov)
            results[f"knn_{tag}"] = tasks.knn(pc)
            results[f"knn_{tag}"]["seconds"] = round(time.time() - t1, 1)
            results[f"knn_{tag}"].pop("correct", None)
    results["seconds"] = round(time.time() - t0, 1)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [
        f"# mimlab demo ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- data: `{path}` ({'labelled' if labelled else 'unlabelled'}), {n_img:,} "
        f"distinct training images",
        f"- MAE pretraining: {budget} ({pre['images_per_s']} images/s; "
        f"{cfg.model.img_size} px, patch {cfg.model.patch_size}); final loss "
        f"{pre['final_loss']:.4f}",
    ]
    if repeated:
        lines.append(
            f"- small data set: repeated {cfg.data.repeat}x per epoch (data.repeat, as "
            f"the paper's small-data pretraining does) for {cfg.optim.epochs} epochs"
        )
    if labelled:
        km, kr = results["knn_mae"], results["knn_random"]
        lines += [
            f"- k-NN top-1 (k={km['k']}, features of {km['train_images']:,} training "
            f"images, {km['val_images']:,} held-out test images; {km['seconds']:.0f} s "
            f"and {kr['seconds']:.0f} s to evaluate):",
            f"  - {_knn_line('MAE', km, budget)}",
            f"  - {_knn_line('random init', kr, f'same {cfg.model.preset} ViT, 0 steps')}",
            f"  - MAE minus random init: {km['top1'] - kr['top1']:+.2f} points",
        ]
        if km["top1"] <= kr["top1"]:
            lines.append(
                "  - at this budget MAE's features are not yet better than a random "
                "network's; train longer (--steps or --epochs)"
            )
    what = "held-out images" if labelled else "augmented crops of the training images"
    shown = f"{len(rows)} images" + (", one per class" if row_names else "")
    lines += [
        f"- reconstruction PSNR on {len(idx)} {what}, visible patches pasted back: "
        f"{ps['psnr_visible_stats']:.2f} dB with masked patches de-normalised by the "
        f"visible patches' mean/std (no leak), {ps['psnr_true_stats']:.2f} dB with their "
        "true mean/std (leak)",
        f"- figure: `reconstructions.png` ({shown}; {stats_label(rec['norm_pix'], 'visible')})",
        "",
        f"Pretraining run: `{pre['run_dir']}` (config.yaml, metrics.csv, tb/, checkpoints/)",
        f"Total time: {results['seconds']} s",
        "",
    ]
    (run_dir / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return {"run_dir": str(run_dir), **results}
