"""``mimlab`` command line: pretrain | finetune | linprobe | knn | segment | demo | export |
methods | flops | bench | stats | shards | reproduce | analyze | visualize (the last two:
:mod:`mimlab.analysis.cli`).

Every training/evaluation command takes ``--config file.yaml`` and ``key=value`` overrides
(e.g. ``optim.epochs=5 model.preset=vit_b16``); ``mimlab <command> --help`` lists every key
with its type, default and meaning. Runs go to ``run.out_dir/run.name`` with the resolved
``config.yaml``. Under ``torchrun``, pretrain and finetune run data-parallel (DDP).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Optional

import yaml

from . import __version__
from .analysis.cli import add_parsers as add_analysis_parsers
from .analysis.cli import dispatch as analysis_dispatch
from .core.config import (
    SEGMENT_RECIPES,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    PretrainConfig,
    ProbeConfig,
    SegmentConfig,
    describe,
    resolve,
    to_dict,
)
from .core.registry import FAMILIES, PRESETS, presets_of, reading_families

CONFIGS = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "linprobe": ProbeConfig,
    "knn": ProbeConfig,
    "segment": SegmentConfig,
}
SUMMARY = {
    "pretrain": "self-supervised pretraining (method.name selects MAE, ...)",
    "finetune": "end-to-end fine-tuning (or supervised training from scratch) + top-1",
    "linprobe": "linear probe on frozen features, several lrs in one pass + top-1",
    "knn": "weighted k-NN on frozen features + top-1",
    "segment": "semantic segmentation fine-tuning (linear or UperNet head) + mIoU",
    "demo": "offline demo: brief MAE pretraining, evaluation, figure and summary",
    "export": "write any model source in timm's or transformers' Hub format (or a .pt)",
    "stats": "compute per-channel mean/std of a dataset",
    "shards": "write an image folder as WebDataset tar shards (data.kind=wds)",
    "methods": "list the method families (the fields each reads) and their presets",
    "bench": "benchmark training steps, data pipeline and memory; write a markdown report "
    "(repository tool: needs the checkout's benchmarks/)",
    "reproduce": "run the papers' evidence suite (evidence | quick | full), resumable; "
    "writes report.md",
}

SEGMENT_HELP = textwrap.dedent("""\
    Semantic segmentation fine-tuning + mIoU, per-class IoU and pixel accuracy.

    Backbone: --pretrained (any model source: a mimlab checkpoint, mimlab:, mae:, timm:, hf:,
    mocov3:; position embeddings resampled to segment.crop_size) or random init. Heads:
    segment.head=linear (last block's patch tokens, BatchNorm + 1x1 conv, bilinear upsampling)
    or upernet (blocks 4, 6, 8, 12 of 12 at 4x, 2x, 1x, 1/2x; auxiliary FCN head with
    segment.aux_weight > 0). AdamW with layer-wise lr decay, linear warm-up then poly schedule
    for segment.iters steps, random rescale / crop / flip and photometric jitter, ignored
    pixels left out; test on the whole image or with a sliding window (segment.test_mode).

    Data (--data): ADE20K (ADEChallengeData2016/images/{training,validation},
    annotations/...; 0 = ignore, 150 classes), CamVid (images/<split>, annotations/<split>;
    11 = void), or any image folder + mask folder (segment.dataset=generic segment.images=...
    segment.masks=... segment.num_classes=K segment.ignore_index=V). A mask whose size
    differs from its image, or with a class id out of range, stops with one line naming it.

    Writes results.json, confusion.csv, predictions.png (image / ground truth / prediction)
    and, with segment.save_predictions=true, coloured PNGs under predictions/.

    examples:
      mimlab segment --recipe camvid_cpu --data ../shared/data/camvid
      mimlab segment --recipe ade20k_vit_b --data ADEChallengeData2016 \\
          --pretrained mae:mae_pretrain_vit_base.pth""")


def _keys_help(cls) -> str:
    rows = describe(cls)
    w = max(len(r[0]) for r in rows)
    lines = ["configuration keys (set with key=value or in --config YAML):"]
    for key, tp, default, docs in rows:
        read = ""
        if key.startswith("method.") and key != "method.name":  # from the method registry
            read = "; read by " + ", ".join(reading_families(key.split(".", 1)[1]))
        lines.append(f"  {key.ljust(w)}  {docs}")
        lines.append(f"  {''.ljust(w)}  [{tp}; default {default}{read}]")
    return "\n".join(lines)


def methods_listing() -> str:
    """``mimlab methods``: the registry's families, the fields each reads, and its presets."""
    lines = []
    for fam in FAMILIES.values():
        lines += [
            f"{fam.name}: {fam.title}",
            f"  {fam.about}",
            f"  reads method.{{{', '.join(sorted(fam.reads - {'name'}))}}}",
        ]
        for name in presets_of(fam.name):
            p = PRESETS[name]
            lines.append(f"  {name:<17} {p.about}")
            lines.append(" " * 20 + ", ".join(f"{k}={v}" for k, v in p.values.items()))
        lines.append("")
    return "\n".join(lines).rstrip()


def _add_common(p: argparse.ArgumentParser, probe: bool = False, ft: bool = False) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. "
        + ("probe.k=10 data.limit=1000" if probe else "optim.epochs=5 model.preset=vit_b16"),
    )
    p.add_argument("--config", help="YAML config file (read with a safe loader)")
    p.add_argument("--data", help="dataset path (same as data.path=...)")
    p.add_argument("--out", help="parent folder of run directories (run.out_dir)")
    p.add_argument("--name", help="run directory name (run.name)")
    p.add_argument("--resume", help="checkpoint to resume from, or 'auto' (run.resume)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run of the same --name (run.overwrite=true); without it such "
        "a run directory is refused unless --resume continues it",
    )
    if probe or ft:
        p.add_argument(
            "--pretrained",
            help="mimlab checkpoint to evaluate / start from (omit for a random initialisation)",
        )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line (``mimlab: error: ...``; ``--help`` for more)."""

    def error(self, message: str):
        print(
            f"mimlab: error: {' '.join(message.split())} (see `{self.prog} --help`)",
            file=sys.stderr,
        )
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="mimlab",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Masked image modeling: pretrain, evaluate and analyse Vision Transformers.",
        epilog=textwrap.dedent("""\
            examples:
              mimlab demo
              mimlab pretrain --data ../shared/data/cifar10 optim.epochs=100
              mimlab finetune --data ../shared/data/cifar10 --pretrained runs/X/checkpoints/last.pt
              mimlab segment --recipe camvid_cpu --data ../shared/data/camvid
              torchrun --nproc_per_node=2 -m mimlab.cli pretrain --data DIR run.device=cpu
            """),
    )
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command", metavar="command")
    for name, cls in CONFIGS.items():
        p = sub.add_parser(
            name,
            help=SUMMARY[name],
            description=SUMMARY[name],
            epilog=_keys_help(cls),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common(p, probe=name in ("linprobe", "knn"), ft=name in ("finetune", "segment"))
        if name == "segment":
            p.description = SEGMENT_HELP
            p.add_argument(
                "--recipe",
                choices=sorted(SEGMENT_RECIPES),
                help="base settings below --config and key=value: ade20k_vit_b (BEiT / MAE "
                "UperNet recipe: ViT-B/16, 512 crops, 160k steps at batch 16; for GPUs) | "
                "camvid_cpu (mini ViT, 96-pixel crops of CamVid at 160x120, linear head, "
                "300 steps of 8 on a CPU)",
            )
    d = sub.add_parser(
        "demo",
        help=SUMMARY["demo"],
        description=textwrap.dedent("""\
        Pretrain MAE for a few minutes on real offline images (your --data, else the CIFAR-10
        copy in ../shared/data, else photos bundled with scikit-image; a small set is repeated
        per epoch, data.repeat), evaluate it (k-NN against a random initialisation where labels
        exist, reconstruction PSNR), and write a run directory with metrics, a reconstruction
        figure (masked patches with the visible patches' statistics) and summary.md."""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--data", help="your images: ImageFolder (labelled) or plain folder")
    d.add_argument("--out", default="runs", help="parent folder of the run directory")
    d.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="pretraining epochs (default: what gives about --steps steps)",
    )
    d.add_argument(
        "--steps",
        type=int,
        default=None,
        help="pretraining optimizer steps of 128 images (default 390)",
    )
    d.add_argument(
        "--images",
        type=int,
        default=None,
        help="distinct training images (default 10000 for CIFAR-10, else all)",
    )
    d.add_argument("--preset", default=None, help="model preset (default: mini)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="extra pretraining overrides")
    e = sub.add_parser("export", help=SUMMARY["export"], description=SUMMARY["export"])
    e.add_argument(
        "checkpoint",
        metavar="SOURCE",
        help="model source: a mimlab checkpoint (pretrain or finetune), "
        "mae:FILE, timm:NAME@FILE, hf:DIR, mocov3:FILE",
    )
    e.add_argument("output", help="output directory (timm / hf format) or .pt file")
    e.add_argument(
        "--format",
        default="auto",
        choices=("auto", "timm", "hf", "pt", "mimlab"),
        help="timm: safetensors + config.json for timm.create_model('local-dir:OUT',"
        " pretrained=True); hf: transformers ViTMAEForPreTraining (MAE with "
        "decoder) or ViTModel directory; pt: state dict + timm kwargs; mimlab: one "
        "mimlab checkpoint file (e.g. of a sharded checkpoints/<name>.dcp directory of "
        "run.parallel=fsdp); auto: pt when OUTPUT ends in .pt, else timm",
    )
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUTPUT file or the files in a non-empty OUTPUT folder "
        "(never the source itself)",
    )
    sub.add_parser("methods", help=SUMMARY["methods"], description=SUMMARY["methods"])
    fl = sub.add_parser(
        "flops",
        help="training FLOPs per image of every method preset "
        "(analytic, checked against a FLOP counter)",
        description="Training FLOPs per image (forward + backward) of each "
        "method preset: analytic (mimlab/analysis/flops.py), counted with "
        "torch.utils.flop_counter on one step, their ratio, and the cost "
        "relative to MAE.",
    )
    fl.add_argument("--preset", default="mini", help="model preset (default mini)")
    fl.add_argument("--methods", default=None, help="comma-separated method presets (default: all)")
    fl.add_argument(
        "--batch",
        type=int,
        default=8,
        help="images of the counted step; also the InfoNCE keys (default 8)",
    )
    fl.add_argument(
        "--json",
        default=None,
        metavar="OUT",
        help="also write the table and every breakdown as JSON",
    )
    _add_bench_parser(sub)
    sh = sub.add_parser(
        "shards",
        help=SUMMARY["shards"],
        description=SUMMARY["shards"]
        + (
            ": OUT/<split>-NNNNNN.tar ({key}.jpg|png + {key}.cls) and OUT/_info.json (timm's "
            "reader_wds index + class names). An ImageFolder keeps its labels; train/ and test/ "
            "become two splits; a plain folder gives one unlabelled split."
        ),
    )
    sh.add_argument("src", help="ImageFolder, CIFAR-style copy (train/ test/) or image folder")
    sh.add_argument("out", help="output folder (new, or without an _info.json)")
    sh.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    sh.add_argument(
        "--limit",
        type=int,
        default=None,
        help="train split: a seeded random subset of this many images",
    )
    sh.add_argument("--order", default="shuffled", help="shuffled (seeded; default) | sorted")
    sh.add_argument("--seed", type=int, default=0, help="seed of --order and --limit")
    sh.add_argument(
        "--splits",
        default="train,test",
        help="splits to write when SRC has train/ and test/ (default both)",
    )
    sh.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("stats", help=SUMMARY["stats"], description=SUMMARY["stats"])
    s.add_argument("data", help="dataset path")
    s.add_argument("--in-chans", type=int, default=3)
    s.add_argument("--img-size", type=int, default=32)
    s.add_argument("--max-images", type=int, default=5000)
    r = sub.add_parser(
        "reproduce",
        help=SUMMARY["reproduce"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=SUMMARY["reproduce"]
        + "\n\n"
        + textwrap.dedent("""\
        One engine (mimlab.experiments.evidence) tests the claims of Kong & Zhang and
        MaskDistill. 'evidence' is protocol v2, run in stages into docs/results/standard/
        (governed by the committed protocol.json). 'quick' is the same engine at the smoke
        profile (micro ViT, 96 images, 2 units per arm: the CI smoke test, decides nothing);
        'full' is the gpu profile (tiny ViT, all of CIFAR-10, long budgets: meant for a GPU).
        A profile writes run directories and result files under --out and skips finished
        sub-runs when run again; a folder started with other settings is refused.
        Protocol v1 ('standard') is retired."""),
    )
    r.add_argument(
        "--suite",
        default="quick",
        help="evidence (protocol v2, in stages) | quick (smoke profile) | full (gpu profile) "
        "(default quick)",
    )
    r.add_argument(
        "--stage",
        default=None,
        help="evidence suite: protocol | ftbudget | core | contrastive | smalldata | rmae | "
        "augment | cmae_variants | sampling | bench1000 | ftbudget-mae; quick / full: one of "
        "the arm stages (default all)",
    )
    r.add_argument(
        "--results",
        default=None,
        help="evidence suite: folder of protocol.json and the small result files "
        "(default docs/results/standard)",
    )
    r.add_argument(
        "--report-only",
        action="store_true",
        help="evidence suite: regenerate v2/report.md from the result files only",
    )
    r.add_argument(
        "--data",
        help="labelled dataset with train/ and test/ (default: the "
        "CIFAR-10 copy at ../shared/data/cifar10)",
    )
    r.add_argument(
        "--out",
        help="run directories (evidence: default runs/standard); quick / full: the whole "
        "output, result files and report included (default runs/reproduce-<suite>)",
    )
    add_analysis_parsers(sub)  # analyze cka | psnr, visualize
    return ap


# ------------------------------------------------------------------ mimlab bench
#: ``mimlab bench`` runs this file of a mimlab checkout (a repository tool: the benchmark
#: scripts and their speed targets are not part of the installed package)
BENCH_SUITE = Path("benchmarks") / "suite.py"
BENCH_MISSING = (
    "mimlab bench is a repository tool: run it from a mimlab checkout; benchmarks/ not found"
)


def _add_bench_parser(sub) -> None:
    b = sub.add_parser(
        "bench",
        help=SUMMARY["bench"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=SUMMARY["bench"]
        + "\n\n"
        + textwrap.dedent("""\
        Runs the scripts of the checkout's benchmarks/ folder (bench_train.py, bench_data.py,
        bench_memory.py) one after the other and writes a markdown report with the machine,
        the versions, the commands, the result tables and the speed targets of
        benchmarks/targets.json (+ the raw results as .json). The checkout is the current
        directory, else the one this mimlab is installed from (pip install -e .). The MAE
        steps are also timed against the official MAE code when MIMLAB_OFFICIAL_MAE names a
        checkout of github.com/facebookresearch/mae (never part of mimlab)."""),
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small batches, one repetition (numbers not representative)",
    )
    b.add_argument(
        "--out",
        default=None,
        help="markdown report (default docs/performance.md; with --gpu "
        "docs/performance-gpu.md); the raw results go to the same name with .json",
    )
    b.add_argument(
        "--only",
        default=None,
        help="comma list of benchmarks to run: train, data, memory (default all)",
    )
    b.add_argument(
        "--cifar",
        default=None,
        help="CIFAR-10 copy for the data benchmark (default ../shared/data/cifar10)",
    )
    b.add_argument(
        "--gpu",
        action="store_true",
        help="instead: ViT-B/16 MAE steps on the CUDA device in bf16, eager and "
        "torch.compile'd, against HF ViTMAE (images/s per GPU, model-FLOPs "
        "utilisation)",
    )
    b.add_argument("--dry-run", action="store_true", help="print the commands and exit")


def find_bench_suite(cwd: Optional[Path] = None) -> Optional[Path]:
    """``benchmarks/suite.py`` of the checkout in ``cwd`` (default: the current directory),
    else of the checkout this package was loaded from; None outside a checkout."""
    for root in (Path.cwd() if cwd is None else Path(cwd), Path(__file__).resolve().parents[1]):
        if (root / BENCH_SUITE).is_file():
            return root / BENCH_SUITE
    return None


def load_bench_suite(path: Optional[Path] = None) -> ModuleType:
    """The benchmark suite module of a checkout (``benchmarks/suite.py``), loaded from its
    file; FileNotFoundError with :data:`BENCH_MISSING` outside a checkout."""
    path = path or find_bench_suite()
    if path is None:
        raise FileNotFoundError(BENCH_MISSING)
    name = "mimlab_bench_suite"
    mod = sys.modules.get(name)
    if mod is not None and Path(mod.__file__).resolve() == path.resolve():
        return mod
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def _one_line(e: BaseException) -> str:
    """Errors raised inside DataLoader workers carry the worker traceback in their message:
    keep only the original message."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(msg.split())


def _cmd_overrides(args, cls) -> list[str]:
    """A run command's ``key=value`` overrides, with its options (--data, --name ...) added."""
    ov = list(args.overrides or [])
    if getattr(args, "data", None):
        ov.append(f"data.path={args.data}")
    if getattr(args, "out", None):
        ov.append(f"run.out_dir={args.out}")
    if getattr(args, "name", None):
        ov.append(f"run.name={args.name}")
    if getattr(args, "resume", None):
        ov.append(f"run.resume={args.resume}")
    if getattr(args, "pretrained", None):
        sec = {FinetuneConfig: "finetune", SegmentConfig: "segment"}.get(cls, "probe")
        ov.append(f"{sec}.pretrained={args.pretrained}")
    if getattr(args, "overwrite", False):
        ov.append("run.overwrite=true")
    return ov


def _recipe_base(args) -> Optional[dict]:
    """The ``segment --recipe`` base config (None for other commands)."""
    recipe = getattr(args, "recipe", None)
    return SEGMENT_RECIPES[recipe] if recipe else None


def _resolve_cmd(args, cls):
    from .tasks import resolve_run_config  # lazy: torch start-up, only for these commands

    # adopts a --pretrained source's model
    return resolve_run_config(cls, args.config, _cmd_overrides(args, cls), _recipe_base(args))


#: ``mimlab reproduce --suite standard``: protocol v1's one line
V1_RETIRED = (
    "protocol v1 (--suite standard) is retired; its results are kept at "
    "docs/results/standard/report.md; use --suite evidence (protocol v2)"
)


def _reproduce_profile(args) -> int:
    """``mimlab reproduce --suite quick | full``: the evidence engine at a profile."""
    if args.suite == "standard":
        print(f"mimlab: error: {V1_RETIRED}", file=sys.stderr)
        return 2
    from .data.datasets import default_data_path  # lazy: CLI start-up speed (torch)
    from .experiments.evidence.profiles import SUITES  # lazy: CLI start-up speed (torch)
    from .experiments.evidence.suite import (  # lazy: CLI start-up speed (torch)
        EvidenceError,
        reproduce_profile,
    )

    try:
        if args.suite not in SUITES:
            raise EvidenceError(f"unknown suite '{args.suite}'; suites: evidence | quick | full")
        data = args.data or default_data_path()
        if not data:
            raise EvidenceError("no dataset: pass --data PATH (a labelled ImageFolder)")
        out = args.out or f"runs/reproduce-{args.suite}"
        path = reproduce_profile(SUITES[args.suite], data, out, args.stage)
    except EvidenceError as e:
        print(f"mimlab: error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def run(argv: Optional[list[str]] = None) -> int:
    """Run one command; returns its exit code. Under torchrun the process group it opened is
    destroyed before returning (left to the interpreter's exit, gloo's threads can abort a
    finished process: ``terminate called without an active exception``)."""
    try:
        return _run(argv)
    finally:
        _close_process_group()


def _run(argv: Optional[list[str]] = None) -> int:
    """``mimlab ARGV``: the exit code (0 ok, 1 error, 2 usage/config error, 128+N signal);
    errors are one line on stderr. Run directories the command locked are released, and
    those it created are removed again when it fails before writing anything but its
    ``config.yaml`` and ``log.txt``."""
    rc = 1
    try:
        rc = _run_command(argv)
        return rc
    finally:
        rundir = sys.modules.get("mimlab.train.rundir")  # loaded only if a run dir was made
        if rundir is not None:
            rundir.release_run()
            created, rundir.CREATED[:] = list(rundir.CREATED), []
            if rc != 0:
                for d, top in created:
                    rundir.remove_if_empty(d, top)


def _run_command(argv: Optional[list[str]] = None) -> int:
    ap = build_parser()
    # overrides (key=value) may appear before, between or after options
    args, extra = ap.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        if not hasattr(args, "overrides"):
            ap.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    if args.version:
        print(__version__)
        return 0
    if not args.command:
        ap.print_help()
        return 2
    if args.command in CONFIGS:  # config errors in a blink, before torch is imported
        try:
            cls = CONFIGS[args.command]
            resolve(cls, args.config, _cmd_overrides(args, cls), _recipe_base(args))
        except ConfigError as e:
            print(f"mimlab: config error: {_one_line(e)}", file=sys.stderr)
            return 2
    from .data.datasets import (
        DataError,  # lazy: CLI start-up speed (torch), --help and --version stay fast
    )
    from .io.checkpoint import CheckpointError  # lazy: as above
    from .io.sources import SourceError  # lazy: as above
    from .train.engine import Interrupted, TrainingError  # lazy: as above

    try:
        if args.command in CONFIGS:
            cfg = _resolve_cmd(args, CONFIGS[args.command])
            if args.print_config:  # with --pretrained: the model that will be used
                print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
                return 0
            from . import tasks  # lazy: CLI start-up speed (torch-heavy command module)

            res = getattr(tasks, args.command)(cfg)
            print(json.dumps(res, indent=2, default=str))
            return 0
        if args.command == "demo":
            from .demo import demo  # lazy: CLI start-up speed (torch-heavy command module)

            res = demo(
                data=args.data,
                out=args.out,
                epochs=args.epochs,
                images=args.images,
                preset=args.preset,
                overrides=args.overrides,
                steps=args.steps,
            )
            print(f"demo finished: {res['run_dir']}/summary.md")
            return 0
        if args.command == "export":
            from .io.export import export_checkpoint  # lazy: CLI start-up speed (torch)

            try:
                info = export_checkpoint(
                    args.checkpoint, args.output, args.format, overwrite=args.overwrite
                )
            except (SourceError, CheckpointError) as e:
                print(f"mimlab: error: {_one_line(e)}", file=sys.stderr)
                return 1
            print(json.dumps(info, indent=2))
            return 0
        if args.command == "bench":
            try:
                bench = load_bench_suite()
            except FileNotFoundError as e:
                print(e, file=sys.stderr)
                return 1
            return bench.main_from_args(args)
        if args.command == "reproduce" and args.suite == "evidence":
            from .data.datasets import default_data_path  # lazy: CLI start-up speed (torch)
            from .experiments.evidence.suite import (  # lazy: CLI start-up speed (torch)
                EvidenceError,
                reproduce_evidence,
            )

            try:
                if args.stage is None and not args.report_only:
                    raise EvidenceError(
                        "--suite evidence needs --stage (protocol | ftbudget | core | "
                        "contrastive | smalldata | rmae | augment | cmae_variants) or --report-only"
                    )
                data = args.data or default_data_path()
                if not data and args.stage not in (None, "protocol"):
                    raise EvidenceError("no dataset: pass --data PATH (CIFAR-10 ImageFolder)")
                path = reproduce_evidence(
                    None if args.report_only else args.stage,
                    data or "",
                    args.out or "runs/standard",
                    args.results or "docs/results/standard",
                )
            except EvidenceError as e:
                print(f"mimlab: error: {_one_line(e)}", file=sys.stderr)
                return 2
            print(f"written: {path}")
            return 0
        if args.command == "reproduce":
            return _reproduce_profile(args)
        if args.command == "flops":
            from .analysis.flops import run_cli as flops_cli  # lazy: CLI start-up speed (torch)

            return flops_cli(args.preset, args.methods, args.batch, args.json)
        if args.command == "methods":
            print(methods_listing())
            return 0
        rc = analysis_dispatch(args, ap)  # analyze / visualize; None for other commands
        if rc is not None:
            return rc
        if args.command == "shards":
            from .data.datasets import write_folder_shards  # lazy: CLI start-up speed (torch)

            print(
                json.dumps(
                    write_folder_shards(
                        args.src,
                        args.out,
                        args.shard_size,
                        args.limit,
                        args.seed,
                        args.order,
                        not args.no_progress,
                        [x for x in args.splits.split(",") if x],
                    )
                )
            )
            return 0
        if args.command == "stats":
            from .data.datasets import compute_mean_std  # lazy: CLI start-up speed (torch)

            mean, std = compute_mean_std(
                DataConfig(path=args.data), args.in_chans, args.img_size, args.max_images
            )
            print(json.dumps({"mean": mean, "std": std}))
            return 0
    except ConfigError as e:
        print(f"mimlab: config error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"mimlab: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except (DataError, TrainingError, SourceError, CheckpointError) as e:
        print(f"mimlab: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise  # stdout's reader left: main() stops quietly
    except OSError as e:  # a file or folder the user named: missing, not writable, disk full
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"mimlab: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    ap.print_help()
    return 2


def _close_process_group() -> None:
    """Destroy the process group a torchrun command opened (no-op without one)."""
    if "torch.distributed" not in sys.modules:
        return
    try:
        from .core.dist import cleanup  # lazy: torch is loaded already when this matters

        cleanup()
    except Exception as e:  # noqa: BLE001 - never turn a finished command into a failure
        print(f"mimlab: warning: could not close the process group: {e}", file=sys.stderr)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    try:
        code = run()
        sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C outside training (imports, data scan, evaluation)
        print("mimlab: interrupted (Ctrl-C)", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `mimlab ... | head`: the reader left; stop quietly
        code = 141
    if code == 141:
        try:  # no second BrokenPipeError when the interpreter flushes stdout at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
    sys.exit(code)


if __name__ == "__main__":
    main()
