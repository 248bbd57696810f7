"""Semantic-segmentation data: image + mask pairs, their checks, and the recipe's augmentation.

Layouts (``segment.dataset``):
  * ``ade20k``: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
    ``annotations/<split>/*.png`` (``data.path`` may be that folder or its parent); mask value
    0 is "other" (ignored), 1..150 become classes 0..149;
  * ``camvid``: ``images/<split>/*.jpg`` + ``annotations/<split>/*.png``, values 0..10 are the
    11 classes and 11 (void) is ignored (the copy in ``../shared/data/camvid``);
  * ``generic``: ``segment.images`` + ``segment.masks`` folders ({split} replaced) with
    ``segment.num_classes`` and ``segment.ignore_index``.
Masks are single-channel PNGs of class ids with the image's file stem. A mask whose size differs
from its image, a missing mask, or a class id out of range stops with one line naming the file.

Items are :class:`mimlab.data.batch.Batch` with ``labels`` a long tensor [H, W] (:data:`IGNORE`
where a pixel is not scored). Training items are augmented as in mmsegmentation's ADE20K
pipeline (random rescale of a base scale, random crop that re-draws crops dominated by one
class, horizontal flip, photometric distortion, padding to the crop), seeded by (seed, epoch,
index) like every mimlab dataset.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from ..core.config import DataConfig, SegmentOptions
from .batch import Batch
from .datasets import IMG_EXTS, BadImageError, DataError, load_image, sample_seed, seeded_apply

#: label value of pixels that are not scored (same as mimlab.nn.segmentation.IGNORE)
IGNORE = -1

CAMVID_CLASSES = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign/symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
#: the usual CamVid colours (SegNet tutorial)
CAMVID_COLOURS = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
ADE_SPLITS = {"train": "training", "val": "validation", "test": "validation"}


@dataclass
class SegSource:
    """Image / mask pairs of one split and how mask values map to classes: value ``v`` is
    class ``v - offset`` (ADE20K: offset 1), ``ignore_value`` is not scored."""

    name: str
    images: list[Path]
    masks: list[Path]
    num_classes: int
    ignore_value: int
    offset: int = 0
    classes: list[str] = field(default_factory=list)
    colours: Optional[Sequence[Sequence[int]]] = None

    def to_labels(self, raw: np.ndarray) -> np.ndarray:
        """Raw mask values -> class ids (int64), :data:`IGNORE` for the ignore value."""
        lab = raw.astype(np.int64) - self.offset
        lab[raw == self.ignore_value] = IGNORE
        return lab

    def bad_value(self, raw: np.ndarray) -> Optional[int]:
        """The first mask value that is neither a class nor the ignore value, else None."""
        vals = np.unique(raw)
        bad = vals[
            (vals != self.ignore_value)
            & ((vals < self.offset) | (vals >= self.offset + self.num_classes))
        ]
        return int(bad[0]) if len(bad) else None


def detect_dataset(root: Path) -> str:
    """'ade20k' when ``root`` (or ``root/ADEChallengeData2016``) has images/training,
    'camvid' when the folder's name contains 'camvid', else 'generic'."""
    if (root / "images" / "training").is_dir() or (
        root / "ADEChallengeData2016" / "images" / "training"
    ).is_dir():
        return "ade20k"
    if "camvid" in root.resolve().name.lower():
        return "camvid"
    return "generic"


def _pairs(img_dir: Path, mask_dir: Path) -> tuple[list[Path], list[Path]]:
    if not img_dir.is_dir():
        raise DataError(f"image folder not found: {img_dir}")
    if not mask_dir.is_dir():
        raise DataError(f"mask folder not found: {mask_dir}")
    images = sorted(
        p for p in img_dir.iterdir() if p.suffix.lower() in IMG_EXTS and not p.name.startswith(".")
    )
    if not images:
        raise DataError(f"no images in {img_dir}")
    by_stem = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    masks = []
    for p in images:
        m = by_stem.get(p.stem)
        if m is None:
            raise DataError(f"{p}: no mask {mask_dir / (p.stem + '.png')}")
        masks.append(m)
    return images, masks


