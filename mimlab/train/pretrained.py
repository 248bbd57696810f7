"""Pretrained encoders for fine-tuning and probing: read a model source
(:mod:`mimlab.io.sources`), check it against the run's ``model.*``, copy its weights.

Adopting a source's architecture is part of resolving a config
(:func:`adopt_source_model`, called by :func:`mimlab.tasks.resolve_run_config`); the
evaluation protocols then use ``cfg.model`` as it is (:func:`load_pretrained`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch.nn as nn

from ..core.config import ModelConfig
from ..io import checkpoint as ckpt_format
from ..io.sources import SourceError, SourceModel, load_encoder
from ..nn.models import ViTEncoder
from .engine import TrainingError

ARCH_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads")
"""Model fields a pretrained source fixes: a run's ``model.*`` must agree with them."""
RUN_MODEL_FIELDS = ("drop_path",)
"""Model fields of the run, not of the source: kept when a source's model is adopted, and
setting them does not count as choosing the model."""


def model_config_of(ckpt: dict) -> ModelConfig:
    """The architecture of a mimlab checkpoint (any layout; :mod:`mimlab.io.checkpoint`)."""
    return ckpt_format.model_config(ckpt_format.upgrade(ckpt))


def encoder_state(ckpt: dict) -> dict:
    """Encoder weights of a mimlab checkpoint (pretrain or finetune), keys without prefix."""
    return ckpt_format.encoder_state(ckpt_format.upgrade(ckpt))


def load_encoder_weights(
    encoder: ViTEncoder, source: "str | SourceModel", trust: bool = False
) -> SourceModel:
    """Copy a pretrained encoder (any model source, or an already loaded
    :class:`~mimlab.io.sources.SourceModel`) into ``encoder``; architecture mismatches fail in
    one line listing the keys. ``encoder`` keeps its own random init order (so seeded runs
    are unchanged); its LayerNorm eps becomes the source's."""
    sm = source if isinstance(source, SourceModel) else load_encoder(source, trust=trust)
    sd = sm.encoder.state_dict()
    own = encoder.state_dict()
    sd = {k: v for k, v in sd.items() if not (k == "mask_token" and k not in own)}
    if "norm.weight" not in own:  # classifier encoders use fc_norm instead of the final norm
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    bad_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [
        k
        for k in own
        if k not in sd
        and k != "mask_token"
        and not (k.startswith("norm.") and sm.fc_norm is not None)
    ]
    unexpected = [k for k in sd if k not in own]
    if bad_shape or missing or unexpected:
        raise TrainingError(
            f"{sm.spec} does not fit this model: "
            + "; ".join(
                x
                for x in [
                    f"shape mismatches: {', '.join(bad_shape[:6])}" if bad_shape else "",
                    f"missing: {', '.join(missing[:6])}" if missing else "",
                    f"unexpected: {', '.join(unexpected[:6])}" if unexpected else "",
                ]
                if x
            )
            + " (set model.* to the pretraining model, e.g. model.preset=...)"
        )
    encoder.load_state_dict(sd, strict=False)
    for m in encoder.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = sm.eps
    return sm


def pretrained_source(cfg: Any) -> Optional[str]:
    """``finetune.pretrained`` / ``probe.pretrained`` / ``segment.pretrained`` of a config
    (None: random init)."""
    sec = (
        getattr(cfg, "finetune", None)
        or getattr(cfg, "probe", None)
        or getattr(cfg, "segment", None)
    )
    return sec.pretrained if sec is not None else None


def _read(cfg: Any, spec: str, img_size: Optional[int]) -> SourceModel:
    try:
        return load_encoder(spec, img_size=img_size, trust=cfg.run.trust_checkpoints)
    except (SourceError, ckpt_format.CheckpointError) as e:
        raise TrainingError(str(e)) from None


def _adopt_data_stats(cfg: Any, sm: SourceModel) -> None:
    """A foreign source brings its normalisation when ``data.mean/std`` are not set."""
    if sm.kind != "mimlab" and cfg.data.mean is None and sm.mean is not None:
        cfg.data.mean, cfg.data.std = list(sm.mean), list(sm.std)


def adopt_source_model(cfg: Any, user_model: bool) -> None:
    """Config resolution step: unless the user chose the model (``user_model``: some
    ``model.*`` key other than :data:`RUN_MODEL_FIELDS`), ``cfg.model`` becomes the pretrained
    source's architecture at its own resolution, keeping the run's ``drop_path``. A foreign
    source also brings its normalisation when ``data.mean/std`` are not set. No source: no-op."""
    spec = pretrained_source(cfg)
    if not spec:
        return
    sm = _read(cfg, spec, cfg.model.img_size if user_model else None)
    if not user_model:
        cfg.model = replace(sm.model_config, **{f: getattr(cfg.model, f) for f in RUN_MODEL_FIELDS})
    _adopt_data_stats(cfg, sm)


def load_pretrained(cfg: Any) -> Optional[SourceModel]:
    """The config's pretrained source at ``model.img_size`` (position embeddings follow it), or
    None without one. Its architecture must be ``cfg.model``'s (:data:`ARCH_FIELDS`), else one
    line says how to adopt it; a foreign source sets ``data.mean/std`` when they are unset."""
    spec = pretrained_source(cfg)
    if not spec:
        return None
    sm = _read(cfg, spec, cfg.model.img_size)
    diff = [
        (f, getattr(sm.model_config, f), getattr(cfg.model, f))
        for f in ARCH_FIELDS
        if getattr(sm.model_config, f) != getattr(cfg.model, f)
    ]
    if diff:
        raise TrainingError(
            f"{spec} has {', '.join(f'{f}={a}' for f, a, _ in diff)} but model.* has "
            f"{', '.join(f'{f}={b}' for f, _, b in diff)}: leave model.* unset to use the "
            "source's model (in Python: resolve the config with "
            "mimlab.tasks.resolve_run_config), or set it to the source's"
        )
    _adopt_data_stats(cfg, sm)
    return sm
