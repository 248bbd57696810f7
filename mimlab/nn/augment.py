"""Batch augmentations on the device, applied inside a method's forward (Table 5 of Kong & Zhang).

Every function takes a batch of *dataset-normalised* images ``x`` [B, C, H, W] (what the data
loader yields: ``(pixels - mean) / std``), draws its random parameters **per sample** from the
global torch RNG (seeded and checkpointed by the engine), and returns a new tensor of the same
shape, dtype and normalisation; inputs are never modified in place.

* :func:`color_jitter_batch`: SimSiam / MoCo colour augmentation, i.e. torchvision's
  ``RandomApply([ColorJitter(b, c, s, h)], p) -> RandomGrayscale(p_gray) [-> RandomSolarize]``
  with per-image factors and a per-image random order of the four jitter operations, computed
  in pixel space ([0, 1], using ``mean``/``std`` to undo and redo the normalisation; 0.5/0.5
  when unknown). Same maths as ``torchvision.transforms.v2.functional.adjust_*``, except that
  the one image statistic the jitter uses (contrast's mean grey level) can be restricted to the
  *visible* pixels (``visible``): then nothing of the masked patches leaks into the visible
  pixels of a masked view (every other operation is per pixel).
* :func:`cutmix_batch`: each image receives a random box (area ~ 1 - Beta(a, a)) pasted from
  a partner image of the batch: its neighbour (``x.roll(1, 0)``) or ``partner[b]``
  (:func:`random_partner`: a random partner other than itself, drawn per call).
* :func:`patch_mask_to_pixels`: a [B, N] patch mask as a [B, 1, H, W] pixel mask.
* :func:`random_resized_crop_batch`: per-image random resized crop (+ horizontal flip) at the
  input resolution with bilinear resampling (MoCo v3 views made on the batch).

Single-channel inputs get brightness / contrast only (no saturation, hue or grayscale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "JitterSpec",
    "SIMSIAM_JITTER",
    "MOCOV3_JITTER",
    "color_jitter_batch",
    "jitter_pixels",
    "cutmix_batch",
    "random_partner",
    "patch_mask_to_pixels",
    "random_resized_crop_batch",
    "denormalize",
    "renormalize",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "hsv_to_rgb",
]


@dataclass(frozen=True)
class JitterSpec:
    """Strengths of the colour augmentation (torchvision ``ColorJitter`` conventions:
    factors drawn from ``[max(0, 1 - s), 1 + s]``, hue shift from ``[-hue, hue]``)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p: float = 0.8  # probability of applying the colour jitter
    grayscale_p: float = 0.2  # probability of converting to grayscale (after the jitter)
    solarize_p: float = 0.0  # probability of solarising (threshold 0.5), MoCo v3 view 2


#: SimSiam / MoCo v2 recipe, used by C-MAE ("the detailed color jittering follows SimSiam")
SIMSIAM_JITTER = JitterSpec(0.4, 0.4, 0.4, 0.1, p=0.8, grayscale_p=0.2)
#: MoCo v3 recipe (saturation 0.2); its second view also solarises with p = 0.2
MOCOV3_JITTER = JitterSpec(0.4, 0.4, 0.2, 0.1, p=0.8, grayscale_p=0.2)


# ------------------------------------------------------------------------- normalisation
def _stats(x: Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
    C = x.shape[1]
    mean = [0.5] * C if mean is None else list(mean)
    std = [0.5] * C if std is None else list(std)
    if len(mean) != C or len(std) != C:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {C} channels")
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, C, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, C, 1, 1)
    return m, s


def denormalize(x: Tensor, mean=None, std=None) -> Tensor:
    """Normalised images -> pixels in [0, 1] (float32, clamped)."""
    m, s = _stats(x, mean, std)
    return (x.float() * s + m).clamp(0.0, 1.0)


