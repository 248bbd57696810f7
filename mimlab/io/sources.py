"""One model-source syntax for every command that reads a model.

``finetune --pretrained``, ``linprobe`` / ``knn --pretrained``, ``analyze cka --checkpoints``,
``analyze psnr`` / ``visualize --checkpoint``, ``export`` and ``method.teacher`` all accept:

=========================  ===================================================================
``mimlab:PATH`` / ``PATH``  a mimlab checkpoint (:mod:`mimlab.io.checkpoint`; pre-schema files too)
``mae:PATH``               official facebookresearch/mae ``.pth`` (``{'model': ...}``): an
                           encoder (pretrained, or fine-tuned with ``fc_norm`` + ``head``), or
                           encoder + decoder as in its ``*_visualize`` / full pretraining files
``timm:NAME[@FILE]``       any plain timm ``VisionTransformer`` (incl. ``.mae`` / ``.fb_in1k``
                           tags), built by timm; ``@FILE`` = local weights (timm's own
                           ``checkpoint_filter_fn`` applies), else the local Hugging Face cache
``hf:NAME_OR_DIR``         a transformers directory (``config.json`` + ``model.safetensors`` /
                           ``pytorch_model.bin``): ``ViTMAEForPreTraining`` (with its decoder),
                           ``ViTMAEModel``, ``ViTModel`` / ``ViTForImageClassification``,
                           data2vec-vision / BEiT when they use absolute positions and no layer
                           scale; a hub id only from the local cache
``mocov3:PATH``            official MoCo v3 ViT checkpoint (``state_dict`` with
                           ``module.base_encoder.`` keys)
=========================  ===================================================================

Options for the files whose head count cannot be read from the weights: ``mae:PATH?heads=16``
(``dec_heads=``, ``norm_pix=1`` for the decoder's target), ``mocov3:PATH?heads=12``.

Every source is mapped onto mimlab's :class:`~mimlab.nn.models.ViTEncoder` (timm blocks, class
token, absolute position embeddings) with **strict key accounting**: each key of the file is
mapped, or belongs to a part that is named in the load line as not used (a MoCo projector, an
HF tanh pooler), or the load fails with one line naming what is unsupported (layer scale,
relative position bias, register tokens, ...). Nothing is dropped silently.

Each source brings its preprocessing (mean/std and resolution) and logs ONE line saying what
was loaded: encoder only or with a decoder / classifier head, class-token or average pooling,
the position-embedding grid (bicubic interpolation, as timm's ``resample_abs_pos_embed``, when
the requested resolution differs; non-square source grids too). Offline, hub names without a
local copy fail with one line saying how to pass a local file.

Entry point: :func:`load_encoder` -> :class:`SourceModel`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import timm
import torch
import torch.nn as nn
from huggingface_hub import try_to_load_from_cache  # a timm dependency; reads the cache only
from safetensors.torch import load_file
from timm.data import resolve_data_config
from timm.layers import Mlp, resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

from ..core.config import ModelConfig
from ..nn.models import MAEDecoder, ViTEncoder, build_decoder, build_encoder
from . import checkpoint as ckpt_format

log = logging.getLogger("mimlab.sources")

SOURCE_KINDS = ("mimlab", "mae", "timm", "hf", "mocov3")
SOURCE_FORMS = (
    "mimlab:PATH (or a bare path)",
    "mae:PATH[?heads=N]",
    "timm:NAME[@FILE]",
    "hf:NAME_OR_DIR",
    "mocov3:PATH[?heads=N]",
)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
#: attention heads of the published models by width (their files do not record it)
MAE_HEADS = {768: 12, 1024: 16, 1280: 16}  # ViT-B/16, L/16, H/14
MAE_DECODER_HEADS = {512: 16}
MOCOV3_HEADS = {384: 12, 768: 12}  # vit_small, vit_base (moco-v3 vits.py)


class SourceError(ValueError):
    """A model source cannot be read or mapped; the message is one line naming why."""


# ------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Source:
    """A parsed source spec: ``kind``, ``target`` (path / name), ``file`` (timm ``@FILE``),
    ``options`` (``?k=v&...``)."""

    kind: str
    target: str
    file: Optional[str] = None
    options: tuple = ()
    text: str = ""

    def opt(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


def is_source_spec(spec: str) -> bool:
    """True when ``spec`` starts with a model-source prefix (``mimlab:``, ``mae:``, ...)."""
    head, sep, _ = str(spec).partition(":")
    return bool(sep) and head.lower() in SOURCE_KINDS


def parse_source(spec: str) -> Source:
    """``'kind:target[@file][?k=v&k=v]'`` -> :class:`Source`; a bare path is ``mimlab:``."""
    text = str(spec).strip()
    if not text:
        raise SourceError("empty model source; forms: " + ", ".join(SOURCE_FORMS))
    head, sep, rest = text.partition(":")
    kind = head.lower()
    if not sep or kind not in SOURCE_KINDS:
        if sep and len(head) > 1 and not os.path.exists(text) and "/" not in head:
            raise SourceError(
                f"unknown model source '{head}:' in '{text}'; forms: " + ", ".join(SOURCE_FORMS)
            )
        kind, rest = "mimlab", text
    opts: tuple = ()
    if kind in ("mae", "mocov3") and "?" in rest:
        rest, q = rest.split("?", 1)
        try:
            opts = tuple((k, v) for k, v in (kv.split("=", 1) for kv in q.split("&") if kv))
        except ValueError:
            raise SourceError(
                f"bad options '?{q}' in '{text}' (use ?heads=12&norm_pix=1)"
            ) from None
    file = None
    if kind == "timm" and "@" in rest:
        rest, file = rest.split("@", 1)
    if not rest:
        raise SourceError(f"'{text}': nothing after '{kind}:'; forms: " + ", ".join(SOURCE_FORMS))
    return Source(kind, rest, file, opts, text)


# ------------------------------------------------------------------------- loaded model
class SourceModel(nn.Module):
    """A model read from any source, mapped onto mimlab's modules (eval mode, frozen grads
    untouched).

    * ``encoder``: :class:`ViTEncoder`; ``encoder.norm`` is ``Identity`` for classifiers /
      average-pooled models whose norm comes after pooling (``fc_norm``);
    * ``fc_norm`` (optional): LayerNorm after average pooling; ``head`` (optional): classifier;
    * ``decoder`` (optional): MAE pixel decoder, with ``norm_pix`` and ``mask_ratio``;
    * ``pool``: ``'cls'`` | ``'avg'`` -- the source's own pooling;
    * ``mean`` / ``std`` / ``img_size``: the preprocessing it expects;
    * ``description``: the one line logged when it was loaded.
    """

    def __init__(
        self,
        spec: str,
        kind: str,
        encoder: ViTEncoder,
        model_config: ModelConfig,
        mean: Optional[list],
        std: Optional[list],
        pool: str,
        fc_norm: Optional[nn.LayerNorm] = None,
        head: Optional[nn.Linear] = None,
        decoder: Optional[MAEDecoder] = None,
        norm_pix: Optional[bool] = None,
        mask_ratio: float = 0.75,
        method: Optional[str] = None,
        checkpoint: Optional[dict] = None,
        eps: float = 1e-6,
        description: str = "",
    ):
        super().__init__()
        self.spec, self.kind = spec, kind
        self.encoder, self.fc_norm, self.head, self.decoder = encoder, fc_norm, head, decoder
        self.model_config, self.mean, self.std, self.pool = model_config, mean, std, pool
        self.norm_pix, self.mask_ratio, self.method = norm_pix, mask_ratio, method
        self.checkpoint, self.eps, self.description = checkpoint, eps, description

    @property
    def img_size(self) -> int:
        return self.model_config.img_size

    def features(self, images: torch.Tensor, pool: Optional[str] = None) -> torch.Tensor:
        """[B, C, H, W] -> pooled features [B, D]: the source's pooling (or ``pool``), then
        ``fc_norm`` when the source has one (timm ``forward_head(pre_logits=True)``)."""
        t = self.encoder.forward_features(images)
        f = self.encoder.pool(t, pool or self.pool)
        return self.fc_norm(f) if self.fc_norm is not None else f

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise SourceError(f"{self.spec}: no classifier head")
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


# ------------------------------------------------------------------------- assembly
@dataclass
class _Arch:
    """What a source's mapping found: architecture, preprocessing and the split weights."""

    img_hw: tuple[int, int]
    patch: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    eps: float = 1e-6
    pool: str = "cls"
    mean: Optional[list] = None
    std: Optional[list] = None
    what: str = ""  # "ViTMAEForPreTraining", "timm vit_base...", ...
    encoder: dict = field(default_factory=dict)  # mimlab encoder keys (pos_embed incl.)
    fc_norm: dict = field(default_factory=dict)
    head: dict = field(default_factory=dict)
    decoder: dict = field(default_factory=dict)  # mimlab MAEDecoder keys
    decoder_dims: Optional[tuple[int, int, int]] = None  # (embed, depth, heads)
    norm_pix: Optional[bool] = None
    mask_ratio: float = 0.75
    ignored: list = field(default_factory=list)  # parts named in the load line
    cls_pos: bool = True  # pos_embed has a row for the class token
    sincos: bool = False  # fixed sin-cos positions (mimlab): recompute