def scan_segmentation(data: DataConfig, seg: SegmentOptions, split: str) -> SegSource:
    """The pairs of ``split`` (a folder name such as 'train' or ADE20K's 'training')."""
    if not data.path:
        raise DataError("no dataset: pass --data PATH (ADE20K, CamVid or image + mask folders)")
    root = Path(data.path)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    kind = seg.dataset if seg.dataset != "auto" else detect_dataset(root)
    if kind == "ade20k":
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        sub = ADE_SPLITS.get(split, split)
        imgs, masks = _pairs(root / "images" / sub, root / "annotations" / sub)
        return SegSource(f"ade20k/{sub}", imgs, masks, 150, 0, offset=1)
    if kind == "camvid":
        imgs, masks = _pairs(root / "images" / split, root / "annotations" / split)
        return SegSource(
            f"camvid/{split}",
            imgs,
            masks,
            11,
            11,
            classes=list(CAMVID_CLASSES),
            colours=CAMVID_COLOURS,
        )
    if seg.num_classes is None:
        raise DataError(
            f"{root}: a generic image + mask folder needs segment.num_classes (and "
            "segment.ignore_index if its unlabelled value is not 255)"
        )
    imgs, masks = _pairs(
        root / seg.images.format(split=split), root / seg.masks.format(split=split)
    )
    ignore = 255 if seg.ignore_index is None else seg.ignore_index
    return SegSource(f"{root.name}/{split}", imgs, masks, seg.num_classes, ignore)