def renormalize(px: Tensor, mean=None, std=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Pixels in [0, 1] -> normalised images."""
    m, s = _stats(px, mean, std)
    return ((px - m) / s).to(dtype)


def convert_normalization(x: Tensor, src: tuple, dst: tuple) -> Tensor:
    """Images normalised with ``src`` = (mean, std) -> normalised with ``dst`` (no clamping;
    ``x`` itself when the two are equal)."""
    if [list(map(float, v)) for v in src] == [list(map(float, v)) for v in dst]:
        return x
    sm, ss = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in src)
    dm, ds = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in dst)
    return (x * ss + sm - dm) / ds


# ------------------------------------------------------------------------- colour ops
def _per_sample(f: Tensor | float, x: Tensor) -> Tensor:
    if not torch.is_tensor(f):
        f = torch.tensor(float(f), device=x.device)
    return f.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) if f.ndim else f.to(x.dtype)


def rgb_to_grayscale(px: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma (ITU-R 601-2, torchvision's weights)."""
    r, g, b = px.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def adjust_brightness(px: Tensor, f: Tensor | float) -> Tensor:
    """``clamp(px * f)``; ``f`` scalar or one factor per image [B]."""
    return (px * _per_sample(f, px)).clamp(0.0, 1.0)


def adjust_contrast(px: Tensor, f: Tensor | float, weight: Optional[Tensor] = None) -> Tensor:
    """Blend with the image's mean grey level: ``clamp(f * px + (1 - f) * mean(gray))``.

    ``weight`` [B, 1, H, W] (bool / float, 1 = counts): the mean grey level is taken over these
    pixels only (the visible part of a masked view; an image without any weight falls back to
    all its pixels). None = every pixel (torchvision)."""
    gray = rgb_to_grayscale(px) if px.shape[-3] == 3 else px
    if weight is None:
        mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    else:
        w = weight.to(gray.dtype).expand_as(gray)
        den = w.sum(dim=(-3, -2, -1), keepdim=True)
        mean = torch.where(
            den > 0,
            (gray * w).sum(dim=(-3, -2, -1), keepdim=True) / den.clamp_min(1e-12),
            gray.mean(dim=(-3, -2, -1), keepdim=True),
        )
    f = _per_sample(f, px)
    return (f * px + (1.0 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(px: Tensor, f: Tensor | float) -> Tensor:
    """Blend with the grayscale image: ``clamp(f * px + (1 - f) * gray)``."""
    f = _per_sample(f, px)
    return (f * px + (1.0 - f) * rgb_to_grayscale(px)).clamp(0.0, 1.0)


def rgb_to_hsv(px: Tensor) -> Tensor:
    """[..., 3, H, W] RGB in [0, 1] -> HSV (hue in [0, 1)); torchvision's formulas."""
    r, g, b = px.unbind(dim=-3)
    maxc = px.max(dim=-3).values
    minc = px.min(dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    sel = (i.unsqueeze(-3) == torch.arange(6, device=i.device).view(-1, 1, 1)).to(hsv.dtype)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    return torch.einsum("...ijk,...xijk->...xjk", sel, torch.stack((a1, a2, a3), dim=-4))


def adjust_hue(px: Tensor, shift: Tensor | float) -> Tensor:
    """Rotate the hue by ``shift`` (in turns, [-0.5, 0.5]); scalar or one shift per image."""
    hsv = rgb_to_hsv(px)
    h = torch.remainder(hsv[..., 0, :, :] + _per_sample(shift, px).squeeze(-1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[..., 1, :, :], hsv[..., 2, :, :]), dim=-3))


def _uniform(n: int, lo: float, hi: float, device, generator=None) -> Tensor:
    return torch.rand(n, device=device, generator=generator) * (hi - lo) + lo


def jitter_pixels(
    px: Tensor,
    spec: JitterSpec = SIMSIAM_JITTER,
    visible: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Colour augmentation of pixels in [0, 1] ``[B, C, H, W]`` with per-image random parameters.

    Like torchvision's ``ColorJitter`` each image applies brightness, contrast, saturation and
    hue in its own random order (four rounds; in round r an image applies the op at position r
    of its permutation, the others an identity), all with probability ``spec.p``; then
    grayscale with ``spec.grayscale_p`` and solarisation with ``spec.solarize_p``.
    ``visible`` [B, 1, H, W]: contrast's mean grey level from these pixels only (see
    :func:`adjust_contrast`), so the output at visible pixels depends on visible pixels only.
    Draws from ``generator`` (default: the device's default generator).
    """
    g = generator
    B, C = px.shape[:2]
    dev = px.device
    px = px.float()
    rgb = C == 3
    apply = torch.rand(B, device=dev, generator=g) < spec.p

    def factor(s: float) -> Tensor:
        return _uniform(B, max(0.0, 1.0 - s), 1.0 + s, dev, g)

    f_b, f_c, f_s = factor(spec.brightness), factor(spec.contrast), factor(spec.saturation)
    f_h = _uniform(B, -spec.hue, spec.hue, dev, g)
    # per-image permutation of the ops
    order = torch.argsort(torch.rand(B, 4, device=dev, generator=g), dim=1)
    one = torch.ones(B, device=dev)
    for r in range(4):
        op = torch.where(apply, order[:, r], torch.full_like(order[:, r], -1))
        if spec.brightness > 0:
            px = adjust_brightness(px, torch.where(op == 0, f_b, one))
        if spec.contrast > 0:
            px = adjust_contrast(px, torch.where(op == 1, f_c, one), visible)
        if rgb and spec.saturation > 0:
            px = adjust_saturation(px, torch.where(op == 2, f_s, one))
        if rgb and spec.hue > 0:
            sel = (op == 3).view(B, 1, 1, 1)
            px = torch.where(sel, adjust_hue(px, f_h), px)
    if rgb and spec.grayscale_p > 0:
        gray = (torch.rand(B, device=dev, generator=g) < spec.grayscale_p).view(B, 1, 1, 1)
        px = torch.where(gray, rgb_to_grayscale(px).expand_as(px), px)
    if spec.solarize_p > 0:
        sol = (torch.rand(B, device=dev, generator=g) < spec.solarize_p).view(B, 1, 1, 1)
        px = torch.where(sol & (px >= 0.5), 1.0 - px, px)
    return px


def color_jitter_batch(
    x: Tensor,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    spec: JitterSpec = SIMSIAM_JITTER,
    visible: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Per-image colour augmentation of dataset-normalised images (see :func:`jitter_pixels`).

    ``mean``/``std``: the dataset normalisation (0.5 / 0.5 per channel when None).
    ``visible``: [B, N] patch mask (1 = visible; the grid is inferred as sqrt(N) x sqrt(N)) or
    [B, 1, H, W] pixel mask; the image statistic (mean grey) comes from those pixels only.
    """
    if visible is not None and visible.ndim == 2:
        visible = patch_mask_to_pixels(visible, x.shape[-2:])
    with torch.no_grad():
        return renormalize(
            jitter_pixels(denormalize(x, mean, std), spec, visible, generator),
            mean,
            std,
            x.dtype,
        )


def patch_mask_to_pixels(mask: Tensor, size: Sequence[int]) -> Tensor:
    """[B, N] patch mask on a square grid (row-major, as :func:`mimlab.nn.ops.patchify`) ->
    [B, 1, H, W] pixel mask of the same dtype (each patch value repeated over its pixels)."""
    B, N = mask.shape
    g = int(round(math.sqrt(N)))
    H, W = int(size[0]), int(size[1])
    if g * g != N or H % g or W % g:
        raise ValueError(
            f"patch mask with {N} patches does not tile a {H}x{W} image as a square grid"
        )
    m = mask.reshape(B, 1, g, g)  # [B, 1, g, g]
    return m.repeat_interleave(H // g, dim=2).repeat_interleave(W // g, dim=3)  # [B, 1, H, W]


# ------------------------------------------------------------------------- cutmix
def random_partner(B: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
    """[B] long: a random cutmix partner for every image, never the image itself (a random
    cyclic order of the batch: ``partner[order[i]] = order[i + 1]``); [0] for B = 1."""
    order = torch.randperm(B, device=device, generator=generator)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


def cutmix_batch(
    x: Tensor,
    alpha: float = 1.0,
    return_mask: bool = False,
    partner: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
):
    """CutMix inside the batch: image ``b`` gets a box of image ``partner[b]`` (default
    ``b - 1``, i.e. ``x.roll(1, 0)``; :func:`random_partner` draws a random one).

    Per image: ``lam ~ Beta(alpha, alpha)``, box side ``sqrt(1 - lam)`` of the image side,
    centre uniform, clipped at the border (as in the CutMix paper). Labels are not used by
    pretraining, so only images are mixed. With ``return_mask`` also returns the pasted-box mask
    [B, 1, H, W] (bool). Draws from ``generator`` (default: the device's default generator).
    """
    B, _, H, W = x.shape
    dev = x.device
    g = generator
    # lam ~ Beta(a, a): the first component of a Dirichlet(a, a) sample, as
    # torch.distributions.Beta.sample draws it (same values), with an explicit generator
    conc = torch.full((B, 2), float(alpha), device=g.device if g is not None else "cpu")
    lam = torch._sample_dirichlet(conc, generator=g)[:, 0].to(dev)  # [B]
    cut = (1.0 - lam).sqrt()
    ch, cw = (cut * H).long(), (cut * W).long()
    cy = (torch.rand(B, device=dev, generator=g) * H).long()
    cx = (torch.rand(B, device=dev, generator=g) * W).long()
    y1, y2 = (cy - ch // 2).clamp(0, H), (cy + ch // 2).clamp(0, H)
    x1, x2 = (cx - cw // 2).clamp(0, W), (cx + cw // 2).clamp(0, W)
    ys = torch.arange(H, device=dev).view(1, H, 1)
    xs = torch.arange(W, device=dev).view(1, 1, W)
    box = (
        (ys >= y1.view(B, 1, 1))
        & (ys < y2.view(B, 1, 1))
        & (xs >= x1.view(B, 1, 1))
        & (xs < x2.view(B, 1, 1))
    ).unsqueeze(1)
    src = x.roll(1, 0) if partner is None else x[partner]
    out = torch.where(box, src, x) if B > 1 else x.clone()
    return (out, box) if return_mask else out


# ------------------------------------------------------------------------- crops
def random_resized_crop_batch(
    x: Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Per-image ``RandomResizedCrop(size=(H, W), scale, ratio)`` + horizontal flip.

    Area fraction ``s ~ U(scale)``, aspect ``r ~ logU(ratio)``; box sides are clipped to the
    image (torchvision instead re-draws up to 10 times, then centre-crops); the box is resampled
    to the input size with bilinear interpolation (``grid_sample``, no antialiasing). Works on
    normalised images directly (resampling is linear). Draws from ``generator`` (default: the
    device's default generator).
    """
    B, _, H, W = x.shape
    dev = x.device
    g = generator
    s = _uniform(B, scale[0], scale[1], dev, g)
    logr = _uniform(B, math.log(ratio[0]), math.log(ratio[1]), dev, g)
    r = logr.exp()
    w = (s * r * H / W).sqrt().clamp(max=1.0)  # fraction of the width
    h = (s / r * W / H).sqrt().clamp(max=1.0)  # fraction of the height
    cx = w / 2 + torch.rand(B, device=dev, generator=g) * (1 - w)
    cy = h / 2 + torch.rand(B, device=dev, generator=g) * (1 - h)
    flip = torch.where(torch.rand(B, device=dev, generator=g) < hflip_p, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * cy - 1
    grid = F.affine_grid(theta, [B, x.shape[1], H, W], align_corners=False)
    out = F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.to(x.dtype)