def _grid_of(n: int, what: str) -> tuple[int, int]:
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise SourceError(
            f"{what}: {n} position embeddings are not a square grid; pass the source's resolution"
        )
    return g, g


def _resample(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """[1, 1 + h*w, D] -> [1, 1 + H*W, D]: bicubic, class-token row kept (timm's function)."""
    if tuple(old) == tuple(new):
        return pos
    return resample_abs_pos_embed(pos, list(new), list(old), num_prefix_tokens=1)


def _set_eps(module: nn.Module, eps: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps


def _strict_load(module: nn.Module, sd: dict, what: str) -> None:
    own = module.state_dict()
    shape = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if shape or missing or unexpected:
        parts = [
            f"shape mismatches: {', '.join(shape[:4])}" if shape else "",
            f"missing: {', '.join(missing[:6])}" if missing else "",
            f"unmapped: {', '.join(unexpected[:6])}" if unexpected else "",
        ]
        raise SourceError(f"{what}: " + "; ".join(p for p in parts if p))
    module.load_state_dict(sd, strict=True)


def _assemble(
    spec: str,
    kind: str,
    a: _Arch,
    img_size: Optional[int],
    drop_path: float = 0.0,
    method: Optional[str] = None,
    checkpoint: Optional[dict] = None,
    base_config: Optional[ModelConfig] = None,
) -> SourceModel:
    h0, w0 = a.img_hw
    gh0, gw0 = h0 // a.patch, w0 // a.patch
    size = int(img_size or max(h0, w0))
    if size % a.patch:
        raise SourceError(f"{spec}: resolution {size} px is not a multiple of patch {a.patch}")
    g = size // a.patch
    mc = replace(base_config) if base_config is not None else ModelConfig(preset=None)
    mc.img_size, mc.patch_size, mc.in_chans = size, a.patch, a.in_chans
    mc.embed_dim, mc.depth, mc.num_heads, mc.mlp_ratio = (
        a.embed_dim,
        a.depth,
        a.num_heads,
        a.mlp_ratio,
    )
    mc.drop_path = drop_path
    if a.decoder_dims is not None:
        mc.decoder_embed_dim, mc.decoder_depth, mc.decoder_num_heads = a.decoder_dims
    if a.embed_dim % a.num_heads:
        raise SourceError(
            f"{spec}: width {a.embed_dim} is not divisible by {a.num_heads} heads (wrong ?heads=)"
        )
    sd = dict(a.encoder)
    enc = build_encoder(mc, mask_token="mask_token" in sd, drop_path=drop_path)
    if a.fc_norm or "norm.weight" not in sd:
        enc.norm = nn.Identity()
    pos = sd.get("pos_embed")
    if pos is None:
        raise SourceError(
            f"{spec}: no absolute position embeddings (relative position bias is unsupported)"
        )
    if not a.cls_pos:  # timm no_embed_class: the class token gets no position
        pos = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], 1)
    if pos.shape[1] != 1 + gh0 * gw0:
        raise SourceError(f"{spec}: {pos.shape[1] - 1} position embeddings for a {gh0}x{gw0} grid")
    if a.sincos:
        sd["pos_embed"] = enc.pos_embed.clone() if (gh0, gw0) != (g, g) else pos
        pos_note = (
            f"sin-cos positions {gh0}x{gw0}"
            if (gh0, gw0) == (g, g)
            else f"sin-cos positions recomputed {gh0}x{gw0} -> {g}x{g}"
        )
    else:
        sd["pos_embed"] = _resample(pos.float(), (gh0, gw0), (g, g)).to(pos.dtype)
        pos_note = (
            f"positions {gh0}x{gw0}"
            if (gh0, gw0) == (g, g)
            else f"positions {gh0}x{gw0} -> {g}x{g} (bicubic)"
        )
    _strict_load(enc, sd, f"{spec}: encoder does not map")
    _set_eps(enc, a.eps)
    fc_norm = head = decoder = None
    if a.fc_norm:
        fc_norm = nn.LayerNorm(a.embed_dim, eps=a.eps)
        _strict_load(fc_norm, a.fc_norm, f"{spec}: fc_norm")
    if a.head:
        w = a.head["weight"]
        head = nn.Linear(w.shape[1], w.shape[0])
        _strict_load(head, a.head, f"{spec}: classifier head")
    if a.decoder:
        decoder = build_decoder(mc)
        dsd = dict(a.decoder)
        dpos = dsd.get("pos_embed")
        if dpos is not None and dpos.shape[1] == 1 + gh0 * gw0:
            dsd["pos_embed"] = (
                decoder.pos_embed.clone()
                if a.sincos and (gh0, gw0) != (g, g)
                else _resample(dpos.float(), (gh0, gw0), (g, g)).to(dpos.dtype)
            )
        _strict_load(decoder, dsd, f"{spec}: decoder does not map")
        _set_eps(decoder, a.eps)
    parts = ["encoder"]
    if decoder is not None:
        parts.append(
            f"MAE decoder ({mc.decoder_depth}x{mc.decoder_embed_dim}, norm_pix={bool(a.norm_pix)})"
        )
    if head is not None:
        parts.append(f"{head.out_features}-class head")
    pool = "avg + fc_norm" if fc_norm is not None else a.pool
    pre = (
        f"mean {_fmt(a.mean)} std {_fmt(a.std)}"
        if a.mean is not None
        else "data statistics not recorded (the data set's)"
    )
    desc = (
        f"{spec}: {a.what} -> {' + '.join(parts)} ViT {a.depth}x{a.embed_dim} "
        f"({a.num_heads} heads, patch {a.patch}); pooling {pool}; {pos_note}; input "
        f"{size} px, {pre}" + (f"; not used: {', '.join(a.ignored)}" if a.ignored else "")
    )
    log.info("%s", desc)
    model = SourceModel(
        spec,
        kind,
        enc,
        mc,
        a.mean,
        a.std,
        a.pool,
        fc_norm,
        head,
        decoder,
        a.norm_pix,
        a.mask_ratio,
        method,
        checkpoint,
        a.eps,
        desc,
    )
    return model.eval()


