"""The public API keeps working across the package-layout move: every name the README and the
docs showed before the move imports from its old path, and every old module path is the very
module at its new path (so classes compare equal and isinstance works across both)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from mimlab.core.moved import MOVED

#: (module, names) as the README, CONTRIBUTING and the docs showed them before the move
DOCUMENTED = [
    (
        "mimlab.config",
        [
            "PretrainConfig",
            "DataConfig",
            "resolve",
            "METHOD_PRESETS",
            "CHECKPOINTING",
            "checkpointing_mode",
        ],
    ),
    ("mimlab.methods", ["build_method"]),
    (
        "mimlab.tasks",
        ["Classifier", "pretrain", "finetune", "knn", "linprobe", "resolve_run_config"],
    ),
    ("mimlab.ops", ["block_masking", "random_masking"]),
    ("mimlab.models", ["build_encoder"]),
    ("mimlab.engine", ["make_loader", "Engine"]),
    (
        "mimlab.data",
        ["IMG_EXTS", "PHOTO_NAMES", "build_dataset", "default_data_path", "write_folder_shards"],
    ),
    ("mimlab.train", ["pretrain"]),
    ("mimlab.registry", ["PRESETS", "FAMILIES"]),
    ("mimlab.teachers", ["register_teacher", "build_teacher"]),
    ("mimlab.eval.knn", ["knn_classify"]),
    ("mimlab.eval.linear", ["choose_lr", "train_linear_heads"]),
    ("mimlab.eval.online", ["build_online_evaluator"]),
    ("mimlab.stats", ["paired_diff", "welch"]),
    ("mimlab.checkpoint", ["save"]),
    ("mimlab.flops", ["train_passes"]),
]


@pytest.mark.parametrize("module, names", DOCUMENTED, ids=[m for m, _ in DOCUMENTED])
def test_documented_names_import_from_their_old_paths(module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_are_the_new_modules(old):
    assert importlib.import_module(f"mimlab.{old}") is importlib.import_module(
        f"mimlab.{MOVED[old]}"
    )
    assert importlib.import_module(f"mimlab.{old}").__spec__.name == f"mimlab.{MOVED[old]}"


def test_unknown_paths_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("mimlab.no_such_module")


def test_data_batch_stays_free_of_torch():
    """``mimlab.data`` re-exports the dataset names lazily: importing the Batch contract (the
    torch-free core) does not import torch."""
    code = "import sys, mimlab.data.batch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
