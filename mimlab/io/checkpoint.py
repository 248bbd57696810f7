"""The mimlab checkpoint format: an explicit, versioned schema, atomic writes and safe reads.

A checkpoint is a plain ``dict`` that ``torch.load(weights_only=True)`` can read:

==================  ==========================================================================
``format_version``  :data:`FORMAT_VERSION` (2). Files without it are the pre-schema layout
                    (version 1), read by :func:`upgrade` with a one-line note.
``kind``            ``'pretrain'`` | ``'finetune'`` (fine-tuning and supervised training)
``method``          the pretraining method name (``'mae'``, ``'cmae'``, ...); for ``finetune``
                    the source it started from, or ``None`` (supervised from scratch)
``model_config``    the :class:`~mimlab.core.config.ModelConfig` as a dict (the architecture)
``data_stats``      ``{'mean': [C], 'std': [C], 'img_size': int, 'in_chans': int}``: how the
                    inputs were normalised; ``None`` only in upgraded pre-schema files
``encoder``         the encoder's state dict, keys without prefix (timm ViT names). It shares
                    storage with ``model`` (``torch.save`` writes each tensor once)
``model``           the whole method's state dict (encoder, decoder / head / projector / EMA
                    target ...), what an exact resume reloads
``optimizer``,      the engine's other states, unchanged from the pre-schema layout: optimizer,
``scaler``,         grad scaler, RNG states and the position in training (``global_step``,
``rng``, ...        ``epoch``, ``micro_in_epoch``, ``samples_in_epoch``, ``world_size``,
                    ``nonfinite_skipped``, ``skipped_files``); ``rng_ranks``: every rank's
                    RNG states under torchrun (``rng`` is rank 0's), so a resume is exact
``config``          the full resolved run config (``to_dict``)
``provenance``      ``{'mimlab': version, 'git': commit or 'unknown', 'torch': version,
                    'time': ISO-8601 UTC}``
==================  ==========================================================================

Readers never guess from keys: they call :func:`load` (which upgrades old files) and then the
accessors :func:`model_config`, :func:`data_stats`, :func:`encoder_state`, :func:`head_state`.
Every consumer that needs an *encoder* goes through :func:`mimlab.io.sources.load_encoder`, which
accepts this format and the foreign ones (``mae:``, ``timm:``, ``hf:``, ``mocov3:``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import __version__
from ..core.config import ModelConfig, from_dict

log = logging.getLogger("mimlab.checkpoint")

FORMAT_VERSION = 2
KINDS = ("pretrain", "finetune")
#: keys of the classifier head of a fine-tuned / supervised checkpoint (``model`` state)
HEAD_KEYS = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")
_NOTED: set[str] = set()


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which file and why."""


def git_commit() -> str:
    """Short commit of the source tree mimlab runs from, or ``'unknown'`` (installed package)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - best effort: no git, not a repository, ...
        return "unknown"


def provenance() -> dict:
    """``{'mimlab', 'git', 'torch', 'time'}`` of the process writing a checkpoint."""
    return {
        "mimlab": __version__,
        "git": git_commit(),
        "torch": str(torch.__version__),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _encoder_view(model_state: dict) -> dict:
    return {k[len("encoder.") :]: v for k, v in model_state.items() if k.startswith("encoder.")}


def make(
    kind: str,
    config: dict,
    model_state: dict,
    *,
    method: Optional[str] = None,
    data_mean: Optional[Sequence[float]] = None,
    data_std: Optional[Sequence[float]] = None,
    prov: Optional[dict] = None,
    **states: Any,
) -> dict:
    """A schema checkpoint dict (see the module docstring).

    ``config``: the resolved run config as a dict (needs ``config['model']``);
    ``model_state``: the method's ``state_dict()`` (its encoder under ``encoder.``);
    ``states``: the engine's other entries (optimizer, scaler, rng, global_step, ...)."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {' | '.join(KINDS)}, got '{kind}'")
    if "model" not in config:
        raise ValueError("checkpoint config has no 'model' section")
    mc = dict(config["model"])
    stats = None
    if data_mean is not None and data_std is not None:
        stats = {
            "mean": [float(v) for v in data_mean],
            "std": [float(v) for v in data_std],
            "img_size": int(mc["img_size"]),
            "in_chans": int(mc["in_chans"]),
        }
    out = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "method": method,
        "model_config": mc,
        "data_stats": stats,
        "encoder": _encoder_view(model_state),
        "model": model_state,
        "config": config,
        "provenance": prov or provenance(),
    }
    out.update(states)
    return out


