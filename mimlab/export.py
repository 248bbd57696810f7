"""Export a mimlab encoder to timm.

``to_timm(checkpoint)`` returns ``timm.create_model('vit_base_patch16_224', pretrained=False,
**timm_kwargs(model_cfg))`` loaded with the encoder weights: our parameter names are timm's.
A pretrained (MAE, ...) encoder becomes a ViT with ``global_pool='token'`` whose
``forward_features`` equals ours; a fine-tuned classifier becomes a ViT with
``global_pool='avg'`` whose ``fc_norm`` and ``head`` are ours (same logits). Only the
classification head is missing for a pretrained encoder (``num_classes`` given).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig, from_dict
from .engine import atomic_save, load_checkpoint


def timm_kwargs(m: ModelConfig, num_classes: int = 0, global_pool: str = "token") -> dict:
    return dict(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans,
                embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                mlp_ratio=m.mlp_ratio, qkv_bias=True, num_classes=num_classes,
                global_pool=global_pool, class_token=True)


def timm_state_dict(ckpt: dict) -> tuple[dict, str, int]:
    """(state dict in timm's names, global_pool, num_classes) from a mimlab checkpoint."""
    sd = ckpt["model"]
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    enc.pop("mask_token", None)
    if "head.weight" in sd and "fc_norm.weight" in sd:  # fine-tuned classifier
        enc = {k: v for k, v in enc.items() if not k.startswith("norm.")}  # (older files)
        for k in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"):
            enc[k] = sd[k]
        return enc, "avg", int(sd["head.weight"].shape[0])
    return enc, "token", 0


def to_timm(checkpoint: str | Path, num_classes: Optional[int] = None):
    """Build the matching timm ViT and load the encoder; returns the model (eval mode)."""
    import timm
    ck = load_checkpoint(checkpoint)
    m = from_dict(ModelConfig, ck["config"]["model"])
    sd, pool, nc = timm_state_dict(ck)
    want_nc = nc if num_classes is None else num_classes
    model = timm.create_model("vit_base_patch16_224", pretrained=False,
                              **timm_kwargs(m, want_nc, pool))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {"head.weight", "head.bias"} if want_nc and not nc else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"timm export mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> dict:
    """Write ``{'state_dict', 'timm_model', 'timm_kwargs'}`` to ``output``."""
    ck = load_checkpoint(checkpoint)
    m = from_dict(ModelConfig, ck["config"]["model"])
    sd, pool, nc = timm_state_dict(ck)
    kw = timm_kwargs(m, nc, pool)
    atomic_save({"state_dict": sd, "timm_model": "vit_base_patch16_224", "timm_kwargs": kw},
                Path(output))
    return {"output": str(output), "timm_model": "vit_base_patch16_224", "timm_kwargs": kw,
            "usage": "m = timm.create_model(d['timm_model'], pretrained=False, **d['timm_kwargs']);"
                     " m.load_state_dict(d['state_dict'])"}
