"""Commands as Python functions: pretrain, finetune, linprobe, knn, segment (the CLI calls
these).

Each takes a resolved config, creates its run directory (resolved ``config.yaml``, ``log.txt``,
metrics, checkpoints, ``results.json``) and returns a dict of results. Resolve configs with
:func:`resolve_run_config`: for ``finetune.pretrained`` / ``probe.pretrained`` it adopts the
source's model unless a ``model.*`` field other than ``model.drop_path`` is set.

Layering: nn parts (:mod:`.models`, :mod:`.sources`) -> methods -> training / evaluation
(:mod:`.train`, :mod:`.eval.finetune`, :mod:`.eval.features`, on :mod:`.engine`,
:mod:`.rundir` and :mod:`.pretrained`) -> this module -> :mod:`.cli`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .core.config import load_yaml, parse_overrides, resolve
from .eval.features import extract_features, frozen_features, knn, linprobe
from .eval.finetune import Classifier, finetune, predict_correct
from .eval.segment import segment
from .train.pretrained import (
    RUN_MODEL_FIELDS,
    adopt_source_model,
    encoder_state,
    load_encoder_weights,
    model_config_of,
)
from .train.pretraining import pretrain
from .train.rundir import make_run_dir, setup_logging


def _sets_model(data: Optional[dict]) -> bool:
    """Whether a config mapping chooses the model: some ``model.*`` key other than the
    run-specific ones (:data:`~mimlab.train.pretrained.RUN_MODEL_FIELDS`: ``drop_path``)."""
    model = (data or {}).get("model")
    return isinstance(model, dict) and any(k not in RUN_MODEL_FIELDS for k in model)


def resolve_run_config(
    cls: type,
    yaml_path: "Optional[str | Path]" = None,
    overrides: Optional[list[str]] = None,
    base: Optional[dict] = None,
) -> Any:
    """:func:`mimlab.core.config.resolve`, then, for a pretrained source (``finetune.pretrained`` /
    ``probe.pretrained``), the source's model: ``cfg.model`` becomes its architecture at its
    own resolution (keeping ``model.drop_path``) unless ``base``, the YAML file or the
    overrides set a ``model.*`` key (then the source must fit that model); a foreign source
    also brings its normalisation when ``data.mean/std`` are unset."""
    cfg = resolve(cls, yaml_path, overrides, base)
    explicit = (
        _sets_model(base)
        or _sets_model(parse_overrides(list(overrides or [])))
        or bool(yaml_path and _sets_model(load_yaml(yaml_path)))
    )
    adopt_source_model(cfg, user_model=explicit)
    return cfg


__all__ = [
    "Classifier",
    "encoder_state",
    "extract_features",
    "finetune",
    "frozen_features",
    "knn",
    "linprobe",
    "load_encoder_weights",
    "make_run_dir",
    "model_config_of",
    "predict_correct",
    "pretrain",
    "resolve",
    "resolve_run_config",
    "segment",
    "setup_logging",
]
