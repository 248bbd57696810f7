"""The checkpoint schema (mimlab.io.checkpoint): fields, atomic save, weights-only load, and the
pre-schema files written by the code before it (committed fixtures)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch

from mimlab import tasks
from mimlab.core.config import PretrainConfig, resolve
from mimlab.io import checkpoint as ckf
from mimlab.io.sources import load_encoder

FIX = Path(__file__).parent / "fixtures"
LEGACY_PRE = FIX / "legacy_mae_micro_pretrain.pt"  # written by commit a33b153 (pre-schema)
LEGACY_FT = FIX / "legacy_micro_finetune.pt"  # fine-tuned from LEGACY_PRE, same code
EXPECTED = FIX / "legacy_expected.pt"  # outputs computed by that same code


def test_fixtures_are_small():
    for p in (LEGACY_PRE, LEGACY_FT, EXPECTED):
        assert p.stat().st_size < 400_000


def test_legacy_checkpoints_load_with_one_note(caplog):
    ckf._NOTED.clear()
    raw = torch.load(LEGACY_PRE, weights_only=True)
    assert "format_version" not in raw  # really the old layout
    with caplog.at_level(logging.WARNING, logger="mimlab.checkpoint"):
        ck = ckf.load(LEGACY_PRE)
        ckf.load(LEGACY_PRE)  # noted once per file
    notes = [r.message for r in caplog.records if r.name == "mimlab.checkpoint"]
    assert len(notes) == 1 and "pre-schema checkpoint layout" in notes[0]
    assert (ck["format_version"], ck["kind"], ck["method"]) == (
        ckf.FORMAT_VERSION,
        "pretrain",
        "mae",
    )
    assert ckf.model_config(ck).embed_dim == 16 and ckf.data_stats(ck) is None
    ft = ckf.load(LEGACY_FT)
    assert ft["kind"] == "finetune" and ckf.is_classifier(ft)
    assert set(ckf.head_state(ft)) == set(ckf.HEAD_KEYS)


def test_legacy_checkpoints_give_the_old_outputs():
    """Encoder tokens and fine-tuned logits equal what the old code computed: bitwise on the
    machine that wrote the file, to float32 rounding on another CPU (whose kernels may sum in
    another order); a loading fault (a missing or misplaced weight) moves them by far more."""
    ex = torch.load(EXPECTED, weights_only=True)
    m = load_encoder(str(LEGACY_PRE))
    ft = load_encoder(f"mimlab:{LEGACY_FT}")
    with torch.no_grad():
        tokens, logits = m.encoder.forward_features(ex["input"]), ft.logits(ex["input"])
    torch.testing.assert_close(tokens, ex["pretrain_tokens"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ex["finetune_logits"], rtol=1e-5, atol=1e-5)
    assert m.decoder is not None and m.norm_pix is True and ft.decoder is None


def test_new_checkpoint_schema(tiny_folder, tmp_path):
    cfg = resolve(
        PretrainConfig,
        overrides=[
            f"data.path={tiny_folder}",
            "model.preset=micro",
            "optim.epochs=1",
            "optim.batch_size=8",
            "data.num_workers=0",
            f"run.out_dir={tmp_path}",
            "run.name=p",
            "run.progress=false",
            "data.mean=[0.5,0.4,0.3]",
            "data.std=[0.2,0.2,0.2]",
        ],
    )
    res = tasks.pretrain(cfg)
    raw = torch.load(res["checkpoint"], weights_only=True)  # weights_only readable
    assert raw["format_version"] == ckf.FORMAT_VERSION and raw["kind"] == "pretrain"
    assert raw["method"] == "mae" and raw["model_config"]["embed_dim"] == 32
    assert raw["data_stats"] == {
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.2, 0.2],
        "img_size": 32,
        "in_chans": 3,
    }
    assert set(raw["provenance"]) == {"mimlab", "git", "torch", "time"}
    assert raw["encoder"]["cls_token"].equal(raw["model"]["encoder.cls_token"])
    for k in ("optimizer", "scaler", "rng", "global_step", "epoch", "micro_in_epoch"):
        assert k in raw
    m = load_encoder(res["checkpoint"])
    assert (m.mean, m.std) == ([0.5, 0.4, 0.3], [0.2, 0.2, 0.2])


def test_save_is_atomic_and_load_refuses_foreign_or_newer(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    ckf.save({"format_version": 2, "x": torch.ones(1)}, p)

    def boom(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(ckf.CheckpointError, match="previous checkpoint is intact"):
        ckf.save({"format_version": 2, "x": torch.zeros(1)}, p)
    monkeypatch.undo()
    assert ckf.load(p)["x"].item() == 1.0 and not (tmp_path / "c.pt.tmp").exists()
    ckf.save({"format_version": 99}, p)
    with pytest.raises(ckf.CheckpointError, match="newer mimlab"):
        ckf.load(p)
    torch.save({"state_dict": {"a": torch.ones(1)}}, p)
    with pytest.raises(ckf.CheckpointError, match="not a mimlab checkpoint.*mae:"):
        ckf.load(p)


def test_any_garbage_file_gives_the_same_one_line_reason(tmp_path):
    """Random bytes fail inside torch.load in several ways (pickle's refusal, a bad magic number,
    a UnicodeDecodeError, an IndexError ...); every one reads as the same one-line reason, and
    only a safe-load refusal mentions the trust setting. 200 seeded files cover the rare paths
    (about 1 in 10 files leaves the pickle refusal)."""
    import random

    rng = random.Random(0)
    kinds = set()
    for i in range(200):
        p = tmp_path / f"g{i}.pt"
        p.write_bytes(rng.randbytes(300))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with pytest.raises(ckf.CheckpointError) as info:
                ckf.read(p)
        assert not seen, [str(w.message) for w in seen]  # the one line, no warning besides
        msg = str(info.value)
        assert "\n" not in msg and "the file is corrupt or not a torch checkpoint" in msg, msg
        kinds.add("safe loading" in msg)
    assert kinds == {True, False}  # both paths were exercised
