"""Parsers and dispatch of ``mimlab analyze cka | psnr`` and ``mimlab visualize`` (kept out
of ``mimlab/cli.py``, which only calls :func:`add_parsers` and :func:`dispatch`)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Optional

from . import AnalysisError

SUMMARY = {
    "analyze": "analysis: block-wise CKA full vs masked images (cka), reconstruction PSNR (psnr)",
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
    """Add ``analyze`` (sub-commands ``cka``, ``psnr``) and ``visualize`` to ``sub``."""
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
    print("usage: mimlab analyze {cka,psnr} ... (mimlab analyze --help)", file=sys.stderr)
    return 2
