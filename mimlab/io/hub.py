"""Export to the Hub formats the other libraries load: timm's (``save_for_hf``: safetensors +
``config.json``) and transformers' (``save_pretrained``).

* :func:`to_timm` / :func:`save_timm`: any encoder (any model source) as a timm
  ``VisionTransformer`` -- class token, the source's pooling (``token``, or ``avg`` with
  ``fc_norm`` for fine-tuned checkpoints), and the classifier head when there is one. The
  directory loads with ``timm.create_model('local-dir:DIR', pretrained=True)`` (or from the
  Hub after upload) and gives the same features / logits as mimlab.
* :func:`to_hf` / :func:`save_hf`: an MAE with its decoder as transformers
  ``ViTMAEForPreTraining`` (``from_pretrained`` reproduces mimlab's reconstructions and loss
  under the same ``noise``); an encoder without decoder as ``ViTModel`` (class-token models).
  Fine-tuned checkpoints (average pooling + fc_norm) have no transformers ViT equivalent: use
  the timm format.

Position embeddings are written as stored (mimlab's fixed sin-cos values included), so the
exported model needs no re-initialisation. LayerNorm eps: transformers' config carries it;
timm's ViT uses 1e-6 (a source with another eps, e.g. transformers' 1e-12, differs by ~1e-6
after export; the returned info says so).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import timm
import torch
from timm.models import save_for_hf

from .sources import HF_LAYER_KEY, HF_LAYER_PARTS, SourceError, SourceModel

TIMM_ARCH = "vit_base_patch16_224"  # the registered name; every size comes from model_args


def timm_model_args(sm: SourceModel, num_classes: Optional[int] = None) -> dict:
    """``timm.create_model(TIMM_ARCH, **args)`` arguments that rebuild ``sm``'s encoder."""
    mc = sm.model_config
    nc = (
        (sm.head.out_features if sm.head is not None else 0) if num_classes is None else num_classes
    )
    args = dict(
        img_size=mc.img_size,
        patch_size=mc.patch_size,
        in_chans=mc.in_chans,
        embed_dim=mc.embed_dim,
        depth=mc.depth,
        num_heads=mc.num_heads,
        mlp_ratio=mc.mlp_ratio,
        qkv_bias=True,
        class_token=True,
        num_classes=nc,
        global_pool="avg" if sm.fc_norm is not None else ("avg" if sm.pool == "avg" else "token"),
    )
    args["fc_norm"] = sm.fc_norm is not None
    return args


def timm_state_dict(sm: SourceModel) -> dict:
    """``sm``'s weights in timm's names (mimlab's encoder names are timm's)."""
    sd = {k: v for k, v in sm.encoder.state_dict().items() if k != "mask_token"}
    if sm.fc_norm is not None:
        sd.update({f"fc_norm.{k}": v for k, v in sm.fc_norm.state_dict().items()})
    if sm.head is not None:
        sd.update({f"head.{k}": v for k, v in sm.head.state_dict().items()})
    return sd


def to_timm(sm: SourceModel, num_classes: Optional[int] = None) -> torch.nn.Module:
    """A timm ``VisionTransformer`` with ``sm``'s weights (eval mode); ``num_classes`` > 0
    adds a fresh head to an encoder without one."""
    args = timm_model_args(sm, num_classes)
    model = timm.create_model(TIMM_ARCH, pretrained=False, **args)
    missing, unexpected = model.load_state_dict(timm_state_dict(sm), strict=False)
    allowed = {"head.weight", "head.bias"} if args["num_classes"] and sm.head is None else set()
    if set(missing) - allowed or unexpected:
        raise SourceError(
            f"{sm.spec}: timm export mismatch: missing {sorted(missing)[:6]}, "
            f"unexpected {sorted(unexpected)[:6]}"
        )
    return model.eval()


#: keys of a timm builder's ``pretrained_cfg`` that describe its published weights, not ours
FOREIGN_PRETRAINED_KEYS = (
    "tag",
    "license",
    "hf_hub_id",
    "hf_hub_filename",
    "url",
    "origin_url",
    "paper_ids",
    "paper_name",
    "notes",
    "description",
)


def _readable(out: Path) -> None:
    """Exported files get the usual permissions (0666 minus the umask), not 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for p in out.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~mask)


def save_timm(sm: SourceModel, out_dir: str | Path) -> dict:
    """Write ``sm`` in timm's Hub format (``model.safetensors`` + ``config.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = to_timm(sm)
    mc = sm.model_config
    data = {"input_size": (mc.in_chans, mc.img_size, mc.img_size), "crop_pct": 1.0}
    if sm.mean is not None:
        data.update(mean=tuple(sm.mean), std=tuple(sm.std))
    # the builder's own pretrained weights are not these: no tag, licence or hub id of theirs
    model.pretrained_cfg = {
        k: v for k, v in model.pretrained_cfg.items() if k not in FOREIGN_PRETRAINED_KEYS
    }
    save_for_hf(model, str(out), safe_serialization=True, data_config=data)
    _readable(out)
    info = {
        "format": "timm",
        "output": str(out),
        "timm_model": TIMM_ARCH,
        "model_args": timm_model_args(sm),
        "usage": f"timm.create_model('local-dir:{out}', pretrained=True)",
    }
    if abs(sm.eps - 1e-6) > 1e-12:
        info["note"] = f"source LayerNorm eps {sm.eps:g}; timm's ViT uses 1e-6"
    return info