def _fmt(v: Optional[Sequence[float]]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")" if v is not None else "?"


# ------------------------------------------------------------------------- mimlab
def _mimlab(src: Source, trust: bool) -> tuple[_Arch, dict]:
    ck = ckpt_format.load(src.target, trust=trust)
    mc = ckpt_format.model_config(ck)
    enc = dict(ckpt_format.encoder_state(ck))
    head = ckpt_format.head_state(ck)
    stats = ckpt_format.data_stats(ck)
    a = _Arch(
        (mc.img_size, mc.img_size),
        mc.patch_size,
        mc.in_chans,
        mc.embed_dim,
        mc.depth,
        mc.num_heads,
        mc.mlp_ratio,
        1e-6,
        "avg",
        stats[0] if stats else None,
        stats[1] if stats else None,
        sincos=True,
    )
    a.what = f"mimlab {ck['kind']} checkpoint ({ck.get('method') or 'from scratch'})"
    a.encoder = enc
    if head:
        a.fc_norm = {k[len("fc_norm.") :]: v for k, v in head.items() if k.startswith("fc_norm.")}
        a.head = {k[len("head.") :]: v for k, v in head.items() if k.startswith("head.")}
        a.encoder = {k: v for k, v in enc.items() if not k.startswith("norm.")}
    meth = (ck.get("config") or {}).get("method") or {}
    if (
        ck["kind"] == "pretrain"
        and meth.get("target") == "pixels"
        and meth.get("head") == "decoder"
        and meth.get("student") == "drop"
        and meth.get("view2", "none") == "none"
    ):
        a.decoder = ckpt_format.decoder_state(ck)
        a.decoder_dims = (mc.decoder_embed_dim, mc.decoder_depth, mc.decoder_num_heads)
        a.norm_pix = meth.get("target_norm") == "patch"
        a.mask_ratio = float(meth.get("mask_ratio", 0.75))
    return a, ck


# ------------------------------------------------------------------------- official MAE / MoCo
def _torch_file(path: str, spec: str) -> Any:
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise SourceError(f"{spec}: file not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors of every kind
        raise SourceError(
            f"{spec}: cannot read {p}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def _timm_block_arch(
    sd: dict, spec: str, heads: Optional[int], table: dict, what: str, prefix: str = ""
) -> _Arch:
    """Architecture of a state dict in timm / official-MAE names (``cls_token``, ``pos_embed``,
    ``patch_embed.proj``, ``blocks.i.*``); heads from ``heads`` or ``table`` by width."""
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if k not in sd:
            raise SourceError(f"{spec}: no '{prefix}{k}' in the file: not a {what} ViT checkpoint")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4:
        raise SourceError(
            f"{spec}: unsupported patch embedding {tuple(w.shape)} (convolutional stem)"
        )
    D, C, p = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if depth < 1:
        raise SourceError(f"{spec}: no transformer blocks ('{prefix}blocks.*')")
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    nh = int(heads) if heads is not None else table.get(int(D))
    if nh is None:
        raise SourceError(
            f"{spec}: the file does not record the number of attention heads of "
            f"a width-{D} ViT; add ?heads=N to the source"
        )
    gh, gw = _grid_of(sd["pos_embed"].shape[1] - 1, spec)
    return _Arch(
        (gh * p, gw * p),
        p,
        C,
        D,
        depth,
        nh,
        hidden / D,
        1e-6,
        "cls",
        list(IMAGENET_MEAN),
        list(IMAGENET_STD),
    )


_TIMM_BLOCK_KEY = re.compile(
    r"blocks\.\d+\.(norm1|norm2)\.(weight|bias)|blocks\.\d+\.attn\.(qkv|proj)\.(weight|bias)"
    r"|blocks\.\d+\.mlp\.(fc1|fc2)\.(weight|bias)"
)
_UNSUPPORTED = [  # (key pattern, what) -> one-line failure
    (re.compile(r".*(\.ls[12]\.gamma|\.gamma_[12]|lambda_[12])$"), "layer scale"),
    (re.compile(r".*relative_position.*"), "relative position bias"),
    (re.compile(r".*(q_norm|k_norm)\..*"), "qk-norm"),
    (re.compile(r"^reg_token$"), "register tokens"),
    (re.compile(r"^dist_token$"), "a distillation token (DeiT distilled)"),
    (re.compile(r".*attn\.(q_bias|v_bias)$"), "separate q/v biases (BEiT layout)"),
]


def _check_supported(keys, spec: str) -> None:
    for k in keys:
        for pat, what in _UNSUPPORTED:
            if pat.match(k):
                raise SourceError(f"{spec}: unsupported architecture: {what} ('{k}')")


def _split_timm_names(
    sd: dict, spec: str, decoder_prefix: bool
) -> tuple[dict, dict, dict, dict, list]:
    """timm / official-MAE names -> (encoder, fc_norm, head, decoder (mimlab names), rest)."""
    _check_supported(sd, spec)
    enc, fcn, head, dec, rest = {}, {}, {}, {}, []
    for k, v in sd.items():
        if (
            k in ("cls_token", "pos_embed")
            or k.startswith(("patch_embed.proj.", "norm."))
            or _TIMM_BLOCK_KEY.fullmatch(k)
        ):
            enc[k] = v
        elif k.startswith("fc_norm."):
            fcn[k[len("fc_norm.") :]] = v
        elif k.startswith("head.") and k.count(".") == 1:
            head[k[len("head.") :]] = v
        elif decoder_prefix and k in ("mask_token", "decoder_pos_embed"):
            dec["mask_token" if k == "mask_token" else "pos_embed"] = v
        elif decoder_prefix and k.startswith(("decoder_embed.", "decoder_norm.", "decoder_pred.")):
            name, rest_k = k.split(".", 1)
            dec[
                {"decoder_embed": "decoder_embed", "decoder_norm": "norm", "decoder_pred": "pred"}[
                    name
                ]
                + "."
                + rest_k
            ] = v
        elif (
            decoder_prefix
            and k.startswith("decoder_blocks.")
            and _TIMM_BLOCK_KEY.fullmatch(k[len("decoder_") :])
        ):
            dec[k[len("decoder_") :]] = v
        else:
            rest.append(k)
    return enc, fcn, head, dec, rest


def _unwrap(obj: Any, spec: str, keys: Sequence[str]) -> dict:
    for key in keys:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise SourceError(f"{spec}: no state dict found (looked for {', '.join(keys)})")


def _mae(src: Source) -> _Arch:
    sd = _unwrap(_torch_file(src.target, src.text), src.text, ("model", "state_dict"))
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    enc, fcn, head, dec, rest = _split_timm_names(sd, src.text, decoder_prefix=True)
    if rest:
        raise SourceError(
            f"{src.text}: keys that do not map onto the official MAE layout: {', '.join(rest[:6])}"
        )
    a = _timm_block_arch(enc, src.text, src.opt("heads"), MAE_HEADS, "facebookresearch/mae")
    a.encoder, a.fc_norm, a.head = enc, fcn, head
    a.pool = "avg" if fcn else "cls"
    a.what = "official MAE " + (
        "fine-tuned checkpoint"
        if head
        else "pretraining checkpoint with decoder"
        if dec
        else "encoder"
    )
    if dec:
        dw = dec["decoder_embed.weight"]
        ddepth = 1 + max(int(k.split(".")[1]) for k in dec if k.startswith("blocks."))
        dheads = src.opt("dec_heads")
        dheads = int(dheads) if dheads is not None else MAE_DECODER_HEADS.get(int(dw.shape[0]))
        if dheads is None:
            raise SourceError(
                f"{src.text}: the file does not record the decoder's heads for "
                f"width {dw.shape[0]}; add ?dec_heads=N"
            )
        dratio = dec["blocks.0.mlp.fc1.weight"].shape[0] / dw.shape[0]
        if abs(dratio - a.mlp_ratio) > 1e-9:
            raise SourceError(
                f"{src.text}: unsupported: decoder MLP ratio {dratio:g} differs "
                f"from the encoder's {a.mlp_ratio:g}"
            )
        a.decoder, a.decoder_dims = dec, (int(dw.shape[0]), ddepth, dheads)
        a.norm_pix = str(src.opt("norm_pix", "0")).lower() in ("1", "true", "yes")
    return a


def _mocov3(src: Source) -> _Arch:
    obj = _torch_file(src.target, src.text)
    sd = _unwrap(obj, src.text, ("state_dict", "model"))
    enc_sd, ignored = {}, set()
    for k, v in sd.items():
        kk = k[len("module.") :] if k.startswith("module.") else k
        if kk.startswith("base_encoder.head."):
            ignored.add("projector (base_encoder.head)")
        elif kk.startswith("base_encoder."):
            enc_sd[kk[len("base_encoder.") :]] = v
        elif kk.startswith("momentum_encoder."):
            ignored.add("momentum encoder")
        elif kk.startswith("predictor."):
            ignored.add("predictor")
        else:
            raise SourceError(
                f"{src.text}: key '{k}' is not in the MoCo v3 layout "
                "(module.base_encoder. / momentum_encoder. / predictor.)"
            )
    if not enc_sd:
        raise SourceError(f"{src.text}: no 'module.base_encoder.*' keys: not a MoCo v3 checkpoint")
    arch = obj.get("arch") if isinstance(obj, dict) else None
    heads = src.opt("heads")
    if heads is None and isinstance(arch, str):
        if "conv" in arch:
            raise SourceError(f"{src.text}: unsupported architecture '{arch}' (convolutional stem)")
        heads = {"vit_small": 12, "vit_base": 12, "vit_large": 16}.get(arch)
    enc, fcn, head, _, rest = _split_timm_names(enc_sd, src.text, decoder_prefix=False)
    if rest or head or fcn:
        raise SourceError(
            f"{src.text}: base_encoder keys that do not map: "
            f"{', '.join((rest + list(head) + list(fcn))[:6])}"
        )
    a = _timm_block_arch(enc, src.text, heads, MOCOV3_HEADS, "MoCo v3", "module.base_encoder.")
    a.encoder, a.pool = enc, "cls"
    a.what = f"MoCo v3 base encoder{f' ({arch})' if arch else ''}"
    a.ignored = sorted(ignored)
    return a


# ------------------------------------------------------------------------- timm
def _hub_file(repo: str, names: Sequence[str]) -> Optional[str]:
    """A file of a Hugging Face hub repo from the local cache, or None (never downloads)."""
    for n in names:
        try:
            p = try_to_load_from_cache(repo, n)
        except Exception:  # noqa: BLE001 - not a valid repo id (e.g. a missing local path)
            return None
        if isinstance(p, str) and os.path.isfile(p):
            return p
    return None


def _only_head_missing(message: str) -> bool:
    """Whether a ``load_state_dict`` error says only that the classifier head is missing."""
    if "Unexpected key" in message or "size mismatch" in message:
        return False
    m = re.search(r"Missing key\(s\) in state_dict: (.*)", message)
    missing = set(re.findall(r'"([^"]+)"', m.group(1))) if m else set()
    return bool(missing) and missing <= {"head.weight", "head.bias"}


def _timm(src: Source, img_size: Optional[int]) -> _Arch:
    name = src.target
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as e:  # noqa: BLE001 - unknown model names and bad arguments
        raise SourceError(
            f"{src.text}: timm cannot build '{name}': {str(e).splitlines()[0]}"
        ) from None
    if type(model) is not VisionTransformer:
        raise SourceError(
            f"{src.text}: unsupported architecture: timm {type(model).__name__} "
            "(only plain VisionTransformer maps)"
        )
    file = src.file
    if file is None:
        hub = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
        file = _hub_file(hub, ("model.safetensors", "pytorch_model.bin")) if hub else None
        if file is None:
            raise SourceError(
                f"{src.text}: no local weights for '{name}' (offline: the hub "
                f"cannot be reached); download them elsewhere and pass "
                f"timm:{name}@/path/to/model.safetensors"
            )
    elif not os.path.isfile(os.path.expanduser(file)):
        raise SourceError(f"{src.text}: weights file not found: {file}")

    def load(m: nn.Module) -> None:
        timm.models.load_checkpoint(
            m, os.path.expanduser(file), strict=True, filter_fn=checkpoint_filter_fn
        )

    try:
        try:
            load(model)
        except RuntimeError as e:
            if not _only_head_missing(str(e)):
                raise
            # weights saved without a classifier (num_classes=0): for features that is fine
            model = timm.create_model(name, pretrained=False, num_classes=0)
            load(model)
    except Exception as e:  # noqa: BLE001 - strict loading reports missing / unexpected keys
        raise SourceError(
            f"{src.text}: {file} does not load into timm '{name}': {' '.join(str(e).split())[:300]}"
        ) from None
    model.eval()
    probs = []
    blk = model.blocks[0]
    if model.cls_token is None:
        probs.append("no class token")
    if getattr(model, "num_reg_tokens", 0):
        probs.append("register tokens")
    if model.pos_embed is None:
        probs.append("no absolute position embeddings")
    if model.global_pool not in ("token", "avg"):
        probs.append(f"global_pool='{model.global_pool}'")
    if not isinstance(model.norm_pre, nn.Identity):
        probs.append("pre-norm")
    if not isinstance(model.patch_embed.norm, nn.Identity):
        probs.append("patch-embedding norm")
    for b in model.blocks:
        if type(b) is not Block:
            probs.append(f"block type {type(b).__name__}")
        elif not isinstance(b.ls1, nn.Identity) or not isinstance(b.ls2, nn.Identity):
            probs.append("layer scale")
        elif not (
            isinstance(b.attn.q_norm, nn.Identity) and isinstance(b.attn.k_norm, nn.Identity)
        ):
            probs.append("qk-norm")
        elif not isinstance(getattr(b.attn, "norm", nn.Identity()), nn.Identity):
            probs.append("attention-output norm")
        elif (
            type(b.mlp) is not Mlp
            or not isinstance(b.mlp.act, nn.GELU)
            or b.mlp.act.approximate != "none"
            or not isinstance(b.mlp.norm, nn.Identity)
        ):
            probs.append("MLP other than Linear-GELU-Linear")
        if probs:
            break
    if probs:
        raise SourceError(f"{src.text}: unsupported architecture: {probs[0]}")
    sd = model.state_dict()
    enc, fcn, head, _, rest = _split_timm_names(sd, src.text, decoder_prefix=False)
    if rest:
        raise SourceError(f"{src.text}: timm keys that do not map: {', '.join(rest[:6])}")
    D = model.embed_dim
    if "patch_embed.proj.bias" not in enc:
        enc["patch_embed.proj.bias"] = torch.zeros(D)
    for i in range(len(model.blocks)):
        if f"blocks.{i}.attn.qkv.bias" not in enc:
            enc[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * D)
    if not isinstance(model.norm, nn.Identity) and "norm.weight" not in enc:
        raise SourceError(f"{src.text}: unsupported final norm {type(model.norm).__name__}")
    gh, gw = model.patch_embed.grid_size
    p = model.patch_embed.patch_size[0]
    if model.patch_embed.patch_size[0] != model.patch_embed.patch_size[1]:
        raise SourceError(
            f"{src.text}: unsupported non-square patches {model.patch_embed.patch_size}"
        )
    cfg = resolve_data_config({}, model=model)
    a = _Arch(
        (gh * p, gw * p),
        p,
        model.patch_embed.proj.in_channels,
        D,
        len(model.blocks),
        blk.attn.num_heads,
        blk.mlp.fc1.out_features / D,
        blk.norm1.eps,
        "cls" if model.global_pool == "token" else "avg",
        [float(x) for x in cfg["mean"]],
        [float(x) for x in cfg["std"]],
    )
    a.encoder, a.fc_norm = enc, fcn
    a.head = head if isinstance(model.head, nn.Linear) else {}
    a.cls_pos = not model.no_embed_class
    if fcn:
        a.pool = "avg"
    a.what = f"timm {name} ({os.path.basename(file)})"
    return a


# ------------------------------------------------------------------------- transformers
HF_LAYER_KEY = re.compile(
    r"(?:encoder\.layer|layers|decoder_layers|decoder_encoder\.layer)\.(\d+)"
    r"\.(.+)"
)
HF_LAYER_PARTS = [  # (pattern on the key inside a layer, mimlab block key or q/k/v marker)
    (re.compile(r"attention\.(?:attention\.query|q_proj)\.(weight|bias)"), "q"),
    (re.compile(r"attention\.(?:attention\.key|k_proj)\.(weight|bias)"), "k"),
    (re.compile(r"attention\.(?:attention\.value|v_proj)\.(weight|bias)"), "v"),
    (re.compile(r"attention\.(?:output\.dense|o_proj)\.(weight|bias)"), "attn.proj"),
    (re.compile(r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)"), "mlp.fc1"),
    (re.compile(r"(?:output\.dense|mlp\.fc2)\.(weight|bias)"), "mlp.fc2"),
    (re.compile(r"(?:layernorm_before|layer_norm1|input_layernorm)\.(weight|bias)"), "norm1"),
    (
        re.compile(r"(?:layernorm_after|layer_norm2|post_attention_layernorm)\.(weight|bias)"),
        "norm2",
    ),
]
_HF_ARCHS = {
    "vit_mae": "ViTMAE",
    "vit": "ViT",
    "data2vec-vision": "data2vec-vision",
    "beit": "BEiT",
}


def _hf_files(src: Source) -> tuple[dict, dict]:
    """(config.json, raw state dict) of a local transformers directory or a cached hub id."""
    d = Path(os.path.expanduser(src.target))
    if d.is_dir():
        cfg_p = d / "config.json"
        if not cfg_p.is_file():
            raise SourceError(f"{src.text}: no config.json in {d}")
        names = [p.name for p in d.iterdir()]
        weights = [str(d / n) for n in ("model.safetensors", "pytorch_model.bin") if n in names]
        for idx in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if not weights and idx in names:
                shards = sorted(set(json.loads((d / idx).read_text())["weight_map"].values()))
                weights = [str(d / s) for s in shards]
        if not weights:
            raise SourceError(f"{src.text}: no model.safetensors / pytorch_model.bin in {d}")
    elif src.target.startswith(("/", ".", "~")) or src.target.count("/") != 1:
        raise SourceError(
            f"{src.text}: directory not found: {d} (hf: takes a transformers "
            "directory or a hub id 'org/name' in the local cache)"
        )
    else:
        cfg_file = _hub_file(src.target, ("config.json",))
        w = _hub_file(src.target, ("model.safetensors", "pytorch_model.bin"))
        if cfg_file is None or w is None:
            raise SourceError(
                f"{src.text}: not a local directory and not in the Hugging Face "
                f"cache (offline); download it elsewhere (huggingface-cli download "
                f"{src.target} --local-dir DIR) and pass hf:DIR"
            )
        cfg_p, weights = Path(cfg_file), [w]
    sd: dict = {}
    for w in weights:
        if w.endswith(".safetensors"):
            sd.update(load_file(w, device="cpu"))
        else:
            sd.update(torch.load(w, map_location="cpu", weights_only=True))
    return json.loads(cfg_p.read_text()), sd


def _hf_layers(keys_vals: dict, spec: str, D: int, what: str) -> tuple[dict, list]:
    """HF layer keys (any naming generation) -> mimlab ``blocks.i.*``; q/k/v fused into qkv
    (a missing k bias, as in BEiT, is zero)."""
    out, qkv, rest = {}, {}, []
    for k, v in keys_vals.items():
        m = HF_LAYER_KEY.fullmatch(k)
        if not m:
            rest.append(k)
            continue
        i, inner = int(m.group(1)), m.group(2)
        for pat, tgt in HF_LAYER_PARTS:
            mm = pat.fullmatch(inner)
            if mm:
                if tgt in ("q", "k", "v"):
                    qkv.setdefault((i, mm.group(1)), {})[tgt] = v
                else:
                    out[f"blocks.{i}.{tgt}.{mm.group(1)}"] = v
                break
        else:
            rest.append(k)
    for (i, kind), parts in qkv.items():
        if kind == "weight":
            if set(parts) != {"q", "k", "v"}:
                raise SourceError(f"{spec}: {what} layer {i} lacks some of query/key/value")
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            z = torch.zeros(D)
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([parts.get(t, z) for t in "qkv"])
    for i in {i for (i, _) in qkv}:  # no biases at all (qkv_bias=False): zero biases
        out.setdefault(f"blocks.{i}.attn.qkv.bias", torch.zeros(3 * D))
    return out, rest


def _hf(src: Source) -> _Arch:
    cfg, raw = _hf_files(src)
    mt = cfg.get("model_type")
    if mt not in _HF_ARCHS:
        raise SourceError(
            f"{src.text}: unsupported transformers model_type '{mt}' (maps: {', '.join(_HF_ARCHS)})"
        )
    arch = (cfg.get("architectures") or [_HF_ARCHS[mt]])[0]
    _check_supported(raw, src.text)
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise SourceError(
            f"{src.text}: unsupported activation '{cfg['hidden_act']}' (exact GELU only)"
        )
    if mt in ("data2vec-vision", "beit"):
        if cfg.get("use_relative_position_bias") or cfg.get("use_shared_relative_position_bias"):
            raise SourceError(f"{src.text}: unsupported architecture: relative position bias")
        if cfg.get("layer_scale_init_value", 0) and any("lambda_" in k for k in raw):
            raise SourceError(f"{src.text}: unsupported architecture: layer scale")
    D, depth = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    img = cfg.get("image_size", 224)
    img_hw = (img, img) if isinstance(img, int) else (int(img[0]), int(img[1]))
    p = cfg.get("patch_size", 16)
    if not isinstance(p, int):
        if p[0] != p[1]:
            raise SourceError(f"{src.text}: unsupported non-square patches {p}")
        p = int(p[0])
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    enc, dec_raw, fcn, head, ignored, rest = {}, {}, {}, {}, [], []
    prefixes = ("vit.", "beit.", "data2vec_vision.", "vit_mae.")
    for k, v in raw.items():
        kk = next((k[len(pre) :] for pre in prefixes if k.startswith(pre)), k)
        if k.startswith("decoder."):
            dec_raw[k[len("decoder.") :]] = v
        elif kk in ("embeddings.cls_token", "embeddings.mask_token"):
            enc[kk.split(".")[1]] = v
        elif kk == "embeddings.position_embeddings":
            enc["pos_embed"] = v
        elif kk.startswith("embeddings.patch_embeddings.projection."):
            enc["patch_embed.proj." + kk.rsplit(".", 1)[1]] = v
        elif kk.startswith("layernorm."):
            enc["norm." + kk.rsplit(".", 1)[1]] = v
        elif kk.startswith("pooler.layernorm."):  # BEiT / data2vec mean pooling
            fcn[kk.rsplit(".", 1)[1]] = v
        elif kk.startswith("pooler.dense."):
            if "pooler (dense + tanh on the class token)" not in ignored:
                ignored.append("pooler (dense + tanh on the class token)")
        elif k.startswith("classifier."):
            head[k.rsplit(".", 1)[1]] = v
        else:
            rest.append((kk, v))
    blocks, left = _hf_layers(dict(rest), src.text, D, "encoder")
    if left:
        raise SourceError(f"{src.text}: {arch} keys that do not map: {', '.join(left[:6])}")
    enc.update(blocks)
    if "pos_embed" not in enc:
        raise SourceError(
            f"{src.text}: unsupported architecture: no absolute position "
            "embeddings (relative position bias)"
        )
    if "patch_embed.proj.bias" not in enc:
        enc["patch_embed.proj.bias"] = torch.zeros(D)
    a = _Arch(
        img_hw,
        p,
        int(cfg.get("num_channels", 3)),
        D,
        depth,
        heads,
        int(cfg["intermediate_size"]) / D,
        eps,
        cfg.get("mimlab_pool") if cfg.get("mimlab_pool") in ("cls", "avg") else "cls",
        list(IMAGENET_MEAN),
        list(IMAGENET_STD),
    )
    a.encoder, a.fc_norm, a.head, a.ignored = enc, fcn, head, ignored
    if fcn:
        a.pool = "avg"
    a.mean, a.std = _hf_preprocessing(src, a.mean, a.std)
    a.what = f"transformers {arch}"
    if mt == "vit_mae":
        a.mask_ratio = float(cfg.get("mask_ratio", 0.75))
    if dec_raw:
        dec, dleft = {}, {}
        for k, v in dec_raw.items():
            if k == "mask_token":
                dec["mask_token"] = v
            elif k == "decoder_pos_embed":
                dec["pos_embed"] = v
            elif k.startswith(("decoder_embed.", "decoder_norm.", "decoder_pred.")):
                name, leaf = k.split(".", 1)
                dec[
                    {
                        "decoder_embed": "decoder_embed",
                        "decoder_norm": "norm",
                        "decoder_pred": "pred",
                    }[name]
                    + "."
                    + leaf
                ] = v
            else:
                dleft[k] = v
        Dd = int(cfg["decoder_hidden_size"])
        dblocks, left = _hf_layers(dleft, src.text, Dd, "decoder")
        if left:
            raise SourceError(f"{src.text}: decoder keys that do not map: {', '.join(left[:6])}")
        dec.update(dblocks)
        if int(cfg["decoder_intermediate_size"]) / Dd != a.mlp_ratio:
            raise SourceError(
                f"{src.text}: unsupported: decoder MLP ratio "
                f"{int(cfg['decoder_intermediate_size']) / Dd:g} differs from the "
                f"encoder's {a.mlp_ratio:g}"
            )
        a.decoder = dec
        a.decoder_dims = (
            Dd,
            int(cfg["decoder_num_hidden_layers"]),
            int(cfg["decoder_num_attention_heads"]),
        )
        a.norm_pix = bool(cfg.get("norm_pix_loss", False))
    return a


def _hf_preprocessing(src: Source, mean: list, std: list) -> tuple[list, list]:
    """image_mean / image_std of the directory's preprocessor_config.json, when present."""
    d = Path(os.path.expanduser(src.target))
    p = d / "preprocessor_config.json" if d.is_dir() else None
    if p is None or not p.is_file():
        cached = _hub_file(src.target, ("preprocessor_config.json",)) if p is None else None
        p = Path(cached) if cached else None
    if p is None:
        return mean, std
    pc = json.loads(p.read_text())
    return (list(pc.get("image_mean", mean)), list(pc.get("image_std", std)))


# ------------------------------------------------------------------------- entry point
def load_encoder(
    spec: str, img_size: Optional[int] = None, drop_path: float = 0.0, trust: bool = False
) -> SourceModel:
    """Read a model from any source (see the module docstring) -> :class:`SourceModel`.

    ``img_size``: the resolution to run at (default: the source's own); position embeddings
    are resampled bicubically to it (mimlab's fixed sin-cos ones are recomputed).
    ``drop_path``: stochastic depth of the built encoder (fine-tuning). ``trust``: allow
    arbitrary pickles in mimlab checkpoints (``weights_only=False``)."""
    src = parse_source(spec)
    ck, method, base = None, None, None
    if src.kind == "mimlab":
        a, ck = _mimlab(src, trust)
        method, base = ck.get("method"), ckpt_format.model_config(ck)
    elif src.kind == "mae":
        a = _mae(src)
        method = "mae"
    elif src.kind == "mocov3":
        a = _mocov3(src)
        method = "mocov3"
    elif src.kind == "timm":
        a = _timm(src, img_size)
    else:
        a = _hf(src)
    return _assemble(src.text, src.kind, a, img_size, drop_path, method, ck, base)


def source_label(spec: str) -> str:
    """A short name for plots and tables: the run name of a mimlab checkpoint
    (``runs/<run>/checkpoints/last.pt`` -> ``<run>``), the model name or file stem otherwise."""
    src = parse_source(spec)
    if src.kind == "timm":
        return src.target
    p = Path(src.target)
    if src.kind == "mimlab" and p.parent.name == "checkpoints" and p.parent.parent.name:
        run = p.parent.parent.name
        return run if p.stem == "last" else f"{run}/{p.stem}"
    name = p.name if src.kind == "hf" else p.stem
    return name if src.kind == "mimlab" else f"{src.kind}-{name}"


__all__ = [
    "SOURCE_KINDS",
    "SOURCE_FORMS",
    "Source",
    "SourceError",
    "SourceModel",
    "is_source_spec",
    "load_encoder",
    "parse_source",
    "source_label",
]
