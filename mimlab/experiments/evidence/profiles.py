"""Profiles: the evidence engine at other scales (``mimlab reproduce --suite quick | full``).

A profile is a protocol dict derived from :data:`.protocol.PROTOCOL` (a deep copy with its
changes; ``PROTOCOL`` itself is never modified) and run by the same engine: the same arms,
stages, runner, verdicts and report. Only protocol v2 itself is governed by the committed
``docs/results/standard/protocol.json``; a profile writes its protocol into its own ``--out``
folder and refuses a folder started with other settings (:func:`.protocol.claim_folder`).

* ``smoke`` (``--suite quick``): the CI smoke test. ``micro`` ViT, 96 pool images, one
  pretraining epoch, 2 units per arm (Welch's t needs 2), 2 fine-tuning epochs, a dozen images
  for CKA and PSNR; every stage and arm of the engine. It exercises every code path and
  **decides nothing**.
* ``gpu`` (``--suite full``): ``tiny`` ViT on all 50,000 CIFAR-10 training images, 100
  pretraining and 100 fine-tuning epochs (the papers' fine-tuning budget), protocol v2's
  replication; meant for a GPU.
"""

from __future__ import annotations

import copy
from typing import Callable

from .protocol import PROTOCOL

#: the line every profile's report opens with
NOTES = {
    "smoke": "smoke profile: decides nothing. It runs every stage of the evidence engine at a "
    "toy scale to show that the code paths work; its verdicts are not evidence about the papers.",
    "gpu": "gpu profile: protocol v2's design at `tiny` on all 50,000 CIFAR-10 training images "
    "with the papers' fine-tuning budget; not governed by the committed protocol.json.",
}


def _derive(name: str, change: Callable[[dict], None]) -> dict:
    p = copy.deepcopy(PROTOCOL)
    p["profile"] = name
    p["note"] = NOTES[name]
    change(p)
    return p


def _budget(p: dict, model: str, images: int, epochs: int, batch: int, runs: int) -> None:
    """Model, pool, pretraining schedule (steps follow from them: the loader drops the last
    partial batch) and units per arm."""
    p["model"] = model
    p["pool"]["images"] = images
    p["pretrain"].update(epochs=epochs, batch=batch, steps=epochs * (images // batch))
    p["pretrain_runs"] = {arm: runs for arm in p["pretrain_runs"]}
    p["random_init_ft_seeds"] = runs


def _ft(p: dict, epochs: int, eval_at: list, why: str) -> None:
    p["ft_epochs"].update(value=epochs, decided_by=why)
    p["ft_eval_at_epochs"] = eval_at


def smoke() -> dict:
    """The CI smoke test's protocol (``mimlab reproduce --suite quick``)."""

    def change(p: dict) -> None:
        _budget(p, "micro", 96, 1, 8, runs=2)
        p["pool"]["dataset"] = "the --data folder's train split"
        p["test"] = {"dataset": "the --data folder's test split", "images": "all"}
        _ft(p, 2, [1], "smoke profile: fixed (decides nothing)")
        p["cka"].update(images=12, bootstrap_resamples=20)
        p["psnr"].update(images=8)
        p["workers"] = 0

    return _derive("smoke", change)


def gpu() -> dict:
    """``tiny`` on all of CIFAR-10 with long budgets (``mimlab reproduce --suite full``)."""

    def change(p: dict) -> None:
        _budget(p, "tiny", 50000, 100, 256, runs=3)
        _ft(p, 100, [10, 25, 50], "gpu profile: the papers' 100 fine-tuning epochs (not piloted)")
        p["ft_epochs"]["affordable_max"] = 100
        p["cka"].update(images=2000)
        p["workers"] = 8

    return _derive("gpu", change)


#: profile name -> a function returning its protocol dict (a fresh copy each call)
PROFILES: dict[str, Callable[[], dict]] = {"smoke": smoke, "gpu": gpu}
#: ``mimlab reproduce --suite`` name -> profile
SUITES = {"quick": "smoke", "full": "gpu"}