# ------------------------------------------------------------------------- transformers
def _hf_value(key: str, enc: dict, dec: dict, D: int, Dd: int) -> torch.Tensor:
    """The mimlab tensor for a transformers ViT / ViTMAE parameter name (either naming
    generation: ``encoder.layer.i.attention.attention.query`` or ``layers.i.attention.q_proj``).
    """
    if key.startswith("decoder."):
        k, sd, width = key[len("decoder.") :], dec, Dd
        flat = {"mask_token": "mask_token", "decoder_pos_embed": "pos_embed"}
        if k in flat:
            return sd[flat[k]]
        head, _, leaf = k.partition(".")
        if head in ("decoder_embed", "decoder_norm", "decoder_pred"):
            return sd[
                {"decoder_embed": "decoder_embed", "decoder_norm": "norm", "decoder_pred": "pred"}[
                    head
                ]
                + "."
                + leaf
            ]
    else:
        k, sd, width = (key[len("vit.") :] if key.startswith("vit.") else key), enc, D
        flat = {
            "embeddings.cls_token": "cls_token",
            "embeddings.position_embeddings": "pos_embed",
            "embeddings.mask_token": "mask_token",
        }
        if k in flat:
            return sd[flat[k]]
        if k.startswith("embeddings.patch_embeddings.projection."):
            return sd["patch_embed.proj." + k.rsplit(".", 1)[1]]
        if k.startswith("layernorm."):
            return sd["norm." + k.rsplit(".", 1)[1]]
    m = HF_LAYER_KEY.fullmatch(k)
    if m:
        i, inner = int(m.group(1)), m.group(2)
        for pat, tgt in HF_LAYER_PARTS:
            mm = pat.fullmatch(inner)
            if mm:
                if tgt in ("q", "k", "v"):
                    j = "qkv".index(tgt)
                    return sd[f"blocks.{i}.attn.qkv.{mm.group(1)}"][j * width : (j + 1) * width]
                return sd[f"blocks.{i}.{tgt}.{mm.group(1)}"]
    raise SourceError(f"transformers export: no mimlab weight for '{key}'")


def to_hf(sm: SourceModel):
    """transformers ``ViTMAEForPreTraining`` (MAE with decoder) or ``ViTModel`` (encoder)."""
    import transformers  # lazy: optional heavy dependency, only for this export

    mc = sm.model_config
    if sm.fc_norm is not None:
        raise SourceError(
            f"{sm.spec}: average pooling + fc_norm (a fine-tuned classifier) has "
            "no transformers ViT equivalent; export with --format timm"
        )
    common = dict(
        hidden_size=mc.embed_dim,
        num_hidden_layers=mc.depth,
        num_attention_heads=mc.num_heads,
        intermediate_size=int(round(mc.mlp_ratio * mc.embed_dim)),
        image_size=mc.img_size,
        patch_size=mc.patch_size,
        num_channels=mc.in_chans,
        hidden_act="gelu",
        layer_norm_eps=sm.eps,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if sm.decoder is not None:
        cfg = transformers.ViTMAEConfig(
            **common,
            decoder_hidden_size=mc.decoder_embed_dim,
            decoder_num_hidden_layers=mc.decoder_depth,
            decoder_num_attention_heads=mc.decoder_num_heads,
            decoder_intermediate_size=int(round(mc.mlp_ratio * mc.decoder_embed_dim)),
            mask_ratio=sm.mask_ratio,
            norm_pix_loss=bool(sm.norm_pix),
            mimlab_pool=sm.pool,  # mimlab's pooling of the features (read back by hf:)
        )
        model = transformers.ViTMAEForPreTraining(cfg)
    else:
        cfg = transformers.ViTConfig(**common, mimlab_pool=sm.pool)
        model = transformers.ViTModel(cfg, add_pooling_layer=False)
    enc = sm.encoder.state_dict()
    dec = sm.decoder.state_dict() if sm.decoder is not None else {}
    new = {
        k: _hf_value(k, enc, dec, mc.embed_dim, mc.decoder_embed_dim).clone()
        for k in model.state_dict()
    }
    model.load_state_dict(new, strict=True)
    return model.eval()


def save_hf(sm: SourceModel, out_dir: str | Path) -> dict:
    """Write ``sm`` as a transformers directory (``save_pretrained``) with a
    ``preprocessor_config.json`` holding its normalisation."""
    out = Path(out_dir)
    model = to_hf(sm)
    model.save_pretrained(str(out))
    mc = sm.model_config
    if sm.mean is not None:
        (out / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "ViTImageProcessor",
                    "do_resize": True,
                    "size": {"height": mc.img_size, "width": mc.img_size},
                    "do_normalize": True,
                    "image_mean": list(sm.mean),
                    "image_std": list(sm.std),
                    "do_rescale": True,
                    "rescale_factor": 1 / 255,
                },
                indent=2,
            )
        )
    _readable(out)
    arch = type(model).__name__
    return {
        "format": "hf",
        "output": str(out),
        "architecture": arch,
        "usage": f"transformers.{arch}.from_pretrained('{out}')",
        **(
            {
                "features": f"enc = transformers.ViTMAEForPreTraining.from_pretrained('{out}', "
                "mask_ratio=0.0).vit (the encoder, all patches); its outputs keep the patch "
                "order with noise=torch.arange(N, dtype=torch.float).expand(B, N); mimlab's "
                "features are the "
                f"{'class token' if sm.pool == 'cls' else 'mean of the patch tokens'} of "
                "last_hidden_state"
            }
            if arch == "ViTMAEForPreTraining"
            else {}
        ),
    }
