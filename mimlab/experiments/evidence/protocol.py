"""Protocol v2 as data: what ``docs/results/standard/protocol.json`` holds.

The JSON file is written from :data:`PROTOCOL` (``mimlab reproduce --suite evidence
--write-protocol``) and committed before the runs it governs; every stage reads the committed
file back and refuses to run when the code's protocol differs from it, so results made under
one protocol are never mixed with results of another (:func:`check_committed`).
"""

from __future__ import annotations

import json
from pathlib import Path

PROTOCOL_VERSION = 2

#: the starting EMA time constant as a fraction of the run: C-MAE's 0.996 (250 steps) over an
#: ImageNet run of about 125k steps
EMA_FRACTION = 0.002


def ema_m0(steps: int, fraction: float = EMA_FRACTION) -> float:
    """Starting momentum of a cosine EMA schedule whose time constant ``1 / (1 - m0)`` is
    ``fraction`` of a run of ``steps`` steps (at least one step: ``m0 >= 0``)."""
    return max(0.0, 1.0 - 1.0 / (fraction * steps))


#: the v2 protocol; fields marked "pilot" are fixed by a pilot's rule, not by its numbers
PROTOCOL: dict = {
    "version": PROTOCOL_VERSION,
    "model": "mini",
    "pool": {"dataset": "CIFAR-10 train", "images": 10000, "subset_seed": 0},
    "test": {"dataset": "CIFAR-10 test", "images": 10000},
    "pretrain": {"epochs": 8, "batch": 128, "steps": 624},
    "pretrain_runs": {
        "mae": 3,
        "rmae": 3,
        "rmae_indep": 3,
        "rmae_identity": 3,
        "cmae": 3,
        "mocov3": 3,
        "maskdistill": 3,
        "mae_nomask": 3,
        "cmae_nomask_aug": 3,
        "mae_n1": 3,
        "mae_n10": 3,
        "mae_n100": 3,
        "mae_n1000": 3,
        "cmae_cls": 3,
        "cmae_avg": 3,
        "cmae_nomask": 3,
        "mae_n1000_oneclass": 3,
        "mae_n1000_perclass": 3,
        "rmae_n1000": 3,
        "cmae_n1000": 3,
        "mocov3_n1000": 3,
        "supervised_n1000": 3,
    },
    "random_init_ft_seeds": 3,
    "ft_seeds_per_pretraining_run": 1,
    "ft_epochs": {
        "rule": "pilot P1: the smallest B in {10, 20} with held-out top-1 of random init at B "
        "within 1.2 points of its top-1 at 3B (the papers' 80.9 at 100 vs 82.1 at 300 epochs); "
        "if 20 fails, B = 20, the longest affordable, with the gap reported",
        "value": 20,
        "decided_by": "pilot P1 (docs/results/standard/v2/ftbudget/summary.json): held-out "
        "top-1 of random init 48.73 at 20 epochs, 57.22 at 60: a gap of 8.5 points, so 20 "
        "fails the rule and the longest affordable budget is taken; random init is not at its "
        "plateau at this budget",
        "candidates": [10, 20],
        "affordable_max": 20,
        "tolerance_points": 1.2,
    },
    "ft_eval_at_epochs": [2, 5, 10, 20],
    "ft_recipe": {
        "optimizer": "AdamW, betas (0.9, 0.999), weight decay 0.05, cosine to 1e-6",
        "base_lr_per_256": 1e-3,
        "warmup": "5 % of the schedule, at least 1 epoch",
        "drop_path": 0.1,
        "label_smoothing": 0.1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "layer_decay": {"pretrained": 0.75, "random": 1.0},
        "chosen_on": "not tuned in v2: fixed before the runs, MAE's fine-tuning recipe above for "
        "every pretrained init and the same with layer decay 1.0 for random init (one recipe "
        "each, declared; nothing is chosen on test)",
    },
    "label_fraction_ft": 0.1,
    "test_statistic": {
        "name": "welch",
        "unit": "pretraining run (random init: fine-tuning seed); no unit of one arm is "
        "paired with several units of another",
        "interval": "two-sided 95 % Welch t interval on per-unit mean top-1 "
        "(Welch-Satterthwaite degrees of freedom)",
        "coverage_checked_by": "tests/test_stats_v2.py (simulated runs, known difference)",
    },
    "margin": {
        "approx": "relative: +-20 % of MAE's gain over random init (point estimate) in the same "
        "protocol and budget",
        "approx_fraction": 0.2,
        "effect_size_claims": "PSNR and CKA (sub-test kind 'effect'): reproduced when the "
        "interval is above 0 and reaches the smallest effect that matters, not reproduced when "
        "it lies below it. PSNR: 25 % of the paper's +1.5 dB (R-MAE 23.7 vs MAE 22.2, Tab. 1); "
        "CKA: 0.02 (Fig. 1 gives no numbers)",
        "effect_fraction": 0.25,
    },
    "multiplicity": {
        "within_claim": "holm",
        "alpha": 0.05,
        "reproduced": "every sub-test supports the claim at level alpha (intersection-union: "
        "no correction needed for 'all')",
        "not_reproduced": "at least one sub-test contradicts it after Holm's correction over "
        "the claim's sub-tests",
    },
    "settings": {
        "ema": {
            "rule": "cosine schedule m0 -> 1 (MoCo v3 / BYOL); the starting time constant "
            "1 / (1 - m0) is the same fraction of the run as C-MAE's on ImageNet (0.996 over "
            "about 125k steps: 250 steps = 0.2 %)",
            "fraction_of_run": EMA_FRACTION,
            "m0_at_624_steps": round(ema_m0(624), 4),
            "applies_to": ["cmae", "cmae_nomask_aug", "data2vec"],
        },
        "maskdistill_teacher": {
            "spec": "effnet_lite0:head_preact",
            "teacher_size": 256,
            "why": "stride 32 at 256 px gives the student's 8x8 grid; features before the "
            "ReLU6 (after it 61-90 % of the values are exact zeros)",
            "teacher": "EfficientNet-Lite0 (ImageNet-1k), not CLIP",
        },
        "mocov3": {
            "crop": "one (its own view crops; the loader's crop and flip are off)",
            "weight_decay": 0.1,
        },
        "pretrain_lr": "MAE's base lr 1.5e-3 per 256 x the paper's lr ratio to MAE; for each "
        "arm of another method (not the small-data arms), checked after its stage's verdict "
        "runs: one extra run at x0.5 and one at x2, each scored with run 0 by k-NN on the "
        "held-out 20 %; reported, the protocol's lr is not changed by it",
        "small_data": "early stop per N chosen on held-out data (k-NN on the held-out 20 % at "
        "checkpoints 1/8, 1/4, 1/2, 1 of the step budget, the earliest best); claim (d) "
        "fine-tunes the early-stopped checkpoint, and the full-budget fine-tune is reported "
        "beside it. Pretraining run i of a small-data arm draws its N images with subset seed i "
        "(which images is part of the run-to-run variance)",
    },
    "cka": {
        "claim": "e",
        "measure": "linear CKA between the last block's features (mean over the visible "
        "tokens, class token left out, before the final norm) of the image with 75 % of its "
        "patches dropped and of the full image at the same positions; seeded test images and "
        "masks, the same for every model (mimlab.analysis.cka_interval)",
        "ratio": 0.75,
        "images": 512,
        "image_seed": 0,
        "bootstrap_resamples": 1000,
        "units": "every pretraining run's encoder; supervised = every random-init fine-tune; "
        "random weights (one per random-init FT seed) reported without a sub-test",
        "min_effect": 0.02,
    },
    "psnr": {
        "claim": "b",
        "images": 2000,
        "seed": 0,
        "reading": "psnr_visible_stats",
        "why": "masked patches de-normalised with the visible patches' statistics (no leak of "
        "the hidden patches' own statistics); the other reading is reported beside it",
        "paper_effect_db": 1.5,
    },
    "small_data_benchmark": {
        "claims": ["i", "j"],
        "images": 1000,
        "sampling": "Tab. 7: random | one_class (all from one class) | one_per_class (class "
        "round-robin: 100 per CIFAR-10 class); Tab. 8 uses one_per_class",
        "supervised": "random init fine-tuned with the protocol's random-init recipe on the "
        "1,000 labelled images for the pretraining step budget; its last checkpoint is the "
        "init (no early stop)",
        "early_stop": "every other arm as small_data says",
    },
    "shape_bias": {
        "claim": "k",
        "protocol": "CIFAR-10 protocol of the cue-conflict stimuli (the 7 shared categories, "
        "210 images), scored right after every full-label fine-tune",
        "stimuli_beside_data": "cue-conflict",
        "unit": "the fine-tuned pretraining run (random init = supervised: its FT seeds)",
    },
    "words": ["reproduced", "not reproduced", "undecided"],
    "pilots": {
        "P1_ftbudget": "random init FT for 20 and 60 epochs (and 10 and 30 when 20 passes the "
        "rule), seed 0, trained on 80 % of the pool and scored on the held-out 20 %; chooses "
        "ft_epochs by the rule above. MAE (one 8-epoch run) for 20 and 60 epochs, the same "
        "way, runs after the core stage and shows how far MAE is from its own plateau. Its "
        "numbers enter no verdict",
    },
}


