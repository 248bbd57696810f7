"""``mimlab reproduce --suite standard``: the papers' claims at a budget that decides them.

Kong & Zhang's claims (a)-(g) (see :data:`CLAIMS`) are tested on CIFAR-10 with the ``mini``
ViT on a 2-core CPU machine, in **stages** that each finish there within about two hours and
run on their own (``--stage core``):

* ``core``: MAE vs random init (claim a) with 3 pretraining seeds x 6 fine-tuning seeds, the
  learning curves (k-NN / linear probe / FT against images seen, one pretraining run with a
  checkpoint per epoch) and CKA (masked vs full) for MAE, random init and supervised;
* ``rmae``: R-MAE, R-MAE-dagger, R-MAE-double-dagger (claim b);
* ``contrastive``: C-MAE and MoCo v3 (claims c, e);
* ``cmae_variants``: C-MAE's negatives x queries readings, with C-MAE's FT recipe and 2 FT
  seeds (after ``contrastive``);
* ``smalldata``: MAE on 1 / 10 / 100 / 1000 images at the same step budget (claim d);
* ``augment``: Table 5 without patch masking for MAE and C-MAE (claim f), MaskDistill (g).

Arms, stages and claims are data (:data:`ARMS`, :data:`STAGES`, :data:`CLAIM_TESTS`); each
method's lr is the suite's MAE lr times the paper's lr ratio to MAE
(:func:`mimlab.core.paper_settings.paper_optim`: R-MAE 3.0e-4 vs 1.5e-4).

One evaluation protocol for every init (:class:`StandardProfile`):

* the same 10,000 CIFAR-10 training images (``data.subset_seed`` fixed) are the pretraining
  set *and* the labelled pool, so no arm sees images another does not;
* fine-tuning hyper-parameters (layer decay, lr) are chosen **per init** on a class-balanced
  20 % of that pool held out from training (``data.holdout``), never on the test split:
  layer decay over ``sweep_layer_decay`` at the default lr, then the lr factors at the best
  layer decay;
* every model is then fine-tuned with ``ft_seeds`` seeds on the whole pool and scored on all
  10,000 test images; per-image correctness is kept so that differences are paired over seeds
  and test images (:mod:`mimlab.core.stats`);
* linear probe (class token after the final norm, as MAE's probe, and the patch-token
  average) and k-NN on frozen features.

Every sub-run's small result file is written under ``docs/results/standard/<stage>/`` (and its
run directory, with checkpoints, under ``runs/standard/``). A finished sub-run is skipped when
its result file exists, so finished stages survive a fresh machine without checkpoints; the
report (:func:`write_report`) is regenerated from those files alone.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .. import tasks
from ..analysis.cka import analyze_cka
from ..analysis.recon import analyze_psnr
from ..core.config import FinetuneConfig, PretrainConfig, ProbeConfig, resolve
from ..core.paper_settings import paper_optim
from ..core.stats import Diff, paired_diff, unpack_correct, verdict
from ..io.plots import pyplot
from ..nn.linear_probe import beyond_edge
from .common import cka_last_block, read_result

log = logging.getLogger("mimlab")


class StandardError(Exception):
    """Bad stage name or arguments of the standard suite."""


@dataclass(frozen=True)
class Arm:
    """One pretraining run of the suite: a method preset plus overrides; ``lr_scale`` multiplies
    the suite's MAE base lr (the paper's lr for the method relative to MAE's, from
    :func:`mimlab.core.paper_settings.paper_optim`). ``hp_from``: reuse that arm's fine-tuning
    hyper-parameters instead of sweeping (variants measured with a lighter protocol);
    ``ft_seeds``: how many FT seeds, 0, 1, ... (None = the profile's). ``small``: pretrain on N
    images of the pool, repeated to the same number of optimizer steps as the others."""

    method: str
    overrides: tuple = ()
    lr_scale: float = 1.0
    label: str = ""
    hp_from: Optional[str] = None
    ft_seeds: Optional[int] = None
    small: Optional[int] = None
    curve_run: bool = False  # this arm is the learning-curve run's final checkpoint


def _lr_scale(method: str) -> float:
    mae = paper_optim("mae")["base_lr"]
    return paper_optim(method)["base_lr"] / mae


_SMALL_AUG = ("data.crop_scale=[0.08,1.0]",)
_NOMASK = ("method.mask=none", "method.cutmix=true", "method.color_jitter=after_mask")
ARMS = {
    # MAE and C-MAE: 3 more FT seeds, added after 3 left claim (c)'s FT comparison undecided
    "mae": Arm("mae", label="MAE", ft_seeds=6),
    "rmae": Arm("rmae", lr_scale=_lr_scale("rmae"), label="R-MAE"),
    "rmae_indep": Arm("rmae_indep", lr_scale=_lr_scale("rmae_indep"), label="R-MAE†"),
    "rmae_identity": Arm("rmae_identity", lr_scale=_lr_scale("rmae_identity"), label="R-MAE‡"),
    "cmae": Arm("cmae", lr_scale=_lr_scale("cmae"), label="C-MAE", ft_seeds=6),
    "mocov3": Arm("mocov3", label="MoCo v3"),
    # MAE at the learning curve's 4x budget (32 epochs, its own full schedule): the
    # compute-matched reference for methods that cost 3.4-4.3x MAE per image (mimlab flops)
    "mae32": Arm("mae", label="MAE, 4x epochs (compute-matched)", hp_from="mae", curve_run=True),
    "maskdistill": Arm("maskdistill", ("method.teacher_size=64",), label="MaskDistill"),
    # Tables 6-7: the same step budget on N images (stronger crops, as in the paper's Table 6)
    **{
        f"mae_n{n}": Arm("mae", _SMALL_AUG, label=f"MAE on {n} image{'s' * (n > 1)}", small=n)
        for n in (1, 10, 100, 1000)
    },
    # Table 5 without patch masking: the strongest remaining composition (cutmix + jitter)
    "mae_nomask": Arm("mae", _NOMASK, label="MAE w/o masking (cutmix + jitter)"),
    "cmae_nomask_aug": Arm(
        "cmae", _NOMASK, lr_scale=_lr_scale("cmae"), label="C-MAE w/o masking (cutmix + jitter)"
    ),
    # C-MAE's negatives x queries (the cmae_variants stage), measured with C-MAE's FT recipe
    # and 2 FT seeds
    **{
        f"cmae_{neg}_{q}": Arm(
            "cmae",
            (f"method.negatives={neg}", f"method.queries={q}"),
            lr_scale=_lr_scale("cmae"),
            hp_from="cmae",
            ft_seeds=2,
            label=f"C-MAE negatives={neg} queries={q}",
        )
        for neg in ("position", "image", "batch")
        for q in ("all", "removed")
        if (neg, q) != ("position", "all")
    },
}


@dataclass(frozen=True)
class Stage:
    name: str
    arms: tuple
    claims: tuple
    pretrain_seeds: int = 1
    curve: bool = False
    cka: bool = False
    psnr: bool = False  # reconstruction PSNR of MAE's core runs and of this stage's arms
    about: str = ""


STAGES = {
    "core": Stage(
        "core",
        ("mae", "mae32"),
        ("a",),
        pretrain_seeds=3,
        curve=True,
        cka=True,
        about="MAE vs random init, learning curves, CKA",
    ),
    "rmae": Stage(
        "rmae",
        ("rmae", "rmae_indep", "rmae_identity"),
        ("b",),
        psnr=True,
        about="the R-MAE family, reconstruction PSNR",
    ),
    "contrastive": Stage(
        "contrastive", ("cmae", "mocov3"), ("c", "e"), cka=True, about="C-MAE and MoCo v3"
    ),
    "cmae_variants": Stage(
        "cmae_variants",
        tuple(a for a in ARMS if a.startswith("cmae_") and a != "cmae_nomask_aug"),
        (),
        about="C-MAE negatives x queries (needs the contrastive stage)",
    ),
    "smalldata": Stage(
        "smalldata",
        ("mae_n1", "mae_n10", "mae_n100", "mae_n1000"),
        ("d",),
        about="MAE on 1 / 10 / 100 / 1000 images",
    ),
    "augment": Stage(
        "augment",
        ("mae_nomask", "cmae_nomask_aug", "maskdistill"),
        ("f", "g"),
        about="Table 5 without masking, MaskDistill",
    ),
}

# claim -> (text, paper figure)
CLAIMS = {
    "a": ("MAE-init FT > random-init FT", "83.1 vs 80.9 (Tab. 1)"),
    "b": (
        "R-MAE ≈ MAE, R-MAE† ≈ R-MAE‡ ≈ R-MAE on FT; R-MAE PSNR > MAE",
        "82.7 / 82.8 / 82.7 vs 83.1; 23.7 vs 22.2 dB (Tab. 1)",
    ),
    "c": ("C-MAE ≈ MAE on FT, C-MAE < MAE on linear probe", "82.9 vs 83.1; 41.1 vs 54.5 (Tab. 4)"),
    "d": (
        "MAE on 1/10/100/1000 images > random init, amount barely matters",
        "82.3 / 82.3 / 82.2 / 82.2 vs 80.9 (Tab. 6-7)",
    ),
    "e": (
        "last-block CKA(masked, full) at ratio 0.75: MAE > MoCo v3 > supervised",
        "qualitative (Fig. 1)",
    ),
    "f": ("removing patch masking hurts MAE and C-MAE", "Tab. 5 (ViT-S, ImageNet-100)"),
    "g": (
        "MaskDistill > MAE on FT (our teacher: EfficientNet-Lite0, not CLIP)",
        "MaskDistill paper",
    ),
}

# claim -> comparisons (arm A, arm B, metric, kind) with kind '>' | '<' | '~' (within the
# profile's margin); a claim holds when every comparison holds, is contradicted when one is
METRICS = {
    "ft": "fine-tune",
    "lp_cls": "linear probe (cls token, MAE's protocol)",
    "lp_avg": "linear probe (patch-token average)",
    "knn": "k-NN",
}
#: reconstruction PSNR readings (metric -> (per-image key of ``analyze psnr``, label)): visible
#: patches pasted back; the masked patches de-normalised with the statistics of the visible
#: patches (no leak) or with their own true statistics (what a norm-pix figure usually shows)
PSNR_METRICS = {
    "psnr_visible": ("psnr_visible_stats", "PSNR dB (masked patches: visible-patch stats)"),
    "psnr_true": ("psnr_true_stats", "PSNR dB (masked patches: their true stats)"),
}
CLAIM_TESTS = {
    "a": [("mae", "random", "ft", ">")],
    "b": [
        ("rmae", "mae", "ft", "~"),
        ("rmae_indep", "rmae", "ft", "~"),
        ("rmae_identity", "rmae", "ft", "~"),
        ("rmae", "mae", "psnr_visible", ">"),
        ("rmae", "mae", "psnr_true", ">"),
    ],
    "c": [("cmae", "mae", "ft", "~"), ("cmae", "mae", "lp_cls", "<")],
    "d": [(f"mae_n{n}", "random", "ft", ">") for n in (1, 10, 100, 1000)]
    + [("mae_n1", "mae_n1000", "ft", "~")],
    "f": [("mae", "mae_nomask", "ft", ">"), ("cmae", "cmae_nomask_aug", "ft", ">")],
    "g": [("maskdistill", "mae", "ft", ">")],
}


# the same comparisons at equal pretraining compute: MAE at 4x the epochs (mae32) against
# methods that cost 3.4x (R-MAE) - 4.3x (C-MAE) MAE's FLOPs per image (docs/results/standard/
# flops.json), and MaskDistill (7.6x) against the same MAE; claims on pairs of the same cost
# (a, b's variants, d) are unchanged
CLAIM_TESTS_COMPUTE = {
    "b": [("rmae", "mae32", "ft", "~")],
    "c": [("cmae", "mae32", "ft", "~"), ("cmae", "mae32", "lp_cls", "<")],
    # MaskDistill costs 7.6x MAE (4.3x of it the teacher): MAE at 4x is still the cheaper arm
    "g": [("maskdistill", "mae32", "ft", ">")],
}

#: the models whose masked-vs-full CKA a stage with ``cka`` compares: (label, result name);
#: a stage not listed compares its own MAE with supervised
CKA_MODELS = {
    "core": (("MAE", "core/pretrain/mae-s0"), ("supervised", "core/ft/random-ft0")),
    "contrastive": (
        ("MAE", "core/pretrain/mae-s0"),
        ("MoCo v3", "contrastive/pretrain/mocov3-s0"),
        ("C-MAE", "contrastive/pretrain/cmae-s0"),
        ("supervised", "core/ft/random-ft0"),
    ),
}


@dataclass(frozen=True)
class StandardProfile:
    """Budgets and protocol shared by every stage and arm."""

    preset: str = "mini"
    pool_images: int = 10000  # pretraining set = labelled FT pool (fixed subset)
    subset_seed: int = 0
    batch: int = 128
    base_lr: float = 1.5e-3  # MAE's, per 256 images (10x the paper's 1.5e-4: tiny ViT)
    warmup_epochs: float = 1.0
    pretrain_epochs: int = 8  # the decisive budget (see the learning curves)
    curve_epochs: int = 32  # the learning-curve run (one schedule)
    curve_points: tuple = (1, 2, 4, 8, 16, 32)
    ft_epochs: int = 2
    ft_seeds: tuple = (0, 1, 2)
    ft_base_lr: float = 1e-3
    ft_warmup_epochs: float = 0.3
    holdout: float = 0.2
    sweep_layer_decay: tuple = (0.65, 0.75, 0.85, 1.0)
    sweep_lr_factors: tuple = (0.5, 2.0)
    # while the best lr is the largest (smallest) one tried, try it x2 (/2), at most this often
    sweep_lr_extend: int = 3
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    lp_epochs: int = 30
    lp_lr_extend: int = 3  # probe.lr_extend: the probe's lr must not sit at its grid's edge
    cka_images: int = 512
    cka_ratios: tuple = (0.25, 0.5, 0.75, 0.9)
    psnr_images: int = 2000  # seeded test images (and masks), the same for every model
    approx_margin: float = 1.0  # "≈" claims hold when the 95 % CI lies within ±margin
    workers: int = 1

    def steps(self, epochs: int) -> int:
        """Optimizer steps of ``epochs`` over the pool (the step budget every arm shares)."""
        return epochs * (self.pool_images // self.batch)

    def describe(self) -> list[str]:
        return [
            f"model `{self.preset}`; the same {self.pool_images:,} CIFAR-10 training images "
            f"(seeded subset {self.subset_seed}) for pretraining and as the labelled pool",
            f"pretraining: {self.pretrain_epochs} epochs of batch {self.batch} "
            f"({self.steps(self.pretrain_epochs):,} steps, "
            f"{self.pretrain_epochs * self.pool_images:,} images seen), AdamW, base lr "
            f"{self.base_lr:g} per 256 x the method's paper lr relative to MAE's, cosine, "
            f"{self.warmup_epochs:g}-epoch warm-up",
            f"fine-tuning: {self.ft_epochs} epochs on the pool, drop path {self.drop_path:g}, "
            f"label smoothing {self.label_smoothing:g}, no mixup; layer decay from "
            f"{list(self.sweep_layer_decay)} at lr {self.ft_base_lr:g}, then lr x "
            f"{list(self.sweep_lr_factors)}, extended x2 (or /2) while the best lr is the "
            f"largest (smallest) tried, at most {self.sweep_lr_extend} times; chosen per init "
            f"on a held-out "
            f"{self.holdout:.0%} of the pool; then seeds {list(self.ft_seeds)} on the whole pool",
            "linear probe: frozen features (class token after the final norm, and the patch-"
            f"token average), {self.lp_epochs} epochs, lr from {{0.003 ... 0.3}} extended x3 "
            f"while the best is the largest tried (at most {self.lp_lr_extend} times), chosen "
            "on 10 % held-out training features; k-NN: k=20, T=0.07, patch-token average",
            "every top-1 on all 10,000 CIFAR-10 test images; differences paired over seeds and "
            "images, 95 % CI = t-interval over seeds (+) image standard error",
        ]


def small_data_overrides(arm: Arm, p: "StandardProfile", epochs: int) -> list:
    """N images repeated to the same optimizer steps as ``epochs`` over the pool (one
    'epoch' of the repeated set; warm-up scaled to match)."""
    if arm.small is None:
        return []
    steps = p.steps(epochs)
    repeat = math.ceil(steps * p.batch / arm.small)
    return [
        f"data.limit={arm.small}",
        f"data.repeat={repeat}",
        "optim.epochs=1",
        f"optim.warmup_epochs={p.warmup_epochs / epochs:g}",
    ]


def same_recipe(result: dict, ld: float, lr: float) -> bool:
    """Whether a fine-tuning result was made with layer decay ``ld`` and lr ``lr``."""
    return math.isclose(float(result.get("layer_decay", -1)), ld) and math.isclose(
        float(result.get("base_lr", -1)), lr
    )


# ------------------------------------------------------------------ the suite
@dataclass
class StandardSuite:
    profile: StandardProfile
    data: str
    runs: Path  # run directories (checkpoints; not committed)
    results: Path  # small result files (committed)
    progress: bool = False
    timings: dict = field(default_factory=dict)
    _pretrain_fns: dict = field(default_factory=dict)

    # -- bookkeeping -------------------------------------------------------------
    def _file(self, name: str) -> Path:
        return self.results / f"{name}.json"

    def done(self, name: str) -> Optional[dict]:
        return read_result(self._file(name))

    def step(self, name: str, fn: Callable[[], dict], force: bool = False) -> Optional[dict]:
        """Run ``fn`` unless ``<results>/<name>.json`` exists; record failures and go on."""
        res = None if force else self.done(name)
        if res is not None:
            return res
        print(f"[standard] {name}: running ...", flush=True)
        t0 = time.time()
        try:
            res = fn()
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - recorded, the stage goes on
            msg = f"{type(e).__name__}: {' '.join(str(e).split())}"
            f = self.results / f"{name}.FAILED.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(msg + "\n\n" + traceback.format_exc())
            print(f"[standard] {name}: FAILED ({msg[:300]})", flush=True)
            return None
        res = {**res, "wall_seconds": round(time.time() - t0, 1)}
        f = self._file(name)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(res, indent=1, default=str))
        (self.results / f"{name}.FAILED.txt").unlink(missing_ok=True)
        print(f"[standard] {name}: done in {time.time() - t0:.0f} s", flush=True)
        return res

    def _common(self, sub: str, name: str, seed: int) -> list[str]:
        p = self.profile
        return [
            f"data.path={self.data}",
            f"run.out_dir={self.runs / sub}",
            f"run.name={name}",
            "run.overwrite=true",  # the suite owns its folders: a failed / stale sub-run is redone
            f"run.seed={seed}",
            f"run.progress={str(self.progress).lower()}",
            f"data.num_workers={p.workers}",
            f"data.limit={p.pool_images}",
            f"data.subset_seed={p.subset_seed}",
        ]

    # -- pretraining ---------------------------------------------------------------
    def pretrain_overrides(
        self, stage: str, arm_name: str, seed: int, epochs: int, tag: str, ckpt_every: int = 0
    ) -> list[str]:
        """The config overrides of one arm's pretraining run (later ones win)."""
        p, arm = self.profile, ARMS[arm_name]
        return self._common(f"{stage}/pretrain", tag, seed) + [
            f"model.preset={p.preset}",
            f"method.name={arm.method}",
            f"optim.epochs={epochs}",
            f"optim.batch_size={p.batch}",
            f"optim.base_lr={p.base_lr * arm.lr_scale:g}",
            f"optim.warmup_epochs={p.warmup_epochs}",
            # after the defaults above: N images repeated, with the warm-up scaled to match
            *small_data_overrides(arm, p, epochs),
            "run.resume=auto",
            "run.log_every=20",
            "run.save_every_steps=100",
            f"run.ckpt_every={ckpt_every}",
            *arm.overrides,
        ]

    def pretrain(
        self, stage: str, arm_name: str, seed: int, epochs: int, tag: str, ckpt_every: int = 0
    ) -> Optional[dict]:
        name = f"{stage}/pretrain/{tag}"

        def fn() -> dict:
            run_dir = self.runs / stage / "pretrain" / tag
            if (run_dir / "results.json").is_file() and (run_dir / "checkpoints/last.pt").is_file():
                return json.loads((run_dir / "results.json").read_text())
            ov = self.pretrain_overrides(stage, arm_name, seed, epochs, tag, ckpt_every)
            return tasks.pretrain(resolve(PretrainConfig, overrides=ov))

        self._pretrain_fns[name] = fn
        return self.step(name, fn)

    def ckpt(self, name: str, path: Optional[str] = None) -> Callable[[], Optional[str]]:
        """Lazy checkpoint of pretraining step ``name`` (``path``: a file in its run, e.g. an
        epoch checkpoint): called only by sub-runs that still have to run; a checkpoint lost
        with its machine is retrained then (pretraining is deterministic)."""

        def get() -> Optional[str]:
            res = self.done(name)
            want = path or (res or {}).get("checkpoint")
            if want is None or not Path(want).is_file():
                fn = self._pretrain_fns.get(name)
                if fn is None:
                    raise StandardError(f"checkpoint of {name} is missing and cannot be rebuilt")
                res = self.step(name, fn, force=True)
                want = path or res["checkpoint"]
            return want

        return get

    # -- evaluation ----------------------------------------------------------------
    def finetune(
        self,
        name: str,
        sub: str,
        ckpt: Optional[Callable],
        seed: int,
        ld: float,
        lr: float,
        holdout: bool,
    ) -> Optional[dict]:
        p = self.profile

        def fn() -> dict:
            path = ckpt() if ckpt else None
            ov = self._common(sub, Path(name).name, seed) + [
                f"optim.epochs={p.ft_epochs}",
                f"optim.batch_size={p.batch}",
                f"optim.layer_decay={ld}",
                f"optim.base_lr={lr:g}",
                f"optim.warmup_epochs={p.ft_warmup_epochs}",
                f"model.drop_path={p.drop_path}",
                f"finetune.label_smoothing={p.label_smoothing}",
                "finetune.mixup=0",
                "finetune.cutmix=0",
                "run.save_every_steps=0",
            ]
            if holdout:
                ov.append(f"data.holdout={p.holdout}")
            ov += [f"finetune.pretrained={path}"] if path else [f"model.preset={p.preset}"]
            return tasks.finetune(tasks.resolve_run_config(FinetuneConfig, overrides=ov))

        old = self.done(name)
        stale = old is not None and not same_recipe(old, ld, lr)
        if stale:
            print(
                f"[standard] {name}: was fine-tuned with layer decay {old.get('layer_decay')}, "
                f"lr {old.get('base_lr')}; the recipe is now {ld:g} / {lr:g}: rerunning",
                flush=True,
            )
        return self.step(name, fn, force=stale)

    def sweep(self, stage: str, tag: str, ckpt: Optional[Callable]) -> Optional[dict]:
        """Layer decay, then lr, chosen on the held-out part of the pool (seed 0)."""
        p = self.profile
        sub = f"{stage}/sweep/{tag}"
        scores: dict = {}
        for ld in p.sweep_layer_decay:
            r = self.finetune(
                f"{sub}/ld{ld}-lr{p.ft_base_lr:g}", sub, ckpt, 0, ld, p.ft_base_lr, True
            )
            if r:
                scores[(ld, p.ft_base_lr)] = r["top1"]
        if not scores:
            raise StandardError(f"every sweep run of {tag} failed (see its FAILED.txt files)")
        best_ld = max(scores, key=scores.get)[0]

        def point(lr: float) -> None:
            r = self.finetune(f"{sub}/ld{best_ld}-lr{lr:g}", sub, ckpt, 0, best_ld, lr, True)
            if r:
                scores[(best_ld, lr)] = r["top1"]

        for f in p.sweep_lr_factors:
            point(p.ft_base_lr * f)
        for _ in range(p.sweep_lr_extend):  # the best lr must not sit at the grid's edge
            if max(scores, key=scores.get)[0] != best_ld:
                break
            nxt = beyond_edge({lr: v for (ld, lr), v in scores.items() if ld == best_ld}, 2.0)
            if nxt is None:
                break
            point(nxt)
        (ld, lr) = max(scores, key=scores.get)
        return {
            "layer_decay": ld,
            "base_lr": lr,
            "holdout_top1": scores[(ld, lr)],
            "lr_extend": p.sweep_lr_extend,
            "grid": [
                {"layer_decay": k[0], "base_lr": k[1], "holdout_top1": v} for k, v in scores.items()
            ],
        }

    def probe(
        self, name: str, sub: str, kind: str, ckpt: Optional[Callable], feature: str, seed: int = 0
    ) -> Optional[dict]:
        p = self.profile

        def fn() -> dict:
            path = ckpt() if ckpt else None
            ov = self._common(sub, Path(name).name, seed) + [
                f"probe.epochs={p.lp_epochs}",
                f"probe.feature={feature}",
                f"probe.lr_extend={p.lp_lr_extend}",
            ]
            ov += [f"probe.pretrained={path}"] if path else [f"model.preset={p.preset}"]
            fn_ = tasks.linprobe if kind == "linprobe" else tasks.knn
            return fn_(tasks.resolve_run_config(ProbeConfig, overrides=ov))

        old = self.done(name)
        # a probe whose lr was chosen without the current extension is redone
        stale = kind == "linprobe" and old is not None and old.get("lr_extend") != p.lp_lr_extend
        if stale:
            print(f"[standard] {name}: lr chosen without probe.lr_extend: rerunning", flush=True)
        return self.step(name, fn, force=stale)

    def evaluate(self, stage: str, tag: str, ckpt: Optional[Callable], init_seed: int = 0) -> dict:
        """Sweep, FT seeds, probes of one init; returns the result dicts by kind."""
        p = self.profile
        out: dict = {"tag": tag}
        hp_tag = tag.rsplit("-s", 1)[0] if ckpt else "random"
        arm = ARMS.get(hp_tag)
        if arm is not None and arm.hp_from:
            hp = self.done(f"{arm_stage(arm.hp_from)}/sweep/{arm.hp_from}")
            if not hp or hp.get("lr_extend") != p.sweep_lr_extend:
                raise StandardError(
                    f"{hp_tag} reuses the fine-tuning recipe of {arm.hp_from}: "
                    f"run the stage '{arm_stage(arm.hp_from)}' first"
                )
        else:
            old = self.done(f"{stage}/sweep/{hp_tag}")
            hp = self.step(
                f"{stage}/sweep/{hp_tag}",
                lambda: self.sweep(stage, hp_tag, ckpt),
                # a sweep of an older protocol is replayed: its points are cached
                force=old is not None and old.get("lr_extend") != p.sweep_lr_extend,
            )
        if not hp:
            return out
        out["hp"] = hp
        seeds = arm_ft_seeds(hp_tag, p)
        out["ft"] = [
            self.finetune(
                f"{stage}/ft/{tag}-ft{s}",
                f"{stage}/ft",
                ckpt,
                s,
                hp["layer_decay"],
                hp["base_lr"],
                False,
            )
            for s in seeds
        ]
        for feat in ("cls", "avg"):
            out[f"lp_{feat}"] = self.probe(
                f"{stage}/linprobe/{tag}-{feat}",
                f"{stage}/linprobe",
                "linprobe",
                ckpt,
                feat,
                init_seed,
            )
        out["knn"] = self.probe(f"{stage}/knn/{tag}", f"{stage}/knn", "knn", ckpt, "avg", init_seed)
        return out

    # -- stages --------------------------------------------------------------------
    def run_stage(self, stage_name: str) -> Path:
        if stage_name not in STAGES:
            raise StandardError(f"unknown stage '{stage_name}'; stages: {', '.join(STAGES)}")
        st, p = STAGES[stage_name], self.profile
        t0 = time.time()
        # random init: evaluated once, shared by every stage (stored under core)
        self.evaluate("core", "random", None)
        for arm in st.arms:
            for s in range(1 if ARMS[arm].curve_run else st.pretrain_seeds):
                tag = f"{arm}-s{s}"
                if ARMS[arm].curve_run:  # evaluate the curve run's final checkpoint
                    run = self.curve_tag()
                    r = self.pretrain(stage_name, "mae", 0, p.curve_epochs, run, ckpt_every=1)
                else:  # MAE seed 0 doubles as the curve run when the budgets coincide
                    run = tag
                    every = 1 if st.curve and tag == self.curve_tag() else 0
                    r = self.pretrain(stage_name, arm, s, p.pretrain_epochs, tag, every)
                if r is None:
                    continue
                self.evaluate(stage_name, tag, self.ckpt(f"{stage_name}/pretrain/{run}"), s)
                if st.psnr:  # per arm, so that a stage cut short keeps what it measured
                    self.psnr(stage_name)
        if st.curve:
            self.curve(stage_name)
        if st.cka:
            self.cka(stage_name)
        if st.psnr:
            self.psnr(stage_name)
        self.timings[stage_name] = round(time.time() - t0, 1)
        return write_report(self)

    def curve_tag(self) -> str:
        p = self.profile
        return "mae-s0" if p.pretrain_epochs == p.curve_epochs else "mae-curve-s0"

    def curve(self, stage: str) -> None:
        """k-NN, linear probe and FT (seed 0, MAE's chosen recipe) along one MAE run."""
        p = self.profile
        tag = self.curve_tag()
        r = self.pretrain(stage, "mae", 0, p.curve_epochs, tag, ckpt_every=1)
        hp = self.done(f"{stage}/sweep/mae")
        if r is None or not hp:
            return
        ckdir = self.runs / stage / "pretrain" / tag / "checkpoints"
        for e in p.curve_points:
            ck = self.ckpt(f"{stage}/pretrain/{tag}", str(ckdir / f"checkpoint-epoch{e}.pt"))
            self.probe(f"{stage}/curve/knn-e{e}", f"{stage}/curve", "knn", ck, "avg")
            self.probe(f"{stage}/curve/lp-e{e}", f"{stage}/curve", "linprobe", ck, "avg")
            self.finetune(
                f"{stage}/curve/ft-e{e}",
                f"{stage}/curve",
                ck,
                0,
                hp["layer_decay"],
                hp["base_lr"],
                False,
            )

    def psnr(self, stage: str) -> None:
        """Reconstruction PSNR, per image, of MAE's core pretraining runs and of this stage's
        arms: the same seeded test images and masks for every model, so that they pair."""
        p = self.profile
        names = [f"core/pretrain/mae-s{i}" for i in range(STAGES["core"].pretrain_seeds)]
        names += [
            f"{stage}/pretrain/{a}-s{i}"
            for a in STAGES[stage].arms
            for i in range(STAGES[stage].pretrain_seeds)
        ]
        for name in names:
            if not self.done(name):
                continue
            tag = name.rsplit("/", 1)[1]
            self.step(
                f"{stage}/psnr/{tag}",
                lambda name=name, tag=tag: analyze_psnr(
                    self.ckpt(name)(),
                    self.data,
                    images=p.psnr_images,
                    seed=0,
                    out=str(self.runs / stage / "psnr" / f"{tag}.json"),
                    workers=p.workers,
                    progress=self.progress,
                    per_image=True,
                ),
            )

    def cka(self, stage: str) -> None:
        models, labels = [], []
        want = CKA_MODELS.get(
            stage, (("MAE", f"{stage}/pretrain/mae-s0"), ("supervised", "core/ft/random-ft0"))
        )
        for label, name in want:
            r = self.done(name)
            if r:
                labels.append(label)
                models.append((name, r))
        d = self.runs / stage / "cka"
        old = self.done(f"{stage}/cka")
        # which runs it compared: a fine-tuned model rerun with a new recipe is another model
        inputs = {
            name: [r.get("layer_decay"), r.get("base_lr"), r.get("top1")] for name, r in models
        }
        if old and old.get("labels") == labels and old.get("inputs") == inputs:
            return

        def paths() -> list:
            out = []
            for name, r in models:
                if "/pretrain/" in name:
                    out.append(self.ckpt(name)())
                else:  # a fine-tuned model: its run's last checkpoint
                    ck = Path(r["run_dir"]) / "checkpoints/last.pt"
                    if not ck.is_file():
                        raise StandardError(f"CKA needs {ck} (the {name} run): rerun it")
                    out.append(str(ck))
            return out

        def run() -> dict:
            res = analyze_cka(
                self.data,
                paths(),
                random_init=[self.profile.preset],
                images=self.profile.cka_images,
                ratios=self.profile.cka_ratios,
                out=str(d),
                seed=0,
                workers=self.profile.workers,
                labels=labels + ["random init"],
                progress=self.progress,
            )
            plot = d / "cka_last_block.png"
            if plot.is_file():  # the committed copy the report links to
                (self.results / stage).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(plot, self.results / stage / "cka_last_block.png")
            return {
                **res,
                "labels": labels,
                "inputs": inputs,
                "last_block": cka_last_block(d / "cka.csv"),
            }

        self.step(f"{stage}/cka", run, force=True)


# ------------------------------------------------------------------ report
def arm_ft_seeds(arm: str, p: StandardProfile) -> tuple:
    """The FT seeds of an arm: its own count (0, 1, ...) or the profile's."""
    n = ARMS[arm].ft_seeds if arm in ARMS else None
    return tuple(range(n)) if n else tuple(p.ft_seeds)


def arm_stage(arm: str) -> Optional[str]:
    if arm == "random":
        return "core"
    return next((st.name for st in STAGES.values() if arm in st.arms), None)


def unit_results(s: StandardSuite, arm: str, metric: str) -> dict:
    """{(pretraining seed | None, FT seed | None): result} of one arm and metric."""
    st = arm_stage(arm)
    if st is None:
        return {}
    p = s.profile
    pseeds = (
        [None]
        if arm == "random"
        else [0]
        if ARMS[arm].curve_run
        else range(STAGES[st].pretrain_seeds)
    )
    out: dict = {}
    hp = current_recipe(s, arm) if metric == "ft" else None
    for ps in pseeds:
        tag = "random" if ps is None else f"{arm}-s{ps}"
        if metric == "ft":
            for f in arm_ft_seeds(arm, p):
                r = s.done(f"{st}/ft/{tag}-ft{f}")
                if r and "correct" in r and hp and same_recipe(r, *hp):
                    out[(ps, f)] = r
        else:
            name = {"lp_cls": "linprobe/{}-cls", "lp_avg": "linprobe/{}-avg", "knn": "knn/{}"}[
                metric
            ].format(tag)
            r = s.done(f"{st}/{name}")
            if metric != "knn" and r and r.get("lr_extend") != p.lp_lr_extend:
                continue  # a probe of the older protocol: its stage has to run again
            if r and "correct" in r:
                out[(ps, None)] = r
    return out


def current_recipe(s: StandardSuite, arm: str) -> Optional[tuple]:
    """(layer decay, lr) an arm is fine-tuned with under the current sweep protocol, or None
    while its sweep is missing or of an older protocol (its FT results are then not used)."""
    src = ARMS[arm].hp_from if arm in ARMS and ARMS[arm].hp_from else arm
    st = arm_stage(src)
    hp = s.done(f"{st}/sweep/{src}") if st else None
    if not hp or hp.get("lr_extend") != s.profile.sweep_lr_extend:
        return None
    return float(hp["layer_decay"]), float(hp["base_lr"])


def psnr_units(s: StandardSuite, arm: str, metric: str) -> dict:
    """{pretraining seed: per-image PSNR [N] (NaN where infinite)} of one arm, from the stage
    that measures PSNR."""
    key = PSNR_METRICS[metric][0]
    st = arm_stage(arm)
    if st is None or arm == "random":
        return {}
    out = {}
    for name in (n for n, x in STAGES.items() if x.psnr):
        for ps in range(STAGES[st].pretrain_seeds):
            r = s.done(f"{name}/psnr/{arm}-s{ps}")
            if r and key in r.get("per_image", {}):
                out[ps] = np.array(
                    [np.nan if v is None else v for v in r["per_image"][key]], dtype=np.float64
                )
    return out


def _seed_sd(means: list) -> Optional[float]:
    if len(means) < 2:
        return None
    mu = sum(means) / len(means)
    return math.sqrt(sum((m - mu) ** 2 for m in means) / (len(means) - 1))


def _widen(d: Diff, sd: float, pretrained: int) -> Diff:
    """``d`` with its interval widened by a pretraining-seed sd per pretrained arm."""
    half = math.hypot(d.hi - d.mean, 1.96 * sd * math.sqrt(pretrained))
    return Diff(**{**d.to_dict(), "lo": d.mean - half, "hi": d.mean + half})


def compare_psnr(s: StandardSuite, a: str, b: str, metric: str, kind: str) -> Optional[dict]:
    """Paired per-image PSNR difference (dB) of two arms, matched on pretraining seed; with
    one matched pretraining run the interval is widened by the sd of MAE's core runs' PSNR."""
    ua, ub = psnr_units(s, a, metric), psnr_units(s, b, metric)
    common = sorted(set(ua) & set(ub))
    if not common:
        return None
    A, B = [ua[k] for k in common], [ub[k] for k in common]
    if len({x.shape for x in A + B}) != 1:
        raise StandardError(f"PSNR of {a} and {b} was measured on different image sets")
    ok = np.all(np.isfinite(np.stack(A + B)), axis=0)
    d = paired_diff([x[ok] for x in A], [y[ok] for y in B], scale=1.0)
    out: dict = {"a": a, "b": b, "metric": metric, "kind": kind}
    if len(common) < 2:
        mae = psnr_units(s, "mae", metric)
        sd = _seed_sd([float(np.nanmean(v)) for v in mae.values()])
        if sd is not None:
            d = _widen(d, sd, 2)
            out["pretrain_seed_sd"] = sd
    out.update(diff=d.to_dict(), verdict=verdict(d, kind, s.profile.approx_margin))
    return out


def pretrain_seed_sd(s: StandardSuite, metric: str) -> Optional[float]:
    """Spread (sd, points) of one protocol's top-1 across MAE's pretraining seeds of the core
    stage: the mean over FT seeds per pretraining run, then the sd of those means (None with
    fewer than two runs). The yardstick for arms that have one pretraining run."""
    by_seed: dict = {}
    for (ps, _), r in unit_results(s, "mae", metric).items():
        by_seed.setdefault(ps, []).append(r["top1"])
    return _seed_sd([sum(v) / len(v) for v in by_seed.values()])


def compare(s: StandardSuite, a: str, b: str, metric: str, kind: str) -> Optional[dict]:
    """Paired comparison of two arms on one metric: units are matched on (pretraining seed,
    FT seed); an arm without pretraining seeds (random init) matches every pretraining seed.

    When the matched units come from a single pretraining run, their spread says nothing about
    how another pretraining run would differ: the interval is then widened by MAE's
    pretraining-seed sd on that protocol (:func:`pretrain_seed_sd`), once per pretrained arm
    (``sqrt(k)``, k = 1 against random init, 2 between two pretrained arms). PSNR metrics
    (:data:`PSNR_METRICS`) go to :func:`compare_psnr`."""
    if metric in PSNR_METRICS:
        return compare_psnr(s, a, b, metric, kind)
    ua, ub = unit_results(s, a, metric), unit_results(s, b, metric)
    pairs, seeds = [], set()
    for (ps, f), ra in sorted(ua.items(), key=lambda kv: str(kv[0])):
        rb = ub.get((ps, f)) or ub.get((None, f))
        if rb is not None:
            pairs.append((ra, rb))
            seeds.add(ps)
    if not pairs:
        return None
    d = paired_diff(
        [unpack_correct(x["correct"]) for x, _ in pairs],
        [unpack_correct(y["correct"]) for _, y in pairs],
    )
    out: dict = {"a": a, "b": b, "metric": metric, "kind": kind}
    pretrained = sum(1 for arm in (a, b) if arm != "random")
    sd = pretrain_seed_sd(s, metric) if pretrained and len(seeds - {None}) < 2 else None
    if sd is not None:
        d = _widen(d, sd, pretrained)
        out["pretrain_seed_sd"] = sd
    out.update(diff=d.to_dict(), verdict=verdict(d, kind, s.profile.approx_margin))
    return out


def judge(s: StandardSuite, claim: str, tests_by_claim: Optional[dict] = None) -> Optional[dict]:
    tests = (CLAIM_TESTS if tests_by_claim is None else tests_by_claim).get(claim)
    if not tests:
        return None
    rows = [compare(s, *t) for t in tests]
    if any(r is None for r in rows):
        return {"verdict": None, "comparisons": [r for r in rows if r]}
    vs = [r["verdict"] for r in rows]
    v = (
        "contradicted"
        if "contradicted" in vs
        else "holds"
        if all(x == "holds" for x in vs)
        else "undecided"
    )
    return {"verdict": v, "comparisons": rows}


def claim_a(s: StandardSuite) -> Optional[dict]:
    """Claim (a) on every protocol: MAE (pretraining seeds x FT seeds) vs random init."""
    out: dict = {}
    for metric in METRICS:
        c = compare(s, "mae", "random", metric, ">")
        if c:
            out[metric] = {**c["diff"], "verdict": c["verdict"]}
    if "ft" not in out:
        return None
    return {**out, "verdict": out["ft"]["verdict"]}


def _curve_plot(s: StandardSuite, path: Path) -> Optional[dict]:
    p = s.profile
    mae_hp = current_recipe(s, "mae")
    rows = []
    for e in p.curve_points:
        row = {
            "epochs": e,
            "images_seen": e * p.pool_images,
            "steps": p.steps(e),
        }
        for k, n in (("knn", "knn"), ("lp", "lp"), ("ft", "ft")):
            r = s.done(f"core/curve/{n}-e{e}")
            if r and k == "ft" and not (mae_hp and same_recipe(r, *mae_hp)):
                r = None  # fine-tuned with an older recipe
            if r and k == "lp" and r.get("lr_extend") != p.lp_lr_extend:
                r = None
            row[k] = r["top1"] if r else None
        rows.append(row)
    ref = {"knn": s.done("core/knn/random"), "lp": s.done("core/linprobe/random-avg")}
    if ref["lp"] and ref["lp"].get("lr_extend") != p.lp_lr_extend:
        ref["lp"] = None
    rft = [r["top1"] for r in unit_results(s, "random", "ft").values()]
    refv = {k: (v["top1"] if v else None) for k, v in ref.items()}
    refv["ft"] = sum(rft) / len(rft) if rft else None
    if not any(r[k] is not None for r in rows for k in ("knn", "lp", "ft")):
        return None
    cross: dict = {}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colors = {"knn": "tab:blue", "lp": "tab:orange", "ft": "tab:green"}
    names = {"knn": "k-NN", "lp": "linear probe (avg)", "ft": "fine-tune (seed 0)"}
    for k in ("knn", "lp", "ft"):
        pts = [(r["images_seen"], r[k]) for r in rows if r[k] is not None]
        if not pts:
            continue
        ax.plot(*zip(*pts), "o-", color=colors[k], label=f"MAE {names[k]}")
        if refv.get(k) is not None:
            ref_name = "fine-tune (mean of FT seeds)" if k == "ft" else names[k]
            ax.axhline(
                refv[k],
                color=colors[k],
                ls="--",
                lw=1,
                label=f"random init {ref_name} {refv[k]:.1f}",
            )
            cross[k] = _crossing(pts, refv[k])
            if cross[k].get("crossover_images"):
                ax.axvline(cross[k]["crossover_images"], color=colors[k], ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("pretraining images seen (one 32-epoch MAE schedule on 10k images)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"rows": rows, "random": refv, "crossover": cross}


def _crossing(pts: list, ref: float) -> dict:
    """Where the curve crosses ``ref`` (log-linear interpolation between measured points), and
    the first budget from which every later point stays above it."""
    out: dict = {}
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 <= ref < y1:
            t = (ref - y0) / (y1 - y0)
            out["crossover_images"] = round(
                math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
            )
            break
    above = [i for i in range(len(pts)) if all(y > ref for _, y in pts[i:])]
    if above:
        out["above_from_images"] = pts[above[0]][0]
    if pts and pts[0][1] > ref:
        out["above_at_first_point"] = True
    return out


def _variant_rows(s: StandardSuite) -> Optional[dict]:
    """The cmae_variants stage as table rows: every reading against the default ``cmae``."""
    readings = [("position", "all", "cmae")] + [
        (a.split("_")[1], a.split("_")[2], a) for a in STAGES["cmae_variants"].arms
    ]
    rows, summary = [], {}
    for neg, q, arm in readings:
        cells, entry = [], {}
        for m in METRICS:
            units = unit_results(s, arm, m)
            vals = [r["top1"] for r in units.values()]
            cells.append(f"{sum(vals) / len(vals):.2f}" if vals else "–")
            if arm == "cmae":
                cells.append("–")
                continue
            c = compare(s, arm, "cmae", m, "~")
            if c is None:
                cells.append("–")
                continue
            d = Diff(**c["diff"])
            cells.append(d.fmt())
            entry[m] = c
        if all(c == "–" for c in cells):
            continue
        summary[arm] = entry
        rows.append(f"| {neg} | {q} | " + " | ".join(cells) + " |")
    return {"rows": rows, "summary": summary} if len(rows) > 1 else None


SMALL_ARMS = STAGES["smalldata"].arms


def _smalldata(s: StandardSuite, path: Path) -> Optional[dict]:
    """Claim (d) by pretraining-set size: every metric of MAE on N images (and of MAE on the
    whole pool), each against random init, as table rows and a plot of top-1 against N with
    the FT difference's 95 % interval (None until one small-data arm has results)."""
    p = s.profile
    arms = [(ARMS[a].small, a) for a in SMALL_ARMS] + [(p.pool_images, "mae")]
    ref = {}
    for m in METRICS:
        vals = [r["top1"] for r in unit_results(s, "random", m).values()]
        ref[m] = sum(vals) / len(vals) if vals else None
    rows, points = [], {m: [] for m in METRICS}
    for n, arm in arms:
        cells, entry = [], {}
        for m in METRICS:
            c = compare(s, arm, "random", m, ">")
            if c is None:
                cells += ["–", "–"]
                continue
            d = Diff(**c["diff"])
            cells += [f"{d.a_mean:.2f}", d.fmt()]
            entry[m] = {"top1": d.a_mean, "diff": c["diff"], "verdict": c["verdict"]}
            points[m].append((n, d.a_mean, d.mean - d.lo, d.hi - d.mean))
        if not entry or (arm == "mae" and not rows):
            continue
        rows.append(
            {"images": n, "arm": arm, "cells": cells, "results": entry, "whole_pool": arm == "mae"}
        )
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    colors = {"ft": "tab:green", "lp_cls": "tab:red", "lp_avg": "tab:orange", "knn": "tab:blue"}
    short = {"ft": "fine-tune", "lp_cls": "probe (cls)", "lp_avg": "probe (avg)", "knn": "k-NN"}
    for m, pts in points.items():
        if not pts:
            continue
        xs = [x for x, *_ in pts]
        ys = [y for _, y, *_ in pts]
        if m == "ft":  # the interval of the difference to random init, drawn around MAE's mean
            err = [[lo for *_, lo, _ in pts], [hi for *_, hi in pts]]
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                fmt="o-",
                color=colors[m],
                capsize=3,
                label=f"MAE {short[m]} (95 % CI of Δ)",
            )
        else:
            ax.plot(xs, ys, "o-", color=colors[m], label=f"MAE {short[m]}")
        if ref.get(m) is not None:
            ax.axhline(
                ref[m], color=colors[m], ls="--", lw=1, label=f"random init {short[m]} {ref[m]:.1f}"
            )
    ax.set_xscale("log")
    ax.set_xlabel(f"pretraining images (repeated to the same {p.steps(p.pretrain_epochs)} steps)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"rows": rows, "random": ref}


def claim_e(s: StandardSuite, ratio: float = 0.75) -> Optional[dict]:
    """Claim (e): last-block CKA(masked, full) at ``ratio``, MAE > MoCo v3 > supervised, from
    the contrastive stage's CKA run (None until it has all three)."""
    cka = s.done("contrastive/cka") or {}
    last = cka.get("last_block") or {}
    want = ("MAE", "MoCo v3", "supervised")
    if not all(m in last and str(float(ratio)) in last[m] for m in want):
        return None
    v = {m: float(last[m][str(float(ratio))]) for m in want}
    order = v["MAE"] > v["MoCo v3"] > v["supervised"]
    reversed_pair = v["MAE"] < v["MoCo v3"] or v["MoCo v3"] < v["supervised"]
    verdict_ = "holds" if order else "contradicted" if reversed_pair else "undecided"
    return {"values": v, "ratio": ratio, "images": cka.get("images"), "verdict": verdict_}


def write_report(s: StandardSuite) -> Path:
    """``report.md`` (+ ``summary.json``, plots) in the results folder, from the result files."""
    p, R = s.profile, s.results
    L = [
        "# mimlab reproduce — `standard` suite",
        "",
        f"Regenerated {time.strftime('%Y-%m-%d %H:%M')} from the result files in this folder "
        "(`mimlab reproduce --suite standard --report-only`). CIFAR-10 top-1 at the budget "
        "below; the papers' numbers are ImageNet-1k, ViT-B/16: compare orderings, not values.",
        "",
        "## Protocol",
        "",
    ]
    L += [f"- {x}" for x in p.describe()]
    own = [f"{a.label} {a.ft_seeds}" for k, a in ARMS.items() if a.ft_seeds and not a.hp_from]
    if own:
        L.append(
            "- FT seeds of their own: " + ", ".join(own) + " (MAE and C-MAE: 3 more, added "
            "after their first 3 left claim (c)'s FT comparison undecided); comparisons pair "
            "only the FT seeds both arms have"
        )
    summary: dict = {"profile": asdict(p)}
    L += [
        "",
        "## Verdicts",
        "",
        "| claim | paper | ours: difference [95 % CI] | verdict |",
        "|---|---|---|---|",
    ]
    a = claim_a(s)
    summary["claim_a"] = a
    summary["claims"] = {}
    names = {k: v.label for k, v in ARMS.items()} | {"random": "random init"}
    for c, (text, paper) in CLAIMS.items():
        if c == "e":  # an ordering of CKA values, not a paired accuracy difference
            e = claim_e(s)
            summary["claims"][c] = e
            if e is None:
                L.append(f"| ({c}) {text} | {paper} | not run yet | – |")
            else:
                vals = ", ".join(f"{k} {v:.3f}" for k, v in e["values"].items())
                L.append(
                    f"| ({c}) {text} | {paper} | {vals} ({e['images']} test images; point "
                    f"estimates of one pretraining run each, no interval) | **{e['verdict']}** |"
                )
            continue
        j = judge(s, c)
        summary["claims"][c] = j
        if not j or not j["comparisons"]:
            L.append(f"| ({c}) {text} | {paper} | not run yet | – |")
            continue
        parts = []
        for r in j["comparisons"]:
            d = Diff(**r["diff"])
            rel = {">": ">", "<": "<", "~": "≈"}[r["kind"]]
            pre = (
                f", one pretraining run: + MAE's pretraining sd {r['pretrain_seed_sd']:.3g}"
                if "pretrain_seed_sd" in r
                else ""
            )
            parts.append(
                f"{names.get(r['a'], r['a'])} {rel} {names.get(r['b'], r['b'])} on "
                f"{r['metric']}: {d.a_mean:.2f} vs {d.b_mean:.2f}, "
                f"{d.fmt(3 if r['metric'] in PSNR_METRICS else 2)} "
                f"({d.n_units} unit{'s' * (d.n_units != 1)}{pre}, {r['verdict']})"
            )
        v = j["verdict"] or "incomplete"
        L.append(f"| ({c}) {text} | {paper} | {'; '.join(parts)} | **{v}** |")
    L += [
        "",
        f"≈ holds when the 95 % CI of the difference lies within ±{p.approx_margin:g} "
        "points; > / < hold when the CI excludes 0. Intervals are paired over seeds and test "
        "images; where an arm has a single pretraining run, the interval also carries the "
        f"spread of MAE's {STAGES['core'].pretrain_seeds} core pretraining runs on that "
        "protocol (sd per pretrained arm, added in quadrature), since FT seeds of one "
        "pretraining run cannot show it.",
    ]
    rows = []
    for c in CLAIM_TESTS_COMPUTE:
        j = judge(s, c, CLAIM_TESTS_COMPUTE)
        summary.setdefault("claims_compute_matched", {})[c] = j
        for r in (j or {}).get("comparisons", []):
            d = Diff(**r["diff"])
            rows.append(
                f"| ({c}) | {names.get(r['a'], r['a'])} vs {names.get(r['b'], r['b'])} "
                f"| {r['metric']} | {d.a_mean:.2f} vs {d.b_mean:.2f} | {d.fmt()} | "
                f"{r['verdict']} |"
            )
    if rows:
        L += [
            "",
            "### At equal pretraining compute",
            "",
            "MAE pretrained for 4x the epochs (its own 32-epoch schedule) costs about what "
            "R-MAE (3.4x) and C-MAE (4.3x MAE's training FLOPs per image) cost in 8 epochs "
            "(`mimlab flops`, `flops.json`); MaskDistill (7.6x, 4.3x of it the teacher) "
            "still costs more than MAE at 4x.",
            "",
            "| claim | comparison | metric | top-1 | difference [95 % CI] | verdict |",
            "|---|---|---|---|---|---|",
        ] + rows
    L += [
        "",
        "## Every evaluated init",
        "",
        "| init | stage | FT (mean of units) | linear probe cls | linear probe avg | k-NN | "
        "FT recipe (layer decay / lr) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ["random", *ARMS]:
        res = {m: unit_results(s, arm, m) for m in METRICS}
        if not any(res.values()):
            continue
        cell = {}
        for m, units in res.items():
            vals = [r["top1"] for r in units.values()]
            cell[m] = (
                "–"
                if not vals
                else (
                    f"{sum(vals) / len(vals):.2f}" + (f" (n={len(vals)})" if len(vals) > 1 else "")
                )
            )
        st = arm_stage(arm)
        hp_arm = ARMS[arm].hp_from if arm in ARMS and ARMS[arm].hp_from else arm
        hp = s.done(f"{arm_stage(hp_arm)}/sweep/{hp_arm}") or {}
        rec = f"{hp['layer_decay']:g} / {hp['base_lr']:g}" if "layer_decay" in hp else "–"
        L.append(
            f"| {names.get(arm, arm)} | {st} | {cell['ft']} | {cell['lp_cls']} | "
            f"{cell['lp_avg']} | {cell['knn']} | {rec} |"
        )
    if a:
        L += [
            "",
            "### Claim (a) in detail",
            "",
            "| protocol | MAE | random | MAE − random [95 % CI] | verdict |",
            "|---|---|---|---|---|",
        ]
        for k, lab in METRICS.items():
            if k in a:
                d = Diff(**{kk: v for kk, v in a[k].items() if kk != "verdict"})
                v = a[k]["verdict"]
                L.append(
                    f"| {lab} | {d.a_mean:.2f} ({', '.join(f'{x:.2f}' for x in d.a_units)}) "
                    f"| {d.b_mean:.2f} | {d.fmt()} | {v} |"
                )
        hp_rows = []
        for tag in ("random", "mae"):
            hp = s.done(f"core/sweep/{tag}")
            if hp and "grid" in hp:
                grid = ", ".join(
                    f"ld {g['layer_decay']:g}/lr {g['base_lr']:g}: {g['holdout_top1']:.1f}"
                    for g in hp["grid"]
                )
                hp_rows.append(
                    f"- {tag}: chose layer decay {hp['layer_decay']:g}, lr "
                    f"{hp['base_lr']:g} (held-out top-1 {hp['holdout_top1']:.2f}); "
                    f"grid {grid}"
                )
        if hp_rows:
            L += ["", "Fine-tuning hyper-parameters chosen on the held-out 20 % of the pool:", ""]
            L += hp_rows
    psnr_rows = []
    for arm in ARMS:
        cells = []
        for m in PSNR_METRICS:
            u = psnr_units(s, arm, m)
            vals = [float(np.nanmean(v)) for v in u.values()]
            cells.append(", ".join(f"{v:.2f}" for v in vals) if vals else "–")
        if any(c != "–" for c in cells):
            n = max(len(v) for v in psnr_units(s, arm, "psnr_visible").values() or [[]])
            psnr_rows.append(f"| {names.get(arm, arm)} | {n:,} | " + " | ".join(cells) + " |")
    if psnr_rows:
        L += [
            "",
            "## Reconstruction PSNR",
            "",
            "Mean per-image PSNR (dB, pixels in [0, 1]) on the same seeded test images and "
            "masks (ratio 0.75) for every model, visible patches pasted back; one value per "
            "pretraining run. Every model here predicts per-patch normalised pixels, so the "
            "masked patches need a mean and std: estimated from the image's visible patches "
            "(no leak), or their own true values (a leak of the hidden pixels, the usual "
            "norm-pix figure). The paper does not say which its Table 1 uses; claim (b) asks "
            "for both. Differences are paired over images, with the spread of MAE's core "
            "runs added for runs without a second seed (`mimlab analyze psnr`).",
            "",
            "| model | images | " + " | ".join(lab for _, lab in PSNR_METRICS.values()) + " |",
            "|---|---|" + "---|" * len(PSNR_METRICS),
        ] + psnr_rows
    variants = _variant_rows(s)
    if variants:
        summary["cmae_variants"] = variants["summary"]
        L += [
            "",
            "## C-MAE: negatives x queries",
            "",
            "Each reading of Eq. 11's token-wise loss pretrained once (seed 0) with C-MAE's "
            "budget, fine-tuned with C-MAE's chosen recipe (FT seeds 0 and 1) and probed. "
            "Differences are against the default reading (negatives=position, queries=all), "
            "paired over FT seeds and test images; as every reading has one pretraining run, "
            "the interval also carries MAE's pretraining-seed spread on that protocol (as in "
            "the verdicts). Negatives over the same image or the "
            "whole batch let tokens that hold only their position embedding beat chance "
            "(`tests/test_table5.py`): they are not faithful to Eq. 11.",
            "",
            "| negatives | queries | FT | Δ FT | LP cls | Δ LP cls | LP avg | Δ LP avg | k-NN "
            "| Δ k-NN |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ] + variants["rows"]
    small = _smalldata(s, R / "smalldata" / "smalldata.png")
    if small:
        summary["smalldata"] = small["rows"]
        L += [
            "",
            "## Pretraining on few images (claim d, Tab. 6)",
            "",
            "MAE pretrained on the first N images of the pool, repeated to the same "
            f"{p.steps(p.pretrain_epochs):,} optimizer steps as every other "
            "arm, with the paper's stronger crops (scale 0.08-1); each arm has its own "
            "held-out FT sweep. The last row is MAE on the whole pool (the core stage, default "
            f"crops, {STAGES['core'].pretrain_seeds} pretraining runs). Δ: against random init, "
            "paired over FT seeds and test images; a single pretraining run also carries "
            "MAE's pretraining-seed spread.",
            "",
            "| pretraining images | FT | Δ FT | LP cls | Δ LP cls | LP avg | Δ LP avg | k-NN "
            "| Δ k-NN |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in small["rows"]:
            L.append(
                f"| {r['images']:,}{' (whole pool)' if r['whole_pool'] else ''} | "
                + " | ".join(r["cells"])
                + " |"
            )
        rv = ["–" if v is None else f"{v:.2f}" for v in small["random"].values()]
        L += [
            "| random init | " + " | ".join(f"{v} | –" for v in rv) + " |",
            "",
            "![few-image pretraining](smalldata/smalldata.png)",
        ]
    cur = _curve_plot(s, R / "core" / "curve.png")
    if cur:
        summary["curve"] = cur
        L += [
            "",
            "## Learning curves (MAE vs random init)",
            "",
            "One MAE run of 32 epochs on the 10k pool (one cosine schedule), evaluated at the "
            "checkpoints after 1, 2, 4, 8, 16 and 32 epochs (a 32x span).",
            "",
            "| epochs | steps | images seen | k-NN | linear probe | FT (seed 0) |",
            "|---|---|---|---|---|---|",
        ]
        for r in cur["rows"]:
            f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
            L.append(
                f"| {r['epochs']} | {r['steps']:,} | {r['images_seen']:,} | {f(r['knn'])} "
                f"| {f(r['lp'])} | {f(r['ft'])} |"
            )
        rv = cur["random"]
        f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        L.append(
            f"| random init | – | – | {f(rv.get('knn'))} | {f(rv.get('lp'))} | "
            f"{f(rv.get('ft'))} (mean of seeds) |"
        )
        for k, c in cur["crossover"].items():
            bits = []
            if c.get("above_at_first_point"):
                bits.append("above random already at the first point")
            elif c.get("crossover_images"):
                bits.append(f"crosses random init at ~{c['crossover_images']:,} images seen")
            if c.get("above_from_images"):
                bits.append(f"above it at every budget from {c['above_from_images']:,} images")
            L.append(f"- {k}: {'; '.join(bits) or 'never above random init'}")
        L += ["", "![learning curves](core/curve.png)"]
    fl = R / "flops.json"
    if fl.is_file():
        d = json.loads(fl.read_text())
        L += [
            "",
            "## Training FLOPs per image",
            "",
            f"`{d.get('command', 'mimlab flops')}` ({d.get('convention', '')}); analytic "
            "(`mimlab/analysis/flops.py`) against `torch.utils.flop_counter`:",
            "",
            "| method | MFLOP / image (analytic) | counted | x MAE |",
            "|---|---|---|---|",
        ]
        for r in d.get("rows", []):
            L.append(
                f"| {r['method']} | {r['analytic'] / 1e6:,.1f} | {r['counted'] / 1e6:,.1f} "
                f"| {r['relative_to_mae']:.2f} |"
            )
    for stage in CKA_MODELS:
        cka = s.done(f"{stage}/cka")
        if not (cka and cka.get("last_block")):
            continue
        L += [
            "",
            f"## CKA between masked and full inputs (last block, stage `{stage}`)",
            "",
            "| model | " + " | ".join(f"ratio {r:g}" for r in p.cka_ratios) + " |",
            "|---|" + "---|" * len(p.cka_ratios),
        ]
        for m, vals in cka["last_block"].items():
            L.append(
                f"| {m} | "
                + " | ".join(f"{vals.get(str(float(r)), float('nan')):.3f}" for r in p.cka_ratios)
                + " |"
            )
        if (R / stage / "cka_last_block.png").is_file():
            L += ["", f"![CKA, last block]({stage}/cka_last_block.png)"]
    L += ["", "## Wall time", ""]
    tot: dict = {}
    for f in sorted(R.rglob("*.json")):
        if f.name == "summary.json" or f.with_suffix("").is_dir():
            continue  # a sweep's summary: its points, in the folder beside it, are counted
        try:
            w = json.loads(f.read_text()).get("wall_seconds")
        except ValueError:
            continue
        st = f.relative_to(R).parts[0]
        if w:
            tot[st] = tot.get(st, 0.0) + float(w)
    L.append(
        "Sums of each sub-run's own wall time (`wall_seconds` in its result file). They "
        "include any slowdown from other jobs sharing the machine while it ran, so they are "
        "upper bounds for an idle machine."
    )
    L.append("")
    for st, w in tot.items():
        L.append(f"- stage `{st}`: {w / 60:.1f} min of sub-run wall time")
    summary["wall_minutes"] = {k: round(v / 60, 1) for k, v in tot.items()}
    R.mkdir(parents=True, exist_ok=True)
    (R / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (R / "report.md").write_text("\n".join(L) + "\n")
    return R / "report.md"


def reproduce_standard(
    stage: Optional[str],
    data: str,
    runs: str,
    results: str,
    progress: bool = False,
    report_only: bool = False,
    **fields,
) -> Path:
    """Run one stage (or, with ``report_only``, only regenerate the report)."""
    try:
        prof = StandardProfile(**fields)
    except TypeError as e:
        raise StandardError(f"unknown profile field: {e}") from None
    s = StandardSuite(prof, data, Path(runs), Path(results), progress)
    if report_only or stage is None:
        return write_report(s)
    return s.run_stage(stage)
