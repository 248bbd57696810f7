"""Training FLOPs per image of every method: analytic, and checked against a FLOP counter.

Convention (that of :class:`torch.utils.flop_counter.FlopCounterMode`): one multiply-add is 2
FLOPs, and only matrix products, convolutions and attention count (LayerNorm, GELU, softmax,
losses' element-wise parts and the optimizer are not FLOPs here). Forward FLOPs per image:

* transformer block, T tokens of width D, MLP hidden h = int(r D) (timm ``Block``):
  matmuls ``2 T D (4 D + 2 h)`` = ``2 T (4 + 2r) D^2`` (qkv 3D, proj D, fc1 and fc2 r D each),
  plus attention ``4 T^2 D`` (Q K^T and softmax(.) V, summed over the heads);
* patch embedding: a p x p stride-p convolution, ``2 N p^2 C D`` for N patches of C channels;
* MAE decoder: ``decoder_embed`` ``2 T_enc D D_d``, blocks on the N + 1 tokens of width D_d,
  ``pred`` ``2 (N + 1) D_d out`` (it runs on the class token too);
* linear head: ``2 N D out``; projector / predictor (2-layer MLP): ``2 M (d_in h + h d_out)``;
* InfoNCE logits (C-MAE position negatives): ``2 N B_k D'`` per image (B_k keys per
  position), instance-wise ``2 B_k D'``; BYOL has no matrix product;
* colour jitter's hue step (a 6-way one-hot selection written as an einsum): ``144 H W`` per
  jittered RGB view (4 rounds x 3 x 6 multiply-adds per pixel); HOG (MaskFeat): the 3 x 3
  Sobel pair, ``36 C H W``.

Training = forward + backward. The backward of a matrix product whose input needs a gradient is
2 x its forward (input and weight gradients); of the patch embedding (the image needs no
gradient) and of the InfoNCE logits (the EMA keys need none) 1 x; of attention 2.5 x (FlashAttention
recomputes the scores: 5 batched products against 2, ``torch.utils.flop_counter``'s
``sdpa_backward_flop_count``). Passes without gradients (EMA / frozen targets, target
projector) cost their forward only. ``model.grad_checkpointing=full`` recomputes each block's
forward once more in the backward pass, except its last product (fc2: torch's checkpoint stops
once every saved tensor is back); ``selective`` keeps the matmul and attention outputs (no
extra counted FLOPs).

Worked example, MAE at ``mini`` (N = 64 patches, 16 kept: T = 17 encoder tokens of D = 128, 6
blocks; decoder on 65 tokens of 96, 1 block): encoder 125.0 M + decoder 51.9 M = 176.9 MFLOPs
per image, equal to the counter's figure (``mimlab flops``).

Frozen network teachers (MaskDistill's EfficientNet-Lite0, timm / CLIP / mimlab teachers) are
**counted** with ``FlopCounterMode`` on one image instead of derived by hand; the breakdown
lists them under ``counted``. Teacher features cached with ``method.cache_teacher`` cost the
teacher once per image, not once per epoch: not modelled.

Not counted by the counter either: the ``affine_grid`` of MoCo v3's crops (``12 H W`` per
view), element-wise work. On CPU, torch's counter has no formula for
``_scaled_dot_product_flash_attention_for_cpu``: :func:`measured_train_flops_per_image`
registers torch's own attention formulas for it (``ATTENTION_FORMULAS``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..core.config import (
    METHOD_PRESETS,
    ConfigError,
    ModelConfig,
    PretrainConfig,
    checkpointing_mode,
    resolve,
)
from ..methods import build_method, is_siamese  # importing methods registers source teachers
from ..nn.augment import MOCOV3_JITTER, SIMSIAM_JITTER
from ..nn.ops import num_visible
from ..nn.teachers import build_teacher

#: backward / forward FLOP ratios (see the module docstring)
BACKWARD_MATMUL = 2.0  # input and weight gradients
BACKWARD_ONE_OPERAND = 1.0  # only one operand needs a gradient (patch embedding, InfoNCE)
BACKWARD_ATTENTION = 2.5  # FlashAttention backward: recompute scores + 4 products
PARTS = ("encoder", "decoder", "heads", "target", "loss", "augment")


# ------------------------------------------------------------------------- primitives
def linear_flops(tokens: float, d_in: int, d_out: int) -> float:
    """Forward FLOPs of a linear layer on ``tokens`` rows: ``2 T d_in d_out``."""
    return 2.0 * tokens * d_in * d_out


def block_matmul_flops(tokens: float, dim: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs of one transformer block's forward on T tokens of width D:
    ``2 T D (4 D + 2 h)``, h = int(r D), i.e. ``2 T (4 + 2r) D^2``."""
    return 2.0 * tokens * dim * (4 * dim + 2 * int(dim * mlp_ratio))


