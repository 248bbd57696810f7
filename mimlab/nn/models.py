"""Vision Transformer encoder and MAE decoder built on timm's blocks.

The encoder's parameter names are those of ``timm.models.vision_transformer.VisionTransformer``
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i.*``, ``norm``) so a pretrained
encoder loads into ``timm.create_model`` of the same shape (see :mod:`mimlab.io.export`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import CheckpointPolicy

from ..core.config import ModelConfig, checkpointing_mode
from .ops import gather_tokens, sincos_pos_embed_2d


def init_mae_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _aten_ops(*names: str) -> frozenset:
    """The ``torch.ops.aten.<name>.default`` overloads of this torch build (missing ones
    skipped)."""
    ops = (getattr(getattr(torch.ops.aten, n, None), "default", None) for n in names)
    return frozenset(op for op in ops if op is not None)


#: ops whose outputs selective checkpointing keeps: matrix products and fused attention (the
#: expensive part of a block); everything else (LayerNorm, GELU, additions, views) is recomputed
SAVED_BY_SELECTIVE = _aten_ops(
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def keep_matmuls_policy(ctx, op, *args, **kwargs):
    """Selective-checkpointing policy: save the outputs of :data:`SAVED_BY_SELECTIVE`, recompute
    the rest in the backward pass (cheap elementwise and normalisation ops)."""
    return (
        CheckpointPolicy.MUST_SAVE
        if op in SAVED_BY_SELECTIVE
        else CheckpointPolicy.PREFER_RECOMPUTE
    )


def _selective_context():
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(keep_matmuls_policy)


def run_block(blk: nn.Module, x: torch.Tensor, checkpointing: str) -> torch.Tensor:
    """``blk(x)`` with activation checkpointing ``'off' | 'selective' | 'full'`` (as normalised
    by :func:`mimlab.core.config.checkpointing_mode`) while autograd records:

    * full: only the block input is kept; the whole block is recomputed in the backward pass
      (about one more forward of compute, least memory);
    * selective: the outputs of matmuls and attention are kept, LayerNorm / GELU / additions
      are recomputed: the GELU output (4x the width) and the LayerNorm outputs are not stored,
      about a third of a block's activations, for the cost of those cheap ops (plus a per-op
      dispatch overhead that only matters for very small models).

    The RNG state is restored for the recomputation, so drop path gives identical gradients."""
    if checkpointing == "off" or not (torch.is_grad_enabled() and x.requires_grad):
        return blk(x)
    if checkpointing == "full":
        return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
    if checkpointing == "selective":
        return torch.utils.checkpoint.checkpoint(
            blk, x, use_reentrant=False, context_fn=_selective_context
        )
    raise ValueError(
        f"unknown activation checkpointing mode {checkpointing!r} (off | selective | full)"
    )


def compile_blocks(module: nn.Module, **compile_kw) -> int:
    """``torch.compile`` every transformer :class:`Block` inside ``module`` in place
    (``nn.Module.compile``: parameter names and checkpoints unchanged) and return how many.

    The blocks are the compute of every method (encoder, MAE decoder, EMA target encoder);
    what lies between them (masking gathers, heads, losses) stays eager, so data-dependent
    parts of a method cannot break the compiled graphs (``run.compile=blocks``;
    tests/test_compile_ready.py checks that a block traces in one graph)."""
    n = 0
    for m in module.modules():
        if isinstance(m, Block):
            m.compile(**compile_kw)
            n += 1
    return n


class ViTEncoder(nn.Module):
    """ViT with fixed 2-D sin-cos position embeddings and a class token.

    Two ways to hide patches (``forward_features``):
      * ``ids_keep`` [B, K]: drop the masked tokens (MAE): only K patch tokens enter the blocks;
      * ``mask`` [B, N] (1 = masked): replace masked patch embeddings by the learnable
        ``mask_token`` before adding positions (SimMIM / C-MAE / MaskDistill).
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        mask_token: bool = True,
        grad_checkpointing: str = "off",
    ):
        super().__init__()
        self.grad_checkpointing = checkpointing_mode(grad_checkpointing)
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth, self.num_heads, self.mlp_ratio = (
            embed_dim,
            depth,
            num_heads,
            mlp_ratio,
        )
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer(
            "pos_embed",
            torch.from_numpy(sincos_pos_embed_2d(embed_dim, self.grid, cls_token=True)).unsqueeze(
                0
            ),
            persistent=True,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        dpr = [x.item() for x in torch.linspace(0, drop_path, depth)]
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i])
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    # MAE initialisation
    def _init_weights(self) -> None:
        init_mae_weights(self)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "mask_token"}

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, C, H, W] -> patch tokens with positions [B, N, D] (mask-token mode if ``mask``)."""
        t = self.patch_embed(x)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this encoder was built without a mask token")
            w = mask.to(t.dtype).unsqueeze(-1)
            t = t * (1 - w) + self.mask_token.to(t.dtype) * w
        return t + self.pos_embed[:, 1:, :].to(t.dtype)

    def forward_features(
        self,
        x: torch.Tensor,
        ids_keep: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        return_blocks: bool = False,
        apply_norm: bool = True,
    ):
        """Tokens after the final norm: [B, 1 + K (or N), D], class token first.

        ``apply_norm=False`` skips the final LayerNorm (fine-tuning replaces it by a fresh
        norm after average pooling, as MAE does).

        With ``return_blocks`` also returns the list of every block's output (before the final
        norm), each [B, 1 + K, D] -- the per-block intermediates used by CKA analysis.
        """
        if ids_keep is not None and mask is not None:
            raise ValueError("pass either ids_keep (drop tokens) or mask (mask tokens), not both")
        t = self.embed(x, mask)
        if ids_keep is not None:
            t = gather_tokens(t, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).to(t.dtype).expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1)
        blocks = []
        for blk in self.blocks:
            t = run_block(blk, t, self.grad_checkpointing)
            if return_blocks:
                blocks.append(t)
        if apply_norm:
            t = self.norm(t)
        return (t, blocks) if return_blocks else t

    @staticmethod
    def pool(tokens: torch.Tensor, kind: str = "avg") -> torch.Tensor:
        """[B, 1 + L, D] -> [B, D]: mean of patch tokens ('avg') or the class token ('cls')."""
        if kind == "avg":
            return tokens[:, 1:, :].mean(dim=1)
        if kind == "cls":
            return tokens[:, 0]
        raise ValueError(f"unknown pooling '{kind}' (avg | cls)")

    def forward(self, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        return self.pool(self.forward_features(x), pool)

    def layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: embeddings 0, block i -> i+1, rest depth+1."""
        if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder: linear embed, mask tokens, own sin-cos positions, blocks,
    norm and a linear prediction of ``out_dim`` values per patch (p*p*C for pixels)."""

    def __init__(
        self,
        grid: tuple[int, int],
        embed_dim: int,
        decoder_embed_dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        out_dim: int = 48,
        grad_checkpointing: str = "off",
    ):
        super().__init__()
        self.grad_checkpointing = checkpointing_mode(grad_checkpointing)
        self.grid = grid
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "pos_embed",
            torch.from_numpy(
                sincos_pos_embed_2d(decoder_embed_dim, grid, cls_token=True)
            ).unsqueeze(0),
        )
        self.blocks = nn.ModuleList(
            [Block(decoder_embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.pred = nn.Linear(decoder_embed_dim, out_dim)
        init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "pos_embed"}

    def forward(
        self, latent: torch.Tensor, ids_restore: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """latent [B, 1 + K, D_enc] (class token first) -> predictions [B, N, out_dim].

        With ``ids_restore`` (drop mode) the missing N-K positions are filled with the decoder's
        mask token and un-shuffled; without it ``latent`` must already hold all N patch tokens.
        """
        x = self.decoder_embed(latent)
        if ids_restore is not None:
            B, N = ids_restore.shape
            n_fill = N + 1 - x.shape[1]
            fill = self.mask_token.to(x.dtype).expand(B, n_fill, -1)
            patches = torch.cat([x[:, 1:, :], fill], dim=1)
            patches = gather_tokens(patches, ids_restore)
            x = torch.cat([x[:, :1, :], patches], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = run_block(blk, x, self.grad_checkpointing)
        x = self.norm(x)
        return self.pred(x)[:, 1:, :]


def build_encoder(
    m: ModelConfig, mask_token: bool = True, drop_path: Optional[float] = None
) -> ViTEncoder:
    return ViTEncoder(
        m.img_size,
        m.patch_size,
        m.in_chans,
        m.embed_dim,
        m.depth,
        m.num_heads,
        m.mlp_ratio,
        m.drop_path if drop_path is None else drop_path,
        mask_token,
        grad_checkpointing=m.grad_checkpointing,
    )


def build_decoder(m: ModelConfig, out_dim: Optional[int] = None) -> MAEDecoder:
    grid = (m.img_size // m.patch_size,) * 2
    return MAEDecoder(
        grid,
        m.embed_dim,
        m.decoder_embed_dim,
        m.decoder_depth,
        m.decoder_num_heads,
        m.mlp_ratio,
        out_dim or m.patch_size**2 * m.in_chans,
        grad_checkpointing=m.grad_checkpointing,
    )