def read_mask(path: Path) -> np.ndarray:
    """A mask PNG as an integer array [H, W]; anything but one channel is an error."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise DataError(
                    f"{path}: mask must be a single-channel PNG of class ids, got mode {im.mode}"
                )
            return np.asarray(im).astype(np.int64)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for unreadable files
        raise DataError(f"{path}: not a readable mask ({type(e).__name__}: {e})") from None


def _size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size  # (W, H) from the header
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def check_source(src: SegSource, values: bool, progress: bool = False) -> None:
    """Stop on the first pair whose sizes differ (read from the headers) and, with
    ``values``, the first mask holding a value that is neither a class nor the ignore value
    (reads every mask)."""
    pairs = list(zip(src.images, src.masks))
    it = tqdm(pairs, desc=f"checking {src.name}", disable=not progress, mininterval=1.0)
    for img, m in it:
        (wi, hi), (wm, hm) = _size(img), _size(m)
        if (wi, hi) != (wm, hm):
            raise DataError(f"{m}: mask is {wm}x{hm} but its image {img.name} is {wi}x{hi}")
        if values:
            bad = src.bad_value(read_mask(m))
            if bad is not None:
                raise DataError(_range_msg(m, bad, src))


def _range_msg(path: Path, value: int, src: SegSource) -> str:
    lo, hi = src.offset, src.offset + src.num_classes - 1
    return (
        f"{path}: class id {value} out of range (classes {lo}..{hi}, ignore "
        f"{src.ignore_value}; set segment.num_classes / segment.ignore_index)"
    )


# ------------------------------------------------------------------------------ transforms
def rescale_size(h: int, w: int, scale: Sequence[int], ratio: float = 1.0) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest (h', w') with long side <= scale[0] * ratio and
    short side <= scale[1] * ratio."""
    long_, short = max(scale) * ratio, min(scale) * ratio
    f = min(long_ / max(h, w), short / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


def resize_labels(lab: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Nearest-neighbour resize of a label map [H, W] (long) to [h, w]."""
    if tuple(lab.shape) == (h, w):
        return lab
    out = F.interpolate(lab[None, None].float(), size=(h, w), mode="nearest")
    return out[0, 0].long()


def photometric(img: torch.Tensor) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a float image in [0, 1] of shape [3, H, W]: brightness
    (+-32/255), contrast (0.5..1.5) before or after saturation (0.5..1.5) and hue (+-18/180),
    each applied with probability 0.5 (``random`` and torch's CPU generator drive it)."""
    if random.random() < 0.5:
        img = (img + random.uniform(-32, 32) / 255).clamp(0, 1)
    contrast_first = random.random() < 0.5

    def contrast(x):
        return TF.adjust_contrast(x, random.uniform(0.5, 1.5)) if random.random() < 0.5 else x

    if contrast_first:
        img = contrast(img)
    if img.shape[0] == 3:
        if random.random() < 0.5:
            img = TF.adjust_saturation(img, random.uniform(0.5, 1.5))
        if random.random() < 0.5:
            img = TF.adjust_hue(img, random.uniform(-0.1, 0.1))
    if not contrast_first:
        img = contrast(img)
    return img


def random_crop_box(
    lab: torch.Tensor, crop: int, cat_max_ratio: float, tries: int = 10
) -> tuple[int, int]:
    """Top-left (y, x) of a crop of ``lab`` [H, W]: re-drawn up to ``tries`` times while one
    class covers more than ``cat_max_ratio`` of the crop's labelled pixels (mmseg)."""
    H, W = lab.shape
    for _ in range(tries if cat_max_ratio < 1 else 1):
        y = random.randint(0, max(H - crop, 0))
        x = random.randint(0, max(W - crop, 0))
        if cat_max_ratio >= 1:
            break
        c = lab[y : y + crop, x : x + crop]
        c = c[c != IGNORE]
        counts = torch.bincount(c.flatten()) if c.numel() else torch.zeros(0)
        if (
            len(counts) > 1
            and int((counts > 0).sum()) > 1
            and counts.max() / counts.sum() < cat_max_ratio
        ):
            break
    return y, x


class SegTrainTransform:
    """(uint8 image [C, H, W], labels [H, W]) -> (normalised crop [C, c, c], labels [c, c])."""

    def __init__(self, seg: SegmentOptions, mean, std, hflip: bool = True):
        self.crop, self.scale, self.hflip = seg.crop_size, list(seg.scale), hflip
        self.ratio_range, self.cat_max_ratio = list(seg.ratio_range), seg.cat_max_ratio
        self.photometric = seg.photometric
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, pair):
        img, lab = pair
        h, w = rescale_size(
            img.shape[1], img.shape[2], self.scale, random.uniform(*self.ratio_range)
        )
        img = TF.resize(img, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        lab = resize_labels(lab, h, w)
        y, x = random_crop_box(lab, self.crop, self.cat_max_ratio)
        img = img[:, y : y + self.crop, x : x + self.crop]
        lab = lab[y : y + self.crop, x : x + self.crop]
        if self.hflip and random.random() < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        img = img.float() / 255
        if self.photometric:
            img = photometric(img)
        img = (img - self.mean) / self.std
        ph, pw = self.crop - img.shape[1], self.crop - img.shape[2]
        if ph > 0 or pw > 0:  # pad to the crop: image 0 (after normalising), labels ignored
            img = F.pad(img, (0, pw, 0, ph), value=0.0)
            lab = F.pad(lab, (0, pw, 0, ph), value=IGNORE)
        return img.contiguous(), lab.contiguous()


class SegEvalTransform:
    """The test image resized to ``segment.scale`` (aspect kept), normalised; labels stay at
    the original resolution (predictions are resized back to them)."""

    def __init__(self, seg: SegmentOptions, mean, std):
        self.scale = list(seg.scale)
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, pair):
        img, lab = pair
        h, w = rescale_size(img.shape[1], img.shape[2], self.scale)
        img = TF.resize(img, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return ((img.float() / 255 - self.mean) / self.std).contiguous(), lab


class SegDataset(Dataset):
    """Indexable by ``int`` or ``(index, epoch)`` (:class:`mimlab.data.datasets.EpochSampler`);
    returns a :class:`Batch` with ``images`` [C, H, W] and ``labels`` [H, W] (long)."""

    def __init__(
        self,
        src: SegSource,
        transform,
        in_chans: int,
        seed: int = 0,
        indices: Optional[list[int]] = None,
        repeat: int = 1,
    ):
        self.src, self.transform, self.in_chans, self.seed = src, transform, in_chans, seed
        self.indices = list(range(len(src.images))) if indices is None else list(indices)
        self.repeat = max(1, repeat)
        if not self.indices:
            raise DataError(f"{src.name}: no image pairs")
        self.mean = self.std = None

    def __len__(self) -> int:
        return len(self.indices) * self.repeat

    @property
    def classes(self) -> list[str]:
        return self.src.classes

    def raw(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i``'s uint8 image [C, H, W] and labels [H, W] before any transform."""
        j = self.indices[i % len(self.indices)]
        img_p, m_p = self.src.images[j], self.src.masks[j]
        try:
            img = load_image(img_p, self.in_chans)
        except BadImageError as e:
            raise DataError(str(e)) from None
        raw = read_mask(m_p)
        if raw.shape != tuple(img.shape[1:]):
            raise DataError(
                f"{m_p}: mask is {raw.shape[1]}x{raw.shape[0]} but its image {img_p.name} is "
                f"{img.shape[2]}x{img.shape[1]}"
            )
        bad = self.src.bad_value(raw)
        if bad is not None:
            raise DataError(_range_msg(m_p, bad, self.src))
        return img, torch.from_numpy(self.src.to_labels(raw))

    def __getitem__(self, key):
        idx, epoch = key if isinstance(key, tuple) else (key, 0)
        pair = self.raw(idx)
        x, lab = seeded_apply(self.transform, pair, sample_seed(self.seed, epoch, idx))
        return Batch(x, lab, idx % len(self.indices), 0)


def seg_splits(
    data: DataConfig,
    seg: SegmentOptions,
    in_chans: int,
    seed: int,
    mean,
    std,
    progress: bool = False,
) -> tuple[SegDataset, SegDataset]:
    """(train, val) datasets of ``data.train_split`` / ``data.val_split``, both checked
    (:func:`check_source`); ``data.hflip`` turns the random flip on; ``data.limit`` /
    ``data.val_limit`` take seeded subsets, ``data.repeat`` repeats the training pairs."""
    tr_src = scan_segmentation(data, seg, data.train_split)
    va_src = scan_segmentation(data, seg, data.val_split)
    sseed = seed if data.subset_seed is None else data.subset_seed
    tr_idx = va_idx = None
    if data.limit is not None and data.limit < len(tr_src.images):
        tr_idx = sorted(np.random.default_rng(sseed).choice(len(tr_src.images), data.limit, False))
    if data.val_limit is not None and data.val_limit < len(va_src.images):
        va_idx = sorted(
            np.random.default_rng(sseed + 1).choice(len(va_src.images), data.val_limit, False)
        )
    for src, idx in ((tr_src, tr_idx), (va_src, va_idx)):
        sub = src if idx is None else _subset(src, idx)
        check_source(sub, seg.check_masks, progress)
    train = SegDataset(
        tr_src, SegTrainTransform(seg, mean, std, data.hflip), in_chans, seed, tr_idx, data.repeat
    )
    val = SegDataset(va_src, SegEvalTransform(seg, mean, std), in_chans, seed, va_idx)
    for ds in (train, val):
        ds.mean, ds.std = list(mean), list(std)
    return train, val


def _subset(src: SegSource, idx: Sequence[int]) -> SegSource:
    return SegSource(
        src.name,
        [src.images[i] for i in idx],
        [src.masks[i] for i in idx],
        src.num_classes,
        src.ignore_value,
        src.offset,
        src.classes,
        src.colours,
    )


def steps_for(iters: int, n: int, batch: int, world: int = 1) -> tuple[int, int]:
    """(steps per epoch, epochs) that reach ``iters`` optimizer steps on ``n`` items."""
    spe = (n // world) // batch
    if spe < 1:
        raise DataError(
            f"{n} training images are fewer than one batch of {batch}; lower "
            "optim.batch_size or raise data.repeat"
        )
    return spe, math.ceil(iters / spe)