def attention_flops(tokens: float, dim: int) -> float:
    """Attention FLOPs of one block's forward: ``4 T^2 D`` (Q K^T and A V over all heads)."""
    return 4.0 * tokens * tokens * dim


def block_flops(tokens: float, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one transformer block: ``2 T (4 + 2r) D^2 + 4 T^2 D``."""
    return block_matmul_flops(tokens, dim, mlp_ratio) + attention_flops(tokens, dim)


def patch_embed_flops(num_patches: int, patch_size: int, in_chans: int, dim: int) -> float:
    """Forward FLOPs of the patch embedding (stride-p p x p convolution): ``2 N p^2 C D``."""
    return 2.0 * num_patches * patch_size**2 * in_chans * dim


def mlp_head_flops(tokens: float, d_in: int, hidden: int, d_out: int) -> float:
    """Forward FLOPs of a 2-layer MLP head on ``tokens`` rows: ``2 M (d_in h + h d_out)``."""
    return linear_flops(tokens, d_in, hidden) + linear_flops(tokens, hidden, d_out)


def hue_jitter_flops(height: int, width: int) -> float:
    """FLOPs of one colour-jittered RGB view counted by the FLOP counter: the hue step's
    one-hot einsum, 4 rounds x 2 x 3 x 6 per pixel = ``144 H W``."""
    return 144.0 * height * width


def hog_flops(in_chans: int, height: int, width: int) -> float:
    """HOG target (MaskFeat): two 3 x 3 Sobel filters per channel, ``2 x 2 x 9 C H W``."""
    return 36.0 * in_chans * height * width


# ------------------------------------------------------------------------- passes
@dataclass(frozen=True)
class Pass:
    """One piece of a training step, forward FLOPs per image by backward rule.

    ``matmul``: products whose input needs a gradient; ``one_operand``: products where only one
    operand does (patch embedding, InfoNCE logits); ``attention``: attention products;
    ``recompute``: forward FLOPs redone in the backward by full activation checkpointing;
    ``grad``: False for passes without gradients (their forward only counts)."""

    part: str
    what: str
    matmul: float = 0.0
    one_operand: float = 0.0
    attention: float = 0.0
    recompute: float = 0.0
    grad: bool = True

    @property
    def forward(self) -> float:
        return self.matmul + self.one_operand + self.attention

    @property
    def train(self) -> float:
        """Forward + backward FLOPs per image."""
        if not self.grad:
            return self.forward
        return (
            self.matmul * (1 + BACKWARD_MATMUL)
            + self.one_operand * (1 + BACKWARD_ONE_OPERAND)
            + self.attention * (1 + BACKWARD_ATTENTION)
            + self.recompute
        )


def _blocks(tokens: float, dim: int, depth: int, m: ModelConfig, grad: bool) -> dict:
    mat, att = (
        depth * block_matmul_flops(tokens, dim, m.mlp_ratio),
        depth * attention_flops(tokens, dim),
    )
    # full checkpointing redoes each block's forward up to its last saved tensor: torch's
    # non-reentrant checkpoint stops early, before the final MLP product (fc2)
    fc2 = depth * linear_flops(tokens, int(dim * m.mlp_ratio), dim)
    full = grad and checkpointing_mode(m.grad_checkpointing) == "full"
    return dict(matmul=mat, attention=att, recompute=mat - fc2 + att if full else 0.0)


def encoder_pass(m: ModelConfig, tokens: int, grad: bool, what: str, part: str = "encoder") -> Pass:
    """ViT encoder on ``tokens`` tokens (class token included); the patch embedding always
    runs on all N patches (tokens are dropped after it)."""
    N = (m.img_size // m.patch_size) ** 2
    return Pass(
        part,
        f"{what}: {tokens} tokens",
        one_operand=patch_embed_flops(N, m.patch_size, m.in_chans, m.embed_dim),
        grad=grad,
        **_blocks(tokens, m.embed_dim, m.depth, m, grad),
    )


def decoder_pass(m: ModelConfig, enc_tokens: int, out_dim: int, what: str) -> Pass:
    """MAE decoder (with gradients): embed the encoder's ``enc_tokens`` tokens, blocks and
    prediction on all N + 1 tokens."""
    N1 = (m.img_size // m.patch_size) ** 2 + 1
    Dd = m.decoder_embed_dim
    b = _blocks(N1, Dd, m.decoder_depth, m, True)
    b["matmul"] += linear_flops(enc_tokens, m.embed_dim, Dd) + linear_flops(N1, Dd, out_dim)
    return Pass("decoder", f"{what}: {enc_tokens} -> {N1} tokens", **b)


@functools.lru_cache(maxsize=16)
def _counted_teacher(
    spec: str, teacher_size: Optional[int], chans: int, size: int
) -> tuple[float, int]:
    kw = {} if teacher_size is None else {"teacher_size": teacher_size}
    try:
        teacher = build_teacher(spec, [0.5] * chans, [0.5] * chans, **kw)
    except ValueError as e:
        raise ConfigError(f"method.teacher: {e}") from None
    with FlopCounterMode(display=False) as fc:
        teacher(torch.zeros(1, chans, size, size), (1, 1))  # [1, C, H, W] -> [1, 1, out_dim]
    return float(fc.get_total_flops()), int(teacher.out_dim)


def teacher_forward_flops(cfg: PretrainConfig) -> tuple[float, int, bool]:
    """Masked-prediction target computed without gradients: (forward FLOPs per image, feature
    width, whether the FLOPs were counted with FlopCounterMode (frozen networks) rather than
    derived (HOG))."""
    m, mc = cfg.method, cfg.model
    spec = "hog" if m.target == "hog" else m.teacher.strip()
    if spec.lower().split(":")[0] == "hog" and "@" not in spec:
        return hog_flops(mc.in_chans, mc.img_size, mc.img_size), mc.in_chans * 9 * 4, False
    fl, out = _counted_teacher(spec, m.teacher_size, mc.in_chans, mc.img_size)
    return fl, out, True


def _jitter_views(color_jitter: str, siamese_views: int) -> int:
    if color_jitter == "none":
        return 0
    return siamese_views if color_jitter == "after_mask" else 1


def _masked_passes(cfg: PretrainConfig) -> tuple[list[Pass], list[str]]:
    """MaskedPrediction (MAE, SimMIM, MaskFeat, MaskDistill, data2vec): the student with
    gradients (1 + K tokens when masked tokens are dropped, N + 1 with mask tokens), a target
    without gradients (EMA encoder on the full image, frozen teacher, HOG; pixels cost none)
    and the head (MAE decoder or a linear layer on the N patch tokens)."""
    m, mc = cfg.method, cfg.model
    N = (mc.img_size // mc.patch_size) ** 2
    pix = mc.patch_size**2 * mc.in_chans
    if m.mask == "none" or m.student == "mask_token":
        K = N
    elif m.mask == "block":
        K = N - int(round(m.mask_ratio * N))
    else:
        K = num_visible(N, m.mask_ratio)
    passes = [encoder_pass(mc, 1 + K, True, f"student ({m.student})")]
    counted: list[str] = []
    out = pix
    if m.target == "ema":
        out = mc.embed_dim
        passes.append(encoder_pass(mc, N + 1, False, "EMA target encoder, full image", "target"))
    elif m.target in ("teacher", "hog"):
        fl, out, was_counted = teacher_forward_flops(cfg)
        name = m.teacher if m.target == "teacher" else "hog"
        passes.append(
            Pass(
                "target",
                f"frozen teacher {name}" + (" (counted)" if was_counted else ""),
                matmul=fl,
                grad=False,
            )
        )
        if was_counted:
            counted.append("target")
    if m.head == "decoder":
        if m.student != "drop":
            raise ConfigError("method.head=decoder needs method.student=drop")
        passes.append(decoder_pass(mc, 1 + K, out, "MAE decoder"))
    else:
        passes.append(
            Pass("heads", f"linear head on {N} tokens", matmul=linear_flops(N, mc.embed_dim, out))
        )
    return passes, counted


def _view_visible(cfg: PretrainConfig) -> tuple[int, int]:
    """Patches each siamese view shows (N when it is not masked)."""
    m, N = cfg.method, (cfg.model.img_size // cfg.model.patch_size) ** 2
    if m.mask == "none":
        return N, N
    v1 = N - int(round(m.mask_ratio * N)) if m.mask == "block" else num_visible(N, m.mask_ratio)
    if m.view2 == "complement":
        return v1, N - v1
    if m.view2 == "independent":
        return v1, num_visible(N, m.view2_mask_ratio)
    return v1, N


def _queries(cfg: PretrainConfig, vis: tuple[int, int], q: int) -> float:
    """Token-wise query positions per image when view ``q`` is online (0: T1, 1: T2): exact for
    complementary and unmasked views, the expectation for two independent random masks."""
    m, N = cfg.method, (cfg.model.img_size // cfg.model.patch_size) ** 2
    mask_token = m.student == "mask_token"
    if m.mask == "none" or (mask_token and m.queries == "all"):
        return float(N)
    own = N - vis[q] if mask_token else vis[q]  # removed (mask tokens) / seen (drop) by q
    if m.view2 == "complement":  # the key view sees exactly what q removes
        return float(own if mask_token else 0)
    if vis[1 - q] == N:  # the key view is unmasked
        return float(own)
    if vis[q] == N:  # the query view is unmasked
        return float(0 if mask_token else vis[1 - q])
    return own * vis[1 - q] / N


def _loss_flops(cfg: PretrainConfig, queries: float, batch: int) -> tuple[float, float]:
    """InfoNCE logits per image and direction: (forward FLOPs, FLOPs recomputed in the
    backward by the activation-checkpointed chunks of ``negatives=batch``)."""
    m, N = cfg.method, (cfg.model.img_size // cfg.model.patch_size) ** 2
    d = m.proj_dim or cfg.model.embed_dim
    if m.loss != "infonce":
        return 0.0, 0.0
    if m.tokens in ("cls", "avg"):
        return linear_flops(1, d, batch), 0.0
    joint = m.tokens == "patch+cls" and m.cls_term == "joint"
    P, M = N + joint, queries + joint
    redo = 0.0
    if m.negatives == "position":
        fl = 2.0 * P * batch * d
    elif m.negatives == "image":
        fl = 2.0 * P * P * d
    else:
        fl = 2.0 * M * batch * M * d
        redo = fl if batch * M > m.nce_chunk else 0.0
    if m.tokens == "patch+cls" and not joint:
        fl += linear_flops(1, d, batch)
    return fl, redo


def _siamese_passes(cfg: PretrainConfig, batch: int) -> list[Pass]:
    """R-MAE: encoder and shared decoder on both views, all with gradients. C-MAE / MoCo v3
    (per direction; two when symmetric): online encoder + projector + predictor with
    gradients, EMA target encoder + target projector forward only, InfoNCE logits."""
    m, mc = cfg.method, cfg.model
    N = (mc.img_size // mc.patch_size) ** 2
    vis = _view_visible(cfg)
    tok = [N + 1 if m.student == "mask_token" else 1 + v for v in vis]
    passes: list[Pass] = []
    if m.target == "online":  # R-MAE: both views through encoder and shared decoder
        for i in (0, 1):
            passes.append(encoder_pass(mc, tok[i], True, f"encoder on T{i + 1}"))
            passes.append(
                decoder_pass(mc, tok[i], mc.patch_size**2 * mc.in_chans, f"decoder on T{i + 1}")
            )
        return passes
    D = mc.embed_dim
    hidden = m.proj_hidden or max(1, round(2048 * D / 768))
    out = m.proj_dim or D
    for q, k in ((0, 1), (1, 0)) if m.symmetric else ((0, 1),):
        passes.append(encoder_pass(mc, tok[q], True, f"online encoder on T{q + 1}"))
        passes.append(encoder_pass(mc, tok[k], False, f"EMA target encoder on T{k + 1}", "target"))
        M = 1.0 if m.tokens in ("cls", "avg") else _queries(cfg, vis, q) + (m.tokens == "patch+cls")
        # token-wise heads run on every position (fixed shapes, no data-dependent selection:
        # the loss then keeps the query positions), so they cost N (+ cls) tokens
        H = 1.0 if m.tokens in ("cls", "avg") else float(N + (m.tokens == "patch+cls"))
        passes.append(
            Pass(
                "heads",
                f"projector + predictor on {H:g} tokens",
                matmul=mlp_head_flops(H, D, hidden, out) + mlp_head_flops(H, out, hidden, out),
            )
        )
        passes.append(
            Pass(
                "target",
                f"EMA target projector on {H:g} tokens",
                matmul=mlp_head_flops(H, D, hidden, out),
                grad=False,
            )
        )
        loss, redo = _loss_flops(cfg, M - (m.tokens == "patch+cls"), batch)
        if loss:
            passes.append(
                Pass("loss", f"{m.loss} logits, {batch} keys", one_operand=loss, recompute=redo)
            )
    return passes


def train_passes(cfg: PretrainConfig, batch: Optional[int] = None) -> tuple[list[Pass], list[str]]:
    """The passes one training step of ``cfg`` runs, per image (see :func:`train_flops_per_image`)
    and the parts that were counted rather than derived."""
    m, mc = cfg.method, cfg.model
    batch = batch or cfg.optim.batch_size
    if is_siamese(cfg):
        passes, counted = _siamese_passes(cfg, batch), []
        jittered = _jitter_views(m.color_jitter, 2)
        spec = MOCOV3_JITTER if m.view2 == "crop" else SIMSIAM_JITTER
    else:
        passes, counted = _masked_passes(cfg)
        jittered = _jitter_views(m.color_jitter, 1)
        spec = SIMSIAM_JITTER
    if jittered and mc.in_chans == 3 and spec.hue > 0:
        passes.append(
            Pass(
                "augment",
                f"colour jitter (hue) x {jittered} views",
                matmul=jittered * hue_jitter_flops(mc.img_size, mc.img_size),
                grad=False,
            )
        )
    return passes, counted


def train_flops_per_image(cfg: PretrainConfig, batch: Optional[int] = None) -> dict[str, Any]:
    """Analytic training FLOPs (forward + backward) per image of one step of ``cfg``.

    ``batch``: keys per InfoNCE logit row (the global batch; default ``optim.batch_size``);
    only contrastive losses depend on it. Returns ``{encoder, decoder, heads, target, loss,
    augment, total}`` in FLOPs per image, ``forward`` (the forward FLOPs of all passes),
    ``counted`` (parts measured with FlopCounterMode instead of derived: a frozen network
    teacher) and ``passes`` (one line per pass: part, what, training FLOPs)."""
    passes, counted = train_passes(cfg, batch)
    out: dict[str, Any] = {p: 0.0 for p in PARTS}
    for p in passes:
        out[p.part] += p.train
    out["total"] = sum(out[p] for p in PARTS)
    out["forward"] = sum(p.forward for p in passes)
    out["counted"] = counted
    out["passes"] = [
        f"{p.part}: {p.what}{'' if p.grad else ' (no grad)'}: {p.train:.4g}" for p in passes
    ]
    return out


# ------------------------------------------------------------------------- counter
def _attn_fwd(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    b, h, s_q, d = q_shape
    return 2 * b * h * s_q * k_shape[2] * d + 2 * b * h * s_q * k_shape[2] * v_shape[3]


def _attn_bwd(g_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return int(_attn_fwd(q_shape, k_shape, v_shape) * BACKWARD_ATTENTION)


#: the CPU fused attention ops that ``FlopCounterMode`` has no formula for, with the formulas
#: torch uses for the CUDA ones (forward 2 products, backward 5)
ATTENTION_FORMULAS = {
    op: f
    for name, f in (
        ("_scaled_dot_product_flash_attention_for_cpu", _attn_fwd),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _attn_bwd),
    )
    if (op := getattr(torch.ops.aten, name, None)) is not None
}


def measured_train_flops_per_image(
    cfg: PretrainConfig, batch: Union[int, torch.Tensor] = 4, seed: int = 0
) -> float:
    """FLOPs per image counted by ``FlopCounterMode`` (plus :data:`ATTENTION_FORMULAS`) around
    one forward + backward of ``build_method(cfg)`` in training mode on ``batch`` (images
    [B, C, H, W], or a batch size for seeded random images)."""
    mc = cfg.model
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        x = (
            batch
            if isinstance(batch, torch.Tensor)
            else torch.randn(batch, mc.in_chans, mc.img_size, mc.img_size)
        )  # [B, C, H, W]
        method = build_method(cfg).train()
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as fc:
            method(x)["loss"].backward()
    return fc.get_total_flops() / x.shape[0]


# ------------------------------------------------------------------------- comparisons
def preset_config(
    method: str, preset: str = "mini", overrides: Sequence[str] = ()
) -> PretrainConfig:
    """The resolved config of method preset ``method`` at model preset ``preset``."""
    if method not in METHOD_PRESETS:
        raise ConfigError(f"unknown method '{method}'; choose from {', '.join(METHOD_PRESETS)}")
    return resolve(
        PretrainConfig, overrides=[f"model.preset={preset}", f"method.name={method}", *overrides]
    )


def compute_matched_epochs(
    method: str, mae_epochs: float, preset: str = "mini", batch: Optional[int] = None
) -> float:
    """Epochs of ``method`` that cost the training FLOPs of ``mae_epochs`` epochs of MAE at
    model preset ``preset`` (analytic, per image): ``mae_epochs * F_mae / F_method``."""
    f = train_flops_per_image(preset_config(method, preset), batch)["total"]
    f_mae = train_flops_per_image(preset_config("mae", preset), batch)["total"]
    return mae_epochs * f_mae / f


def flops_table(
    preset: str = "mini", methods: Optional[Sequence[str]] = None, batch: int = 8
) -> list[dict[str, Any]]:
    """One row per method: analytic breakdown, counted FLOPs per image (one step of ``batch``
    random images), ``ratio`` = analytic / counted over the parts derived by formula (a counted
    teacher is left out of both sides, so the check is never circular; ``ratio_total`` keeps
    it), and the analytic total relative to MAE."""
    methods = list(methods or METHOD_PRESETS)
    configs = {name: preset_config(name, preset) for name in methods}  # fail before counting
    f_mae = train_flops_per_image(preset_config("mae", preset), batch)["total"]
    rows = []
    for name, cfg in configs.items():
        ana = train_flops_per_image(cfg, batch)
        counted = measured_train_flops_per_image(cfg, batch)
        by_counter = sum(ana[p] for p in ana["counted"])
        rows.append(
            {
                "method": name,
                "analytic": ana["total"],
                "counted": counted,
                "ratio": (ana["total"] - by_counter) / (counted - by_counter),
                "ratio_total": ana["total"] / counted,
                "relative_to_mae": ana["total"] / f_mae,
                "counted_parts": ana["counted"],
                "breakdown": ana,
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`flops_table` rows (MFLOPs per image)."""
    lines = [
        "| method | analytic MFLOP/img | counted MFLOP/img | analytic / counted | x MAE |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        star = " (*)" if r["counted_parts"] else ""
        lines.append(
            f"| {r['method']}{star} | {r['analytic'] / 1e6:,.1f} | "
            f"{r['counted'] / 1e6:,.1f} | {r['ratio']:.4f} | "
            f"{r['relative_to_mae']:.2f} |"
        )
    if any(r["counted_parts"] for r in rows):
        lines.append(
            "\n(*) the frozen teacher's forward is counted with FlopCounterMode, not "
            "derived; it is in both totals, and the ratio compares the rest."
        )
    return "\n".join(lines)


def run_cli(
    preset: str = "mini",
    methods: Optional[str] = None,
    batch: int = 8,
    json_out: Optional[str] = None,
) -> int:
    """``mimlab flops``: print the table of :func:`flops_table` (``methods``: comma-separated
    preset names, default all) and optionally write it with every breakdown as JSON."""
    names = [s.strip() for s in methods.split(",") if s.strip()] if methods else None
    if batch < 2:
        raise ConfigError(f"--batch must be >= 2 (BatchNorm heads need two images), got {batch}")
    rows = flops_table(preset, names, batch)
    print(
        f"training FLOPs per image (forward + backward), model preset {preset}, counted on "
        f"one step of {batch} random images; 1 multiply-add = 2 FLOPs"
    )
    print(format_table(rows))
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "preset": preset,
            "batch": batch,
            "torch": torch.__version__,
            "convention": "FLOPs per image of one forward + backward; 1 multiply-add = 2 "
            "FLOPs; matrix products, convolutions and attention only "
            "(torch.utils.flop_counter); analytic from mimlab/analysis/flops.py",
            "command": f"mimlab flops --preset {preset} --batch {batch}"
            + (f" --methods {methods}" if methods else ""),
            "rows": rows,
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
