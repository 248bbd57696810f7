"""``mimlab reproduce --suite quick|full``: the papers' experiments as one resumable suite.

The ``quick`` profile is a smoke test (decides nothing); ``full`` is the same suite at the
papers' proportions, meant for a GPU. The claims are decided by the standard suite
(:mod:`mimlab.experiments.standard`).

Kong & Zhang (occlusion-invariant MIM), Figure 1 and Tables 1-8, plus MaskDistill, at a scale
set by a :class:`Profile`:

* **methods** (Tables 1, 2, 4, 8; MaskDistill): each method of ``Profile.methods`` is pretrained
  with one shared schedule (same images, epochs, batch, lr), then evaluated with one shared
  recipe: fine-tuning on ``ft_images`` labelled images (*FT*), fine-tuning on a class-balanced
  ``fewshot_fraction`` of them (*10% FT*), a linear probe and k-NN on frozen features, and the
  reconstruction PSNR for methods with a pixel decoder (MAE, R-MAE family). *random init* is
  the same evaluation from random weights; *supervised* is the fine-tuning recipe from scratch
  (so its FT number is random init's), probed on its own features. A second seed of the
  from-scratch run gives a yardstick for seed noise.
* **Figure 1**: linear CKA between full-image and masked-image block outputs, per block, mask
  ratios 0.1 ... 0.9, paired masks (``mimlab analyze cka``), for random init, supervised, MAE,
  R-MAE, C-MAE, MoCo v3 and MAE after fine-tuning.
* **Tables 6-7**: MAE pretrained on N images (1, 10, 100, 1000, and one natural photo), with
  stronger augmentation and a short fixed step budget, then the same fine-tuning recipe; the
  sampling strategies of Table 7 (one class / random / one per class) at ``sampling_n``.

Every sub-experiment is a run directory under ``--out``; a finished one (its ``results.json``
exists) is skipped on a re-run, an interrupted training run continues from its last checkpoint
(``run.resume=auto``). A failed sub-run is recorded (``FAILED.txt``) and the suite goes on;
what depends on it is skipped. ``report.md`` puts the paper's numbers beside ours, with the
budgets, seed, timings, plots (accuracy bars, CKA curves, reconstruction grids) and computed
checks of the paper's orderings.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from .. import tasks
from ..analysis.cka import analyze_cka
from ..analysis.recon import analyze_psnr, visualize_checkpoint
from ..core.config import FinetuneConfig, PretrainConfig, ProbeConfig, resolve
from ..data.datasets import default_data_path
from ..io.plots import pyplot
from .common import cka_last_block, read_result

log = logging.getLogger("mimlab")

# ------------------------------------------------------------------ the papers' numbers
# Kong & Zhang 2022, ImageNet-1k, ViT-B/16 (Table 5 uses ViT-S on ImageNet-100: not mirrored).
PAPER_T1 = {  # method -> (FT top-1, PSNR dB); 100 pretraining epochs unless noted
    "random": (80.9, None),
    "mocov3": (83.2, None),
    "mae": (83.1, 22.2),
    "rmae": (82.7, 23.7),
    "rmae_indep": (82.8, 23.0),
    "rmae_identity": (82.7, 22.9),
}
PAPER_T2 = {"mae": 83.1, "cmae": 82.9}  # FT top-1, 100 epochs
PAPER_T3 = {"cmae_cls": 82.5, "cmae_avg": 82.6, "cmae": 82.9, "cmae_patch_cls": 82.9}
PAPER_T4 = {"mae": (54.5, 83.1, 67.5), "cmae": (41.1, 82.9, 66.4)}  # LP, FT, 10% FT
PAPER_T6 = [  # (images, stronger aug, pretrain epochs, FT top-1)
    (1, True, 5, 82.3),
    (10, False, 2, 81.9),
    (10, True, 5, 82.3),
    (100, False, 10, 82.1),
    (100, True, 10, 82.2),
    (1000, False, 100, 82.2),
    (1000, True, 100, 82.2),
]
PAPER_T6_RANDOM = {100: 80.9, 300: 82.1}  # FT epochs of training from scratch -> top-1
PAPER_T7 = {"one_class": (1, 82.2), "random": (617, 82.2), "one_per_class": (1000, 82.2)}
PAPER_T8 = {  # 1000 ImageNet images (one per class): LP, FT, 10% FT
    "random": (6.1, 80.9, 34.9),
    "supervised": (33.1, 81.0, 52.6),
    "mocov3": (37.3, 79.2, 45.8),
    "mae": (13.8, 82.2, 57.6),
    "rmae": (25.9, 82.1, 58.8),
    "cmae": (20.1, 82.1, 61.9),
}

LABELS = {
    "random": "random init",
    "supervised": "supervised (scratch FT)",
    "mae": "MAE",
    "rmae": "R-MAE",
    "rmae_indep": "R-MAE†",
    "rmae_identity": "R-MAE‡",
    "cmae": "C-MAE (InfoNCE)",
    "cmae_byol": "C-MAE (BYOL)",
    "cmae_cls": "C-MAE cls",
    "cmae_avg": "C-MAE avg",
    "cmae_patch_cls": "C-MAE patch+cls",
    "cmae_nomask": "C-MAE w/o mask token",
    "mocov3": "MoCo v3",
    "maskdistill": "MaskDistill (EffNet-L0)",
    "simmim": "SimMIM",
    "maskfeat": "MaskFeat",
    "data2vec": "data2vec",
}
RECONSTRUCTIVE = ("mae", "rmae", "rmae_indep", "rmae_identity", "simmim")

# ------------------------------------------------------------------ what the suite runs
#: Table 3's C-MAE token variants, pretrained besides ``Profile.methods`` when ``table3``
TABLE3_VARIANTS = ("cmae_cls", "cmae_avg", "cmae_patch_cls")
#: Figure 1: (label, sub-run) of the pretrained models compared by CKA ...
CKA_PRETRAINED = (
    ("MAE", "pretrain/mae"),
    ("R-MAE", "pretrain/rmae"),
    ("C-MAE", "pretrain/cmae"),
    ("MoCo v3", "pretrain/mocov3"),
    ("MaskDistill", "pretrain/maskdistill"),
)
#: ... and of the fine-tuned ones (their run's last checkpoint); random init is added as well
CKA_FINETUNED = (("supervised", "ft/random"), ("MAE fine-tuned", "ft/mae"))
#: Figure 1's report table: the mask ratios shown (the checks use 0.7)
CKA_REPORT_RATIOS = (0.3, 0.5, 0.7, 0.9)
#: Table 7's sampling strategies (besides ``random``) at ``Profile.sampling_n`` images
SAMPLINGS = ("one_class", "one_per_class")
#: Table 6's single natural photo: random 2-20 % crops of one bundled 512 px photo
PHOTO_RUN = (
    "photo-astronaut",
    ["data.path=builtin:photos:astronaut", "data.train_split=''", "data.crop_scale=[0.02,0.2]"],
)


class ReproduceError(Exception):
    """Bad suite arguments or an output folder that belongs to another suite."""


@dataclass(frozen=True)
class Profile:
    """Scale of a suite. Every method shares the pretraining schedule and evaluation recipe."""

    name: str
    preset: str  # model preset of every pretraining / evaluation
    methods: tuple  # pretraining methods of the comparison
    pretrain_images: Optional[int]  # training images for pretraining (None = all)
    pretrain_epochs: int
    batch: int
    base_lr: float  # per 256 images, the same for every method
    warmup_epochs: float
    ft_images: Optional[int]  # labelled images of the fine-tuning pool (None = all)
    ft_epochs: int
    fewshot_fraction: float
    fewshot_epochs: int
    eval_images: Optional[int]  # held-out images for every top-1 (None = all)
    lp_epochs: int
    psnr_images: int
    cka_images: int
    small_ns: tuple  # Table 6 pretraining set sizes
    small_steps: int  # optimizer steps of each small-data pretraining
    sampling_n: int  # Table 7 set size
    teacher_size: Optional[int]  # MaskDistill teacher resolution (None = its default)
    layer_decay: float = 0.75
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    seed: int = 0
    noise_seeds: int = 2  # from-scratch FT seeds (seed-noise yardstick)
    workers: int = 1
    table3: bool = False  # also pretrain the Table 3 C-MAE token variants

    def describe(self) -> list[str]:
        n = lambda v, all_="all": all_ if v is None else f"{v:,}"  # noqa: E731
        return [
            f"model preset `{self.preset}`; seed {self.seed}; batch {self.batch}; AdamW, "
            f"base lr {self.base_lr:g} per 256 images for every method, cosine schedule, "
            f"{self.warmup_epochs:g}-epoch warm-up",
            f"pretraining: {n(self.pretrain_images)} CIFAR-10 training images (seeded random "
            f"subset), {self.pretrain_epochs} epochs, identical for every method",
            f"fine-tuning (FT): {n(self.ft_images)} labelled training images, {self.ft_epochs} "
            f"epochs, layer decay {self.layer_decay:g}, drop path {self.drop_path:g}, label "
            f"smoothing {self.label_smoothing:g}, no mixup; the same recipe from random init",
            f"few-shot FT: a class-balanced {self.fewshot_fraction:.0%} of those labels, "
            f"{self.fewshot_epochs} epochs, same recipe",
            f"linear probe: frozen mean-pooled features of the FT pool, {self.lp_epochs} epochs, "
            f"lr picked on 10% held-out training features; k-NN: k=20, T=0.07",
            f"every top-1 on {n(self.eval_images, 'all 10,000')} held-out CIFAR-10 test images "
            f"(seeded, class-balanced)",
            f"PSNR: {self.psnr_images} test images, mask ratio of the method, seeded masks; "
            f"CKA: {self.cka_images} test images",
            f"small data (Tables 6-7): MAE on N = {', '.join(map(str, self.small_ns))} images "
            f"+ one photo, {self.small_steps} steps of batch {self.batch} each, then FT as above",
        ]


QUICK = Profile(
    name="quick",
    preset="mini",
    methods=(
        "mae",
        "rmae",
        "rmae_indep",
        "rmae_identity",
        "cmae",
        "cmae_byol",
        "mocov3",
        "maskdistill",
    ),
    pretrain_images=10000,
    pretrain_epochs=2,
    batch=128,
    base_lr=1.5e-3,
    warmup_epochs=0.3,
    ft_images=10000,
    ft_epochs=2,
    fewshot_fraction=0.1,
    fewshot_epochs=8,
    eval_images=2000,
    lp_epochs=30,
    psnr_images=500,
    cka_images=256,
    small_ns=(1, 10, 100, 1000),
    small_steps=60,
    sampling_n=10,
    teacher_size=64,
)

FULL = Profile(
    name="full",
    preset="tiny",
    methods=QUICK.methods + ("cmae_nomask",),
    pretrain_images=None,
    pretrain_epochs=100,
    batch=256,
    base_lr=1.5e-4,
    warmup_epochs=10,
    ft_images=None,
    ft_epochs=50,
    fewshot_fraction=0.1,
    fewshot_epochs=100,
    eval_images=None,
    lp_epochs=90,
    psnr_images=2000,
    cka_images=1024,
    small_ns=(1, 10, 100, 1000),
    small_steps=2000,
    sampling_n=1000,
    teacher_size=None,
    workers=8,
    table3=True,
    noise_seeds=3,
)

PROFILES = {"quick": QUICK, "full": FULL}


# ------------------------------------------------------------------ sub-runs
@dataclass
class Outcome:
    name: str
    status: str  # done | skipped (already done) | failed | blocked
    result: Optional[dict] = None
    seconds: float = 0.0
    error: str = ""


@dataclass
class Suite:
    profile: Profile
    data: str
    out: Path
    progress: bool = False
    outcomes: dict = field(default_factory=dict)

    # -- bookkeeping --------------------------------------------------------------
    def _done(self, d: Path) -> Optional[dict]:
        return read_result(d / "results.json")

    def step(
        self,
        name: str,
        d: Path,
        fn: Callable[[], dict],
        needs: tuple = (),
        inputs: Optional[list] = None,
    ) -> Outcome:
        """Run ``fn`` (which writes ``d/results.json``) unless it finished before; failures
        are recorded and do not stop the suite. ``inputs``: what an aggregating step (CKA)
        was computed from; a finished step whose inputs differ now (e.g. a model that failed
        before is there now) runs again."""
        missing = [
            n
            for n in needs
            if self.outcomes.get(n) is None or self.outcomes[n].status in ("failed", "blocked")
        ]
        k = len(self.outcomes) + 1
        if missing:
            oc = Outcome(name, "blocked", error=f"needs {', '.join(missing)}")
            print(f"[{k}] {name}: blocked ({oc.error})", flush=True)
        elif (res := self._done(d)) is not None and (
            inputs is None or res.get("suite_inputs") == inputs
        ):
            oc = Outcome(
                name, "skipped", res, float(res.get("wall_seconds", res.get("seconds", 0)) or 0)
            )
            print(f"[{k}] {name}: already done", flush=True)
        else:
            print(f"[{k}] {name}: running ...", flush=True)
            t0 = time.time()
            try:
                res = fn()
                d.mkdir(parents=True, exist_ok=True)
                res = {**res, "wall_seconds": round(time.time() - t0, 1)}
                if inputs is not None:
                    res["suite_inputs"] = inputs
                (d / "results.json").write_text(json.dumps(res, indent=2, default=str))
                (d / "FAILED.txt").unlink(missing_ok=True)
                oc = Outcome(name, "done", res, time.time() - t0)
                print(f"[{k}] {name}: done in {time.time() - t0:.0f} s", flush=True)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
                d.mkdir(parents=True, exist_ok=True)
                msg = f"{type(e).__name__}: {' '.join(str(e).split())}"
                (d / "FAILED.txt").write_text(msg + "\n\n" + traceback.format_exc())
                oc = Outcome(name, "failed", seconds=time.time() - t0, error=msg)
                print(f"[{k}] {name}: FAILED ({msg[:300]})", flush=True)
        self.outcomes[name] = oc
        return oc

    def result(self, name: str) -> Optional[dict]:
        oc = self.outcomes.get(name)
        return oc.result if oc is not None else None

    # -- configs ------------------------------------------------------------------
    def _common(self, out_sub: str, name: str) -> list[str]:
        p = self.profile
        return [
            f"data.path={self.data}",
            f"run.out_dir={self.out / out_sub}",
            f"run.name={name}",
            "run.resume=auto",
            "run.overwrite=true",  # the suite owns its folders: a failed sub-run is redone
            f"run.seed={p.seed}",
            f"run.progress={str(self.progress).lower()}",
            "run.log_every=10",
            f"data.num_workers={p.workers}",
            f"optim.batch_size={p.batch}",
            f"optim.base_lr={p.base_lr}",
        ]

    def pretrain(self, name: str, method: str, extra: list[str]) -> dict:
        p = self.profile
        ov = self._common("pretrain", name) + [
            f"model.preset={p.preset}",
            f"method.name={method}",
            "run.save_every_steps=50",
        ]
        if method == "maskdistill" and p.teacher_size:
            ov.append(f"method.teacher_size={p.teacher_size}")
        cfg = resolve(PretrainConfig, overrides=ov + extra)
        return tasks.pretrain(cfg)

    def finetune(self, out_sub: str, name: str, ckpt: Optional[str], extra: list[str]) -> dict:
        p = self.profile
        ov = self._common(out_sub, name) + [
            f"optim.layer_decay={p.layer_decay}",
            f"model.drop_path={p.drop_path}",
            f"finetune.label_smoothing={p.label_smoothing}",
            "finetune.mixup=0",
            "finetune.cutmix=0",
            f"optim.warmup_epochs={p.warmup_epochs}",
            "optim.weight_decay=0.05",
            "run.save_every_steps=50",
        ]
        if p.ft_images is not None:
            ov.append(f"data.limit={p.ft_images}")
        if p.eval_images is not None:
            ov.append(f"data.val_limit={p.eval_images}")
        ov += [f"finetune.pretrained={ckpt}"] if ckpt else [f"model.preset={p.preset}"]
        return tasks.finetune(tasks.resolve_run_config(FinetuneConfig, overrides=ov + extra))

    def probe(self, kind: str, name: str, ckpt: Optional[str]) -> dict:
        p = self.profile
        ov = [
            f"data.path={self.data}",
            f"run.out_dir={self.out / kind}",
            f"run.name={name}",
            "run.overwrite=true",  # a probe has nothing to resume: a rerun replaces it
            f"run.seed={p.seed}",
            f"run.progress={str(self.progress).lower()}",
            f"data.num_workers={p.workers}",
            f"probe.epochs={p.lp_epochs}",
        ]
        if p.ft_images is not None:
            ov.append(f"data.limit={p.ft_images}")
        if p.eval_images is not None:
            ov.append(f"data.val_limit={p.eval_images}")
        ov += [f"probe.pretrained={ckpt}"] if ckpt else [f"model.preset={p.preset}"]
        fn = tasks.linprobe if kind == "linprobe" else tasks.knn
        return fn(tasks.resolve_run_config(ProbeConfig, overrides=ov))

    # -- the suite ----------------------------------------------------------------
    def evaluate(self, tag: str, ckpt: Optional[str], needs: tuple) -> None:
        p = self.profile
        self.step(
            f"ft/{tag}",
            self.out / "finetune" / tag,
            lambda: self.finetune("finetune", tag, ckpt, [f"optim.epochs={p.ft_epochs}"]),
            needs,
        )
        self.step(
            f"fewshot/{tag}",
            self.out / "fewshot" / tag,
            lambda: self.finetune(
                "fewshot",
                tag,
                ckpt,
                [
                    f"optim.epochs={p.fewshot_epochs}",
                    f"finetune.label_fraction={p.fewshot_fraction}",
                ],
            ),
            needs,
        )
        probe_ckpt = ckpt
        probe_needs = needs
        if tag == "random":  # supervised = the from-scratch FT model, probed on its features
            for kind in ("linprobe", "knn"):
                self.step(
                    f"{kind}/random",
                    self.out / kind / "random",
                    lambda kind=kind: self.probe(kind, "random", None),
                )
            ft = self.result("ft/random")
            probe_ckpt = str(Path(ft["run_dir"]) / "checkpoints/last.pt") if ft else None
            tag, probe_needs = "supervised", ("ft/random",)
        for kind in ("linprobe", "knn"):
            self.step(
                f"{kind}/{tag}",
                self.out / kind / tag,
                lambda kind=kind, tag=tag, c=probe_ckpt: self.probe(kind, tag, c),
                probe_needs,
            )

    def ckpt(self, step: str) -> Optional[str]:
        r = self.result(step)
        return r.get("checkpoint") if r else None

    def run(self) -> Path:
        p = self.profile
        t0 = time.time()
        methods = list(p.methods) + (list(TABLE3_VARIANTS) if p.table3 else [])
        # 1. pretraining, one shared schedule
        sched = [f"optim.epochs={p.pretrain_epochs}", f"optim.warmup_epochs={p.warmup_epochs}"]
        if p.pretrain_images is not None:
            sched.append(f"data.limit={p.pretrain_images}")
        for m in methods:
            self.step(
                f"pretrain/{m}", self.out / "pretrain" / m, lambda m=m: self.pretrain(m, m, sched)
            )
        # 2. evaluation, one shared recipe
        self.evaluate("random", None, ())
        for s in range(1, p.noise_seeds):
            self.step(
                f"ft/random-seed{s}",
                self.out / "finetune" / f"random-seed{s}",
                lambda s=s: self.finetune(
                    "finetune",
                    f"random-seed{s}",
                    None,
                    [f"optim.epochs={p.ft_epochs}", f"run.seed={p.seed + s}"],
                ),
            )
        for m in methods:
            self.evaluate(m, self.ckpt(f"pretrain/{m}"), (f"pretrain/{m}",))
        # 3. PSNR and reconstruction grids (reconstructive methods)
        for m in methods:
            if m not in RECONSTRUCTIVE:
                continue
            d = self.out / "psnr" / m
            self.step(
                f"psnr/{m}",
                d,
                lambda m=m, d=d: {
                    **analyze_psnr(
                        self.ckpt(f"pretrain/{m}"),
                        self.data,
                        images=p.psnr_images,
                        seed=p.seed,
                        out=str(d / "psnr.json"),
                        workers=p.workers,
                        progress=self.progress,
                    ),
                    "grid": visualize_checkpoint(
                        self.ckpt(f"pretrain/{m}"),
                        self.data,
                        n=6,
                        seed=p.seed,
                        out=str(d / "grid.png"),
                    ),
                },
                (f"pretrain/{m}",),
            )
        # 4. Figure 1: CKA
        ck, labels = [], []
        for label, s in CKA_PRETRAINED:
            if self.ckpt(s):
                ck.append(self.ckpt(s))
                labels.append(label)
        for label, s in CKA_FINETUNED:
            r = self.result(s)
            if r:
                ck.append(str(Path(r["run_dir"]) / "checkpoints/last.pt"))
                labels.append(label)
        d = self.out / "cka"
        self.step(
            "cka",
            d,
            lambda: analyze_cka(
                self.data,
                ck,
                random_init=[p.preset],
                images=p.cka_images,
                out=str(d),
                seed=p.seed,
                workers=p.workers,
                labels=labels + ["random init"],
                progress=self.progress,
            ),
            inputs=labels,
        )
        # 5. Tables 6-7: MAE on a few images, stronger augmentation, short fixed budget
        for tag, extra in self.small_data_runs():
            self.step(
                f"small/pretrain-{tag}",
                self.out / "small" / "pretrain" / tag,
                lambda tag=tag, extra=extra: self.pretrain_small(tag, extra),
            )
            self.step(
                f"small/ft-{tag}",
                self.out / "small" / "finetune" / tag,
                lambda tag=tag: self.finetune(
                    "small/finetune",
                    tag,
                    self.ckpt(f"small/pretrain-{tag}"),
                    [f"optim.epochs={p.ft_epochs}"],
                ),
                (f"small/pretrain-{tag}",),
            )
        log.info("suite %s finished in %.0f s", p.name, time.time() - t0)
        return write_report(self)

    def small_data_runs(self) -> list[tuple[str, list[str]]]:
        p = self.profile
        runs = [(f"n{n}-random", [f"data.limit={n}", "data.subset=random"]) for n in p.small_ns]
        for strat in SAMPLINGS:
            runs.append(
                (f"n{p.sampling_n}-{strat}", [f"data.limit={p.sampling_n}", f"data.subset={strat}"])
            )
        if f"n{p.sampling_n}-random" not in [t for t, _ in runs]:
            runs.append(
                (f"n{p.sampling_n}-random", [f"data.limit={p.sampling_n}", "data.subset=random"])
            )
        runs.append((PHOTO_RUN[0], list(PHOTO_RUN[1])))
        return runs

    def pretrain_small(self, tag: str, extra: list[str]) -> dict:
        """MAE on a few images: ``small_steps`` optimizer steps (one 'epoch' over the set
        repeated), stronger augmentation (crops from 8% of the image, colour jitter of the
        whole image), no other stopping signal (there is no validation set to watch)."""
        p = self.profile
        n = next((int(e.split("=")[1]) for e in extra if e.startswith("data.limit=")), 1)
        repeat = math.ceil(p.small_steps * p.batch / n)
        aug = [] if "photo" in tag else ["data.crop_scale=[0.08,1.0]"]
        return self.pretrain(
            tag,
            "mae",
            [
                "optim.epochs=1",
                "optim.warmup_epochs=0.1",
                f"data.repeat={repeat}",
                f"run.out_dir={self.out / 'small' / 'pretrain'}",
                "method.color_jitter=whole",
                *aug,
                *extra,
            ],
        )


# ------------------------------------------------------------------ report
def _fmt(v, nd=1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}"


def _get(s: Suite, step: str, key: str = "top1"):
    r = s.result(step)
    return r.get(key) if r else None


def _bar_plot(s: Suite, rows: list[str], path: Path) -> Optional[Path]:
    cols = [
        ("FT", "ft/{}"),
        ("few-shot FT", "fewshot/{}"),
        ("linear probe", "linprobe/{}"),
        ("k-NN", "knn/{}"),
    ]
    vals = [
        [
            _get(
                s,
                c.format(
                    r if not (r == "supervised" and c.startswith(("ft", "few"))) else "random"
                ),
            )
            for c in (c for _, c in cols)
        ]
        for r in rows
    ]
    if not any(v is not None for row in vals for v in row):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 3.6))
    w = 0.8 / len(cols)
    for j, (label, _) in enumerate(cols):
        xs = [i + (j - (len(cols) - 1) / 2) * w for i in range(len(rows))]
        ax.bar(xs, [row[j] if row[j] is not None else 0 for row in vals], w, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([LABELS.get(r, r) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("CIFAR-10 top-1 (%)")
    ax.set_title(
        f"{s.profile.name} suite: same pretraining budget, same evaluation recipe", fontsize=9
    )
    ax.legend(fontsize=7, ncol=4)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _small_plot(s: Suite, tags: list[tuple[str, str]], path: Path) -> Optional[Path]:
    vals = [(lab, _get(s, f"small/ft-{t}")) for lab, t in tags]
    vals = [(lab, v) for lab, v in vals if v is not None]
    rnd = _get(s, "ft/random")
    if not vals:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(range(len(vals)), [v for _, v in vals], color="tab:blue")
    if rnd is not None:
        ax.axhline(rnd, color="tab:red", ls="--", label=f"random init {rnd:.1f}")
    if _get(s, "ft/mae") is not None:
        ax.axhline(
            _get(s, "ft/mae"),
            color="tab:green",
            ls=":",
            label=f"MAE on the full pretraining set {_get(s, 'ft/mae'):.1f}",
        )
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels([lab for lab, _ in vals], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("FT top-1 (%)")
    lo = min([v for _, v in vals] + ([rnd] if rnd is not None else []))
    ax.set_ylim(max(0, lo - 10), None)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _check(desc: str, ok: Optional[bool], detail: str) -> str:
    mark = "n/a" if ok is None else ("yes" if ok else "**no**")
    return f"| {desc} | {mark} | {detail} |"


def ordering_checks(s: Suite, noise: Optional[float]) -> list[str]:
    """The papers' qualitative claims, checked on our numbers. 'Approximately equal' means
    within max(1 point, twice the from-scratch seed spread)."""
    tol = max(1.0, 2 * noise) if noise is not None else 1.0
    ft = {
        m: _get(s, f"ft/{m}")
        for m in (
            "random",
            "mae",
            "rmae",
            "rmae_indep",
            "rmae_identity",
            "cmae",
            "cmae_byol",
            "mocov3",
            "maskdistill",
        )
    }
    lp = {
        m: _get(s, f"linprobe/{m}")
        for m in ("mae", "cmae", "cmae_byol", "supervised", "mocov3", "random")
    }
    few = {m: _get(s, f"fewshot/{m}") for m in ("random", "mae", "rmae", "cmae")}
    rows = ["| claim (paper) | holds here? | our numbers |", "|---|---|---|"]

    def approx(a, b, name_a, name_b, what="FT"):
        if a is None or b is None:
            return _check(f"{name_a} ≈ {name_b} on {what} (T1/T2)", None, "missing")
        return _check(
            f"{name_a} ≈ {name_b} on {what} (T1/T2)",
            abs(a - b) <= tol,
            f"{a:.2f} vs {b:.2f} (Δ {a - b:+.2f}, tolerance ±{tol:.2f})",
        )

    def greater(a, b, name_a, name_b, what, table):
        if a is None or b is None:
            return _check(f"{name_a} > {name_b} on {what} ({table})", None, "missing")
        return _check(
            f"{name_a} > {name_b} on {what} ({table})",
            a > b,
            f"{a:.2f} vs {b:.2f} (Δ {a - b:+.2f})",
        )

    rows.append(greater(ft["mae"], ft["random"], "MAE", "random init", "FT", "T1"))
    for m in ("rmae", "rmae_indep", "rmae_identity"):
        rows.append(approx(ft[m], ft["mae"], LABELS[m], "MAE"))
    rows.append(approx(ft["cmae"], ft["mae"], "C-MAE", "MAE"))
    rows.append(approx(ft["cmae_byol"], ft["cmae"], "C-MAE (BYOL)", "C-MAE (InfoNCE)"))
    rows.append(greater(lp["mae"], lp["cmae"], "MAE", "C-MAE", "linear probe", "T4"))
    rows.append(greater(few["mae"], few["random"], "MAE", "random init", "10% FT", "T8"))
    rows.append(greater(lp["mocov3"], lp["mae"], "MoCo v3", "MAE", "linear probe", "T8"))
    rows.append(greater(ft["mae"], ft["mocov3"], "MAE", "MoCo v3", "FT", "T8"))
    rows.append(
        greater(ft["maskdistill"], ft["mae"], "MaskDistill", "MAE", "FT", "MaskDistill paper")
    )
    r = s.result("cka")
    last = _cka_last(s)
    if last:
        mim = [last[k] for k in ("MAE", "R-MAE", "C-MAE") if k in last]
        other = [last[k] for k in ("supervised", "MoCo v3") if k in last]
        if mim and other:
            rows.append(
                _check(
                    "MIM models (MAE, R-MAE, C-MAE) more occlusion-invariant than "
                    "supervised and MoCo v3: last-block CKA at ratio 0.7 (Fig. 1)",
                    min(mim) > max(other),
                    f"MIM min {min(mim):.3f} vs others max {max(other):.3f}",
                )
            )
    elif r is None:
        rows.append(_check("Fig. 1 CKA ordering", None, "CKA not run"))
    for t, lab in (("n1-random", "1 image"), ("photo-astronaut", "1 photo")):
        rows.append(
            greater(
                _get(s, f"small/ft-{t}"), ft["random"], f"MAE on {lab}", "random init", "FT", "T6"
            )
        )
    return rows


def _cka_last(s: Suite, ratio: float = 0.7) -> dict:
    """label -> CKA of the last block at ``ratio`` from the CKA CSV."""
    return {
        m: v
        for m, by_ratio in cka_last_block(s.out / "cka" / "cka.csv").items()
        for r, v in by_ratio.items()
        if abs(float(r) - ratio) < 1e-6
    }


def write_report(s: Suite) -> Path:
    p = s.profile
    out = s.out
    rows = ["random", "supervised", *p.methods]
    L: list[str] = [
        f"# mimlab reproduce — `{p.name}` suite",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `mimlab reproduce --suite "
        f"{p.name}`; data `{s.data}`. Our numbers are CIFAR-10 top-1 at the budget "
        "below; the paper's are ImageNet-1k with ViT-B/16 (100 pretraining epochs, "
        "100 FT epochs). Only orderings and gaps can be compared, not the values.",
        "",
    ]
    if p.name == "quick":
        L += [
            "> **This is a smoke test that decides nothing.** At this budget (156 pretraining "
            "steps) MAE's features have not yet passed a random network's, one seed is run and "
            "no confidence interval is computed, so the orderings below say whether the "
            "pipeline runs, not whether the papers hold. The claims are decided by "
            "`mimlab reproduce --suite standard` (`docs/results/standard/report.md`).",
            "",
        ]
    L += ["## Budget (the same for every method)", ""]
    L += [f"- {x}" for x in p.describe()]
    tot = sum(o.seconds for o in s.outcomes.values())
    L += [
        f"- compute: {tot / 60:.1f} min of wall time over all sub-runs "
        f"({sum(1 for o in s.outcomes.values() if o.status == 'done')} run by this "
        f"invocation, {sum(1 for o in s.outcomes.values() if o.status == 'skipped')} "
        "finished earlier); per sub-run times at the end",
        "",
    ]
    noise = None
    seeds = [_get(s, "ft/random")] + [
        _get(s, f"ft/random-seed{k}") for k in range(1, p.noise_seeds)
    ]
    seeds = [v for v in seeds if v is not None]
    if len(seeds) > 1:
        noise = max(seeds) - min(seeds)
        L += [
            f"Seed noise yardstick: fine-tuning from scratch with {len(seeds)} seeds gave "
            f"{', '.join(f'{v:.2f}' for v in seeds)} (spread {noise:.2f} points).",
            "",
        ]

    # main table
    L += [
        "## Methods at one budget (Tables 1, 2, 4, 8 and MaskDistill)",
        "",
        "| method | pretrain img/s | pretrain loss (last) | FT | 10% FT | linear probe | k-NN | "
        "PSNR dB | paper FT (T1/T2) | paper PSNR (T1) | paper LP / FT / 10% FT (T4) | "
        "paper LP / FT / 10% FT (T8, 1000 imgs) |",
        "|" + "---|" * 12,
    ]
    for m in rows:
        pre = s.result(f"pretrain/{m}") or {}
        ftm = "random" if m == "supervised" else m
        t1 = PAPER_T1.get(m, (PAPER_T2.get(m), None))
        t4 = PAPER_T4.get(m)
        t8 = PAPER_T8.get(m)
        ps = s.result(f"psnr/{m}")
        L.append(
            "| "
            + " | ".join(
                [
                    LABELS.get(m, m),
                    _fmt(pre.get("images_per_s")),
                    _fmt(pre.get("final_loss"), 4),
                    _fmt(_get(s, f"ft/{ftm}"), 2),
                    _fmt(_get(s, f"fewshot/{ftm}"), 2),
                    _fmt(_get(s, f"linprobe/{m}"), 2),
                    _fmt(_get(s, f"knn/{m}"), 2),
                    _fmt(ps.get("psnr"), 2) if ps else "–",
                    _fmt(t1[0]) if m != "supervised" else "–",
                    _fmt(t1[1]),
                    " / ".join(_fmt(v) for v in t4) if t4 else "–",
                    " / ".join(_fmt(v) for v in t8) if t8 else "–",
                ]
            )
            + " |"
        )
    L += [
        "",
        "*supervised* = the from-scratch FT run (its FT and 10% FT are random init's); "
        "its probes use its own trained features. PSNR: visible patches pasted back, mask "
        "ratio of the method. The paper's Table 4 rows for C-MAE (BYOL) and C-MAE without "
        "mask tokens are not legible in our copy of the paper and are left out.",
        "",
    ]
    fig = _bar_plot(s, rows, out / "accuracy.png")
    if fig:
        L += ["![accuracy per method](accuracy.png)", ""]
    if p.table3:
        L += [
            "### Table 3: C-MAE loss on which tokens (FT top-1)",
            "",
            "| variant | ours | paper |",
            "|---|---|---|",
        ]
        for m, v in PAPER_T3.items():
            L.append(f"| {LABELS[m]} | {_fmt(_get(s, f'ft/{m}'), 2)} | {v} |")
        L.append("")
    # reconstructions
    grids = [
        (m, out / "psnr" / m / "grid.png")
        for m in RECONSTRUCTIVE
        if (out / "psnr" / m / "grid.png").is_file()
    ]
    if grids:
        L += [
            "### Reconstructions (Table 1 PSNR)",
            "",
            "Columns: original / masked input / reconstruction / reconstruction with the "
            "visible patches pasted back (norm_pix predictions de-normalised per patch).",
            "",
        ]
        L += [f"**{LABELS[m]}**: ![{m}]({g.relative_to(out)})" for m, g in grids] + [""]
    # Figure 1
    L += ["## Figure 1: CKA between full and masked inputs, per block", ""]
    cka = s.result("cka")
    if cka:
        last = {r: _cka_last(s, r) for r in CKA_REPORT_RATIOS}
        models = list(last[0.7])
        L += [
            f"Linear CKA over {p.cka_images} test images, masks seeded and shared by all "
            "models (masked tokens dropped). Last block:",
            "",
            "| model | " + " | ".join(f"ratio {r:g}" for r in last) + " |",
            "|---|" + "---|" * len(last),
        ]
        for mdl in models:
            L.append(f"| {mdl} | " + " | ".join(_fmt(last[r].get(mdl), 3) for r in last) + " |")
        L += [
            "",
            "Paper (Fig. 1, ViT-B, qualitative): MAE, R-MAE and C-MAE keep high CKA at "
            "every block and ratio; supervised and MoCo v3 fall off with the ratio; "
            "fine-tuned MAE lies between.",
            "",
        ]
        L += [f"![{png.stem}](cka/{png.name})" for png in sorted((out / "cka").glob("*.png"))]
        L.append("")
    else:
        L += ["(not run)", ""]
    # Tables 6-7
    L += [
        "## Tables 6-7: MAE pretrained on a handful of images, then fine-tuned",
        "",
        "| pretraining set | sampling | classes | our FT | paper FT |",
        "|---|---|---|---|---|",
    ]
    t6 = {n: v for n, strong, _, v in PAPER_T6 if strong}  # we use stronger augmentation
    small_rows = []
    for tag, extra in s.small_data_runs():
        n = next((int(e.split("=")[1]) for e in extra if e.startswith("data.limit=")), None)
        strat = next((e.split("=")[1] for e in extra if e.startswith("data.subset=")), "-")
        if tag.startswith("photo"):
            label, classes, paper = (
                "1 natural photo (astronaut, random crops)",
                "–",
                f"{t6[1]} (1 ImageNet image)",
            )
        else:
            label = f"{n} CIFAR-10 image{'s' if n != 1 else ''}"
            pre = s.result(f"small/pretrain-{tag}")
            classes = "–"
            if strat == "one_class":
                classes = "1"
            elif strat == "one_per_class":
                classes = str(min(n, 10))
            paper = str(t6.get(n, "–"))
            if n == p.sampling_n and strat != "random":
                paper = str(PAPER_T7[strat][1]) + " (T7, 1000 images)"
        small_rows.append((label if strat in ("random", "-") else f"{n} ({strat})", tag))
        L.append(
            f"| {label} | {strat} | {classes} | {_fmt(_get(s, f'small/ft-{tag}'), 2)} | {paper} |"
        )
    L.append(
        f"| none (random init) | – | – | {_fmt(_get(s, 'ft/random'), 2)} | "
        f"{PAPER_T6_RANDOM[100]} (100 ep) / {PAPER_T6_RANDOM[300]} (300 ep) |"
    )
    L += [
        "",
        "Small-data pretraining: MAE, a fixed budget of "
        f"{p.small_steps} steps of {p.batch} (the set is repeated), crops from 8–100% of the "
        "image and colour jitter of the whole image (stronger than the default 20–100% crops, "
        "no jitter). The short fixed budget is our early stopping: with a few images there "
        "is no held-out signal to stop on, and the paper's own small-data runs are 2–10 "
        "epochs. The photo run takes 2–20% crops of one 512 px photo. Every row uses the "
        "FT recipe above.",
        "",
    ]
    fig = _small_plot(s, small_rows, out / "small_data.png")
    if fig:
        L += ["![small data](small_data.png)", ""]
    # checks
    L += ["## The paper's orderings, checked on our numbers", ""]
    L += ordering_checks(s, noise) + [""]
    # bookkeeping
    bad = [o for o in s.outcomes.values() if o.status in ("failed", "blocked")]
    L += ["## Sub-runs", "", "| sub-run | status | wall s |", "|---|---|---|"]
    for o in s.outcomes.values():
        L.append(
            f"| {o.name} | {o.status}{(': ' + o.error[:120]) if o.error else ''} | "
            f"{o.seconds:.0f} |"
        )
    if bad:
        L += [
            "",
            f"{len(bad)} sub-run(s) failed or were blocked; fix and re-run the same "
            "command (finished sub-runs are skipped).",
        ]
    L.append("")
    path = out / "report.md"
    path.write_text("\n".join(L))
    summary = {
        o.name: {
            "status": o.status,
            "seconds": round(o.seconds, 1),
            "error": o.error,
            "result": _slim(o.result),
        }
        for o in s.outcomes.values()
    }
    (out / "summary.json").write_text(
        json.dumps(
            {"profile": asdict(p), "data": s.data, "subruns": summary}, indent=2, default=str
        )
    )
    return path


def _slim(r: Optional[dict]) -> Optional[dict]:
    if not r:
        return r
    keep = (
        "top1",
        "images_per_s",
        "final_loss",
        "steps",
        "epochs",
        "seconds",
        "psnr",
        "psnr_all_predicted",
        "best_lr",
        "train_images",
        "val_images",
        "label_fraction",
        "wall_seconds",
    )
    return {k: r[k] for k in keep if k in r}


# ------------------------------------------------------------------ entry point
def reproduce(
    suite: str = "quick",
    data: Optional[str] = None,
    out: Optional[str] = None,
    progress: bool = False,
    overrides: Optional[dict] = None,
) -> Path:
    """Run (or continue) a suite; returns the path of ``report.md``. ``overrides``: Profile
    fields to change (e.g. ``{"pretrain_epochs": 1}``); they are part of the suite's identity,
    so a folder started with other settings is refused."""
    if suite not in PROFILES:
        raise ReproduceError(f"--suite must be one of {' | '.join(PROFILES)}, got '{suite}'")
    prof = PROFILES[suite]
    if overrides:
        bad = [k for k in overrides if k not in prof.__dataclass_fields__ or k == "name"]
        if bad:
            raise ReproduceError(
                f"unknown profile field(s) {bad}; known: "
                f"{', '.join(f for f in prof.__dataclass_fields__ if f != 'name')}"
            )
        prof = replace(prof, **overrides)
    data = data or default_data_path()
    if not data:
        raise ReproduceError(
            "no dataset: pass --data PATH (CIFAR-10 in ImageFolder layout, with train/ and test/)"
        )
    if not (Path(data) / "train").is_dir() or not (Path(data) / "test").is_dir():
        raise ReproduceError(
            f"{data}: the suites need a labelled dataset with train/ and "
            "test/ class folders (e.g. ../shared/data/cifar10)"
        )
    outp = Path(out or f"runs/reproduce-{suite}")
    outp.mkdir(parents=True, exist_ok=True)
    ident = {"profile": json.loads(json.dumps(asdict(prof))), "data": str(Path(data).resolve())}
    idf = outp / "suite.json"
    if idf.is_file():
        old = json.loads(idf.read_text())
        if old != ident:
            diff = sorted(
                k
                for k in set(old["profile"]) | set(ident["profile"])
                if old["profile"].get(k) != ident["profile"].get(k)
            )
            if old.get("data") != ident["data"]:
                diff.append("data")
            raise ReproduceError(
                f"{outp} holds a suite with different settings ({', '.join(diff)}); "
                "use another --out or the same settings"
            )
    else:
        idf.write_text(json.dumps(ident, indent=2))
    s = Suite(prof, data, outp, progress=progress)
    return s.run()