def kind_of_config(config: dict) -> str:
    """'finetune' for a fine-tuning / supervised run config, else 'pretrain'."""
    return "finetune" if "finetune" in config else "pretrain"


def save(ck: dict, path: str | Path) -> Path:
    """Write ``ck`` atomically: ``path.tmp``, fsync, then ``os.replace`` -- a crash or a full
    disk never leaves a partial file at ``path`` (the previous checkpoint stays intact)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(ck, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CheckpointError(
            f"could not write checkpoint {path}: {e.strerror or e} "
            "(disk full or not writable?); the previous checkpoint is "
            "intact"
        ) from None
    return path


def read(path: str | Path, trust: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` (unless ``trust``) on the CPU, one-line errors.
    A sharded checkpoint directory (``<name>.dcp``, ``run.parallel=fsdp``) is read as one
    ordinary checkpoint (:func:`read_sharded`)."""
    p = Path(path)
    if p.is_dir() and (p / "meta.pt").is_file():
        return read_sharded(p)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"could not load checkpoint {p}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # a corrupt file's odd header is reported below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 - unpickling errors of every kind
        text = str(e)
        if "Weights only load failed" in text:  # torch's advice (weights_only=False) is unsafe
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            why = next((ln for ln in lines if ln.startswith("Unsupported")), "")
            why = why or next((ln for ln in lines[1:] if "error" not in ln.lower()), "")
            raise CheckpointError(
                f"could not load checkpoint {p}: safe loading (weights_only) refused it"
                f"{f' ({why})' if why else ''}: the file is corrupt or not a torch checkpoint, "
                "or it holds pickled code; set run.trust_checkpoints=true only for a file from a "
                "source you trust"
            ) from None
        detail = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        why = detail if trust else f"the file is corrupt or not a torch checkpoint ({detail})"
        raise CheckpointError(f"could not load checkpoint {p}: {why}") from None


