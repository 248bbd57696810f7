"""Protocol v2's arms, stages and claims, as data.

An arm is a pretraining recipe (a method preset plus overrides); ``random`` is random init,
whose units are fine-tuning seeds. Each arm that enters a verdict gets
``PROTOCOL["pretrain_runs"][arm]`` pretraining runs (seeds 0, 1, ...), each fine-tuned once.
Stages are ordered by claim as the issue asks: (a), (c), (d) first, then (b), (f), (g).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...core.paper_settings import paper_optim
from .protocol import PROTOCOL, ema_m0


def _lr_scale(method: str) -> float:
    """The paper's pretraining lr of ``method`` relative to MAE's (the suite's lr is MAE's
    times this ratio)."""
    return paper_optim(method)["base_lr"] / paper_optim("mae")["base_lr"]


#: small-data pretraining: the stronger augmentation of the paper's few-image runs
_SMALL_AUG = ("data.crop_scale=[0.08,1.0]",)
#: Table 5 without patch masking: the strongest remaining composition (cutmix + jitter)
_NOMASK = ("method.mask=none", "method.cutmix=true", "method.color_jitter=after_mask")


def ema_overrides(protocol: dict) -> tuple:
    """The cosine EMA schedule whose starting time constant is the protocol's fraction of its
    pretraining run (appended to an arm's overrides when ``Arm.ema``)."""
    s = protocol["settings"]["ema"]
    steps = protocol["pretrain"]["steps"]
    return (
        "method.ema_schedule=cosine",
        f"method.ema_momentum={ema_m0(steps, s['fraction_of_run']):.4f}",
    )


def _teacher() -> tuple:
    t = PROTOCOL["settings"]["maskdistill_teacher"]
    return (f"method.teacher={t['spec']}", f"method.teacher_size={t['teacher_size']}")


@dataclass(frozen=True)
class Arm:
    """``method`` preset (``supervised``: a fine-tune of random init on the labelled images),
    ``overrides`` (after the suite's), ``lr_scale`` x MAE's base lr, ``small``: pretrain on N
    training images at the same step budget, drawn with ``subset`` (``data.subset``); ``ema``:
    the protocol's EMA schedule (:func:`ema_overrides`, after ``overrides``)."""

    method: str
    overrides: tuple = ()
    lr_scale: float = 1.0
    label: str = ""
    small: int = 0
    subset: str = "random"
    ema: bool = False


ARMS = {
    "mae": Arm("mae", label="MAE"),
    "cmae": Arm("cmae", (), _lr_scale("cmae"), "C-MAE", ema=True),
    "mocov3": Arm("mocov3", ("optim.weight_decay=0.1",), label="MoCo v3"),
    "rmae": Arm("rmae", (), _lr_scale("rmae"), "R-MAE"),
    "rmae_indep": Arm("rmae_indep", (), _lr_scale("rmae_indep"), "R-MAE†"),
    "rmae_identity": Arm("rmae_identity", (), _lr_scale("rmae_identity"), "R-MAE‡"),
    "maskdistill": Arm("maskdistill", _teacher(), label="MaskDistill (EfficientNet-Lite0)"),
    "mae_nomask": Arm("mae", _NOMASK, label="MAE w/o masking (cutmix + jitter)"),
    "cmae_nomask_aug": Arm(
        "cmae", _NOMASK, _lr_scale("cmae"), "C-MAE w/o masking (cutmix + jitter)", ema=True
    ),
    "cmae_cls": Arm("cmae_cls", (), _lr_scale("cmae"), "C-MAE, loss on the class token", ema=True),
    "cmae_avg": Arm(
        "cmae_avg", (), _lr_scale("cmae"), "C-MAE, loss on the token average", ema=True
    ),
    "cmae_nomask": Arm("cmae_nomask", (), _lr_scale("cmae"), "C-MAE without mask tokens", ema=True),
    **{
        f"mae_n{n}": Arm("mae", _SMALL_AUG, label=f"MAE on {n} image{'s' * (n > 1)}", small=n)
        for n in (1, 10, 100, 1000)
    },
    # Tab. 7: how the 1,000 images are drawn; Tab. 8: methods on 1,000 images, one per class
    "mae_n1000_oneclass": Arm(
        "mae", _SMALL_AUG, label="MAE on 1000 images of one class", small=1000, subset="one_class"
    ),
    "mae_n1000_perclass": Arm(
        "mae",
        _SMALL_AUG,
        label="MAE on 1000 images, class-balanced",
        small=1000,
        subset="one_per_class",
    ),
    "rmae_n1000": Arm(
        "rmae", _SMALL_AUG, _lr_scale("rmae"), "R-MAE on 1000 images", 1000, "one_per_class"
    ),
    "cmae_n1000": Arm(
        "cmae", _SMALL_AUG, _lr_scale("cmae"), "C-MAE on 1000 images", 1000, "one_per_class", True
    ),
    "mocov3_n1000": Arm(
        "mocov3",
        ("optim.weight_decay=0.1",),
        1.0,
        "MoCo v3 on 1000 images",
        1000,
        "one_per_class",
    ),
    "supervised_n1000": Arm(
        "supervised", (), 1.0, "supervised on 1000 images", 1000, "one_per_class"
    ),
}

#: Tab. 8's arms: each method on the same 1,000 class-balanced images
BENCH1000 = ("supervised_n1000", "mocov3_n1000", "mae_n1000_perclass", "rmae_n1000", "cmae_n1000")
#: stage -> (arms, claims), in the order they run
STAGES = {
    "core": (("mae",), ("a",)),
    "contrastive": (("cmae", "mocov3"), ("c",)),
    "smalldata": (("mae_n1", "mae_n10", "mae_n100", "mae_n1000"), ("d",)),
    "rmae": (("rmae", "rmae_indep", "rmae_identity"), ("b",)),
    "augment": (("mae_nomask", "cmae_nomask_aug", "maskdistill"), ("f", "g")),
    "cmae_variants": (("cmae_cls", "cmae_avg", "cmae_nomask"), ("h",)),
    "sampling": (("mae_n1000_oneclass", "mae_n1000_perclass"), ("i",)),
    "bench1000": (("supervised_n1000", "mocov3_n1000", "rmae_n1000", "cmae_n1000"), ("j",)),
}
#: stage -> arms that also get a 10 %-label fine-tune (Tab. 4's few-shot protocol)
FT10 = {
    "cmae_variants": ("mae", "cmae", "cmae_nomask"),
    "bench1000": BENCH1000 + ("random",),
}
#: arms whose pretrained encoder gets a CKA reading (claim (e)); PSNR: MAE-style decoders
CKA_ARMS = ("mae", "mocov3", "cmae", "rmae")
PSNR_ARMS = ("mae", "rmae")


def stage_of(arm: str) -> str:
    """The stage an arm's runs belong to (random init: ``core``); other stages reuse them."""
    if arm == "random":
        return "core"
    for stage, (arms, _) in STAGES.items():
        if arm in arms:
            return stage
    raise KeyError(f"arm {arm!r} is in no stage")


#: claim -> (text, paper figure, sub-tests (A, B, metric, kind))
CLAIMS = {
    "a": ("MAE-init FT > random-init FT", "83.1 vs 80.9 (Tab. 1)", [("mae", "random", "ft", ">")]),
    "c": (
        "C-MAE ≈ MAE on FT, C-MAE < MAE on linear probe",
        "82.9 vs 83.1; 41.1 vs 54.5 (Tab. 4)",
        [("cmae", "mae", "ft", "~"), ("cmae", "mae", "lp_cls", "<")],
    ),
    "d": (
        "MAE on 1/10/100/1000 images > random init, the amount barely matters",
        "82.3 / 82.3 / 82.2 / 82.2 vs 80.9 (Tab. 6-7)",
        [(f"mae_n{n}", "random", "ft", ">") for n in (1, 10, 100, 1000)]
        + [("mae_n1", "mae_n1000", "ft", "~")],
    ),
    "b": (
        "R-MAE ≈ MAE, R-MAE† ≈ R-MAE‡ ≈ R-MAE on FT; R-MAE's reconstruction PSNR above MAE's",
        "82.7 / 82.8 / 82.7 vs 83.1; 23.7 vs 22.2 dB (Tab. 1)",
        [
            ("rmae", "mae", "ft", "~"),
            ("rmae_indep", "rmae", "ft", "~"),
            ("rmae_identity", "rmae", "ft", "~"),
            ("rmae", "mae", "psnr", "effect"),
        ],
    ),
    "e": (
        "MIM features are occlusion invariant: last-block CKA(masked 75 %, full) of MAE above "
        "MoCo v3's and the supervised model's, C-MAE's above MoCo v3's",
        "qualitative (Fig. 1)",
        [
            ("mae", "mocov3", "cka", "effect"),
            ("mae", "supervised", "cka", "effect"),
            ("cmae", "mocov3", "cka", "effect"),
        ],
    ),
    "f": (
        "removing patch masking hurts MAE and C-MAE",
        "Tab. 5 (ViT-S, ImageNet-100)",
        [("mae", "mae_nomask", "ft", ">"), ("cmae", "cmae_nomask_aug", "ft", ">")],
    ),
    "g": (
        "MaskDistill > MAE on FT (teacher EfficientNet-Lite0, not CLIP)",
        "MaskDistill paper",
        [("maskdistill", "mae", "ft", ">")],
    ),
    "h": (
        "C-MAE's token-wise loss is at least as good as the class-token and average variants on "
        "FT; without mask tokens C-MAE recovers linear probe and 10 %-label FT",
        "Tab. 3: 82.9 token-wise vs 82.5 class token, 82.6 average; Tab. 4: LP and 10 % FT "
        "'largely recover' without mask tokens",
        [
            ("cmae", "cmae_cls", "ft", ">="),
            ("cmae", "cmae_avg", "ft", ">="),
            ("cmae_nomask", "cmae", "lp_cls", ">"),
            ("cmae_nomask", "cmae", "ft10", ">"),
        ],
    ),
    "i": (
        "how the 1,000 pretraining images are drawn does not matter (one class ≈ random ≈ one "
        "per class) on FT",
        "82.2 / 82.2 / 82.2 (Tab. 7)",
        [
            ("mae_n1000_oneclass", "mae_n1000", "ft", "~"),
            ("mae_n1000_perclass", "mae_n1000", "ft", "~"),
        ],
    ),
    "j": (
        "on 1,000 images MAE, R-MAE and C-MAE fine-tune at least as well as supervised and "
        "MoCo v3 while their linear probe is lower; on 10 %-label FT they are above both",
        "LP 13.8 / 25.9 / 20.1 vs 33.1 / 37.3; FT 82.2 / 82.1 / 82.1 vs 81.0 / 79.2; 10 % FT "
        "57.6 / 58.8 / 61.9 vs 52.6 / 45.8 (Tab. 8)",
        [
            (mim, other, metric, kind)
            for mim in ("mae_n1000_perclass", "rmae_n1000", "cmae_n1000")
            for other in ("supervised_n1000", "mocov3_n1000")
            for metric, kind in (("ft", ">="), ("lp_cls", "<"), ("ft10", ">"))
        ],
    ),
    "k": (
        "MIM pretraining raises shape bias over supervised training (CIFAR-10 protocol of the "
        "cue-conflict stimuli, 210 images; fine-tuned models)",
        "MaskDistill paper (shape-bias analysis)",
        [(arm, "random", "shape_bias", ">") for arm in ("mae", "maskdistill", "cmae")],
    ),
}