def protocol_path(results: Path) -> Path:
    return Path(results) / "protocol.json"


def _plain(protocol: dict) -> dict:
    return json.loads(json.dumps(protocol))


def write_protocol(results: Path, protocol: dict = PROTOCOL) -> Path:
    """Write ``protocol`` (default :data:`PROTOCOL`) as ``<results>/protocol.json``."""
    path = protocol_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(protocol, indent=1) + "\n")
    return path


class ProtocolMismatch(Exception):
    """The committed protocol.json differs from the code's protocol."""


def check_committed(results: Path, protocol: dict = PROTOCOL) -> dict:
    """The committed protocol, which must equal ``protocol`` (default :data:`PROTOCOL`)."""
    path = protocol_path(results)
    if not path.is_file():
        raise ProtocolMismatch(f"{path} is missing: write and commit the protocol before its runs")
    committed = json.loads(path.read_text())
    if committed != _plain(protocol):
        raise ProtocolMismatch(
            f"{path} differs from mimlab/experiments/evidence/protocol.py: a protocol change "
            "needs a new version and reruns of what it governs"
        )
    return committed


def claim_folder(results: Path, protocol: dict) -> dict:
    """A profile's output folder (not the committed v2 results): the first run writes the
    profile's protocol into it, a later run must find the same one (a folder started with other
    settings is refused, naming the fields that differ)."""
    path = protocol_path(results)
    if not path.is_file():
        write_protocol(results, protocol)
    found = json.loads(path.read_text())
    if found != _plain(protocol):
        keys = sorted(k for k in {*found, *protocol} if found.get(k) != _plain(protocol).get(k))
        raise ProtocolMismatch(
            f"{results} was started with other settings (different: {', '.join(keys)}); "
            "use another --out"
        )
    return found
