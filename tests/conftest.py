"""Shared fixtures. Tests use tiny models and a few hundred images; one torch thread keeps
them fast on a shared 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimlab.core.config import PretrainConfig, resolve

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = (REPO / ".." / "shared" / "data" / "cifar10").resolve()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG states, so a test that draws unseeded inputs
    (``torch.randn``) sees the same numbers whatever ran before it: a failure reproduces."""
    import random

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def make_imagefolder(
    root: Path,
    classes: int = 3,
    per_class: int = 8,
    size: int = 32,
    splits=("train", "test"),
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3), np.uint8)
                base[..., c % 3] = (120 + 40 * c) % 256  # class-dependent colour
                img = np.clip(base + rng.integers(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """The shared CIFAR-10 copy when present, else a small generated ImageFolder."""
    if (SHARED_CIFAR / "train").is_dir():
        return SHARED_CIFAR
    return make_imagefolder(tmp_path_factory.mktemp("fake_cifar"), classes=10, per_class=30)


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "data")


def micro_pretrain_cfg(data, out, name: str, *extra: str, log_every: int = 1):
    """The tests' small pretraining run: ``micro`` model, 96 images, 2 epochs of batch 16,
    no workers, no progress bar; ``extra`` overrides on top."""
    return resolve(
        PretrainConfig,
        overrides=[
            "model.preset=micro",
            f"data.path={data}",
            "data.limit=96",
            "optim.batch_size=16",
            "optim.epochs=2",
            "optim.warmup_epochs=0.5",
            f"run.log_every={log_every}",
            "run.progress=false",
            f"run.out_dir={out}",
            f"run.name={name}",
            "data.num_workers=0",
            *extra,
        ],
    )
