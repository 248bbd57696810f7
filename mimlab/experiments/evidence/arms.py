"""Protocol v2's arms, stages and claims, as data.

An arm is a pretraining recipe (a method preset plus overrides); ``random`` is random init,
whose units are fine-tuning seeds. Each arm that enters a verdict gets
``PROTOCOL["pretrain_runs"][arm]`` pretraining runs (seeds 0, 1, ...), each fine-tuned once.
Stages are ordered by claim as the issue asks: (a), (c), (d) first, then (b), (f), (g).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..standard import _NOMASK, _SMALL_AUG, _lr_scale
from .protocol import PROTOCOL, ema_m0


def _ema() -> tuple:
    s = PROTOCOL["settings"]["ema"]
    steps = PROTOCOL["pretrain"]["steps"]
    return (
        "method.ema_schedule=cosine",
        f"method.ema_momentum={ema_m0(steps, s['fraction_of_run']):.4f}",
    )


def _teacher() -> tuple:
    t = PROTOCOL["settings"]["maskdistill_teacher"]
    return (f"method.teacher={t['spec']}", f"method.teacher_size={t['teacher_size']}")


@dataclass(frozen=True)
class Arm:
    """``method`` preset, ``overrides`` (after the suite's), ``lr_scale`` x MAE's base lr,
    ``small``: pretrain on N images of the pool at the same step budget."""

    method: str
    overrides: tuple = ()
    lr_scale: float = 1.0
    label: str = ""
    small: int = 0


ARMS = {
    "mae": Arm("mae", label="MAE"),
    "cmae": Arm("cmae", _ema(), _lr_scale("cmae"), "C-MAE"),
    "mocov3": Arm("mocov3", ("optim.weight_decay=0.1",), label="MoCo v3"),
    "rmae": Arm("rmae", (), _lr_scale("rmae"), "R-MAE"),
    "rmae_indep": Arm("rmae_indep", (), _lr_scale("rmae_indep"), "R-MAE†"),
    "rmae_identity": Arm("rmae_identity", (), _lr_scale("rmae_identity"), "R-MAE‡"),
    "maskdistill": Arm("maskdistill", _teacher(), label="MaskDistill (EfficientNet-Lite0)"),
    "mae_nomask": Arm("mae", _NOMASK, label="MAE w/o masking (cutmix + jitter)"),
    "cmae_nomask_aug": Arm(
        "cmae", _NOMASK + _ema(), _lr_scale("cmae"), "C-MAE w/o masking (cutmix + jitter)"
    ),
    **{
        f"mae_n{n}": Arm("mae", _SMALL_AUG, label=f"MAE on {n} image{'s' * (n > 1)}", small=n)
        for n in (1, 10, 100, 1000)
    },
}

#: stage -> (arms, claims), in the order they run
STAGES = {
    "core": (("mae",), ("a",)),
    "contrastive": (("cmae", "mocov3"), ("c",)),
    "smalldata": (("mae_n1", "mae_n10", "mae_n100", "mae_n1000"), ("d",)),
    "rmae": (("rmae", "rmae_indep", "rmae_identity"), ("b",)),
    "augment": (("mae_nomask", "cmae_nomask_aug", "maskdistill"), ("f", "g")),
}

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
        "R-MAE ≈ MAE, R-MAE† ≈ R-MAE‡ ≈ R-MAE on FT",
        "82.7 / 82.8 / 82.7 vs 83.1 (Tab. 1)",
        [
            ("rmae", "mae", "ft", "~"),
            ("rmae_indep", "rmae", "ft", "~"),
            ("rmae_identity", "rmae", "ft", "~"),
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
    "k": (
        "MIM pretraining raises shape bias over supervised training (CIFAR-10 protocol of the "
        "cue-conflict stimuli, 210 images; fine-tuned models)",
        "MaskDistill paper (shape-bias analysis)",
        [(arm, "random", "shape_bias", ">") for arm in ("mae", "maskdistill", "cmae")],
    ),
}