def read_sharded(path: str | Path) -> dict:
    """A ``torch.distributed.checkpoint`` directory written by ``run.parallel=fsdp``
    (:mod:`mimlab.train.fsdp`) as one checkpoint dict in the schema: the full ``model`` and
    ``encoder`` states gathered from every rank's shards (one process, no process group),
    ``meta.pt``'s fields, rank 0's RNG states, and the optimizer state keyed by parameter name
    under ``optimizer`` (as ``torch.distributed.checkpoint.state_dict`` writes it)."""
    from torch.distributed.checkpoint.format_utils import (  # lazy: sharded checkpoints only
        dcp_to_torch_save,
    )

    p = Path(path)
    try:
        meta = torch.load(p / "meta.pt", map_location="cpu", weights_only=True)
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(p), Path(tmp) / "full.pt")
            full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
        rng = p / "rng-rank0.pt"
        if rng.is_file():
            meta["rng"] = torch.load(rng, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable shards of every kind
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"could not read sharded checkpoint {p}: {type(e).__name__}: {first}"
        ) from None
    meta["model"] = full["model"]
    meta["encoder"] = _encoder_view(full["model"])
    meta["optimizer"] = full.get("optim")
    return meta


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write the sharded checkpoint directory ``path`` as one checkpoint file ``out``."""
    return save(read_sharded(path), out)


def load(path: str | Path, trust: bool = False) -> dict:
    """Read a mimlab checkpoint and return it in the current schema (:func:`upgrade`)."""
    return upgrade(read(path, trust), str(path))


def upgrade(ck: Any, origin: str = "checkpoint") -> dict:
    """A checkpoint dict in the current schema; pre-schema files (version 1: ``model``,
    ``config``, engine states, ``version``) get the schema fields, with one note per file.

    Data statistics were not stored before version 2: they come from the run config's explicit
    ``data.mean/std`` when set, else stay ``None`` (readers then use the analysed data set's)."""
    if not isinstance(ck, dict):
        raise CheckpointError(
            f"{origin}: not a mimlab checkpoint (a {type(ck).__name__}, not a dict)"
        )
    version = ck.get("format_version")
    if version is not None:
        if int(version) > FORMAT_VERSION:
            raise CheckpointError(
                f"{origin}: checkpoint format {version} was written by a "
                f"newer mimlab (this one reads up to {FORMAT_VERSION})"
            )
        return ck
    cfg = ck.get("config")
    if not isinstance(cfg, dict) or "model" not in cfg or not isinstance(ck.get("model"), dict):
        keys = ", ".join(list(ck)[:6])
        raise CheckpointError(
            f"{origin}: not a mimlab checkpoint (no format_version, config or "
            f"model; keys: {keys}); foreign weights load through a source "
            "prefix: mae:, timm:NAME@, hf:, mocov3:"
        )
    kind = kind_of_config(cfg)
    data = cfg.get("data") or {}
    chans = int(cfg["model"].get("in_chans", 3))
    stats = None
    if data.get("mean") is not None and data.get("std") is not None and len(data["mean"]) == chans:
        stats = {
            "mean": list(data["mean"]),
            "std": list(data["std"]),
            "img_size": int(cfg["model"]["img_size"]),
            "in_chans": chans,
        }
    method = (
        (cfg.get("method") or {}).get("name")
        if kind == "pretrain"
        else (cfg.get("finetune") or {}).get("pretrained")
    )
    prov = dict(ck.get("version") or {})
    prov.setdefault("time", None)
    out = dict(ck)
    out.update(
        format_version=FORMAT_VERSION,
        kind=kind,
        method=method,
        model_config=dict(cfg["model"]),
        data_stats=stats,
        encoder=_encoder_view(ck["model"]),
        provenance=prov,
    )
    if origin not in _NOTED:
        _NOTED.add(origin)
        log.warning(
            "note: %s uses the pre-schema checkpoint layout (format 1); read as format %d (%s)",
            origin,
            FORMAT_VERSION,
            "data statistics from its config"
            if stats
            else "no data statistics recorded: the data set's are used",
        )
    return out


# ------------------------------------------------------------------------- accessors
def model_config(ck: dict) -> ModelConfig:
    """The architecture of a (schema) checkpoint as a :class:`ModelConfig`."""
    return from_dict(ModelConfig, ck["model_config"])


def data_stats(ck: dict) -> Optional[tuple[list[float], list[float]]]:
    """``(mean, std)`` the checkpoint's inputs were normalised with, or ``None`` (unknown)."""
    s = ck.get("data_stats")
    return (list(s["mean"]), list(s["std"])) if s else None


def encoder_state(ck: dict) -> dict:
    """Encoder weights (keys without the ``encoder.`` prefix); one-line error if there are none."""
    enc = ck.get("encoder") or {}
    if not enc:
        raise CheckpointError("checkpoint holds no encoder weights (no 'encoder.*' keys)")
    return enc


def is_classifier(ck: dict) -> bool:
    """True for fine-tuned / supervised checkpoints (fc_norm + linear head on avg pooling)."""
    return "fc_norm.weight" in ck["model"] and "head.weight" in ck["model"]


def head_state(ck: dict) -> dict:
    """``fc_norm.*`` and ``head.*`` of a classifier checkpoint ({} for pretraining)."""
    return {k: ck["model"][k] for k in HEAD_KEYS if k in ck["model"]} if is_classifier(ck) else {}


def decoder_state(ck: dict) -> dict:
    """The MAE pixel decoder of a pretraining checkpoint (keys under ``head.``), or {}.
    Only meaningful for reconstructive methods; :mod:`mimlab.analysis.recon` checks that."""
    if ck.get("kind") != "pretrain":
        return {}
    return {k[len("head.") :]: v for k, v in ck["model"].items() if k.startswith("head.")}
