"""Datasets by path, transforms, deterministic samplers and robust image loading.

Kinds (``data.kind``; ``auto`` detects):
  * ``imagefolder``: ``root/<class>/*.jpg`` (labelled);
  * ``folder``: any folder of images, searched recursively (unlabelled, label -1); ``.npy``
    arrays [H, W, C] are accepted too, so any channel count works end to end;
  * ``fmnist``: Fashion-MNIST IDX files (``train-images-idx3-ubyte.gz`` ...), 1 channel;
  * ``photos``: natural photos bundled with scikit-image (``builtin:photos`` or
    ``builtin:photos:astronaut``), for single-image pretraining and offline demos;
  * ``wds``: WebDataset tar shards (``mimlab shards`` writes them), streamed by
    :class:`mimlab.data.shards.ShardStream`: each rank and worker reads its own part of the epoch;
  * ``hf``: a Hugging Face ``datasets`` dataset on disk (``save_to_disk`` folder, parquet, ...),
    random access like an image folder.
If ``path/<train_split>`` exists it is used as the training root (CIFAR-10 copies have
``train/`` and ``test/``).

Every sample's augmentation is seeded by (seed, epoch, index), so a run is reproducible
whatever the number of workers or processes, and resumes exactly mid-epoch.

Bad data: unusual but valid images (grayscale, RGBA, palette, CMYK, 16-bit, tiny) are
converted; unreadable files (corrupt, truncated, empty, not images, decompression bombs) raise
:class:`BadImageError` naming the file, which ``data.on_bad=skip`` (default) turns into "use the
next readable file and count it"; missing or empty folders raise :class:`DataError`.
"""

from __future__ import annotations

import gzip
import io
import logging
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2 as T

from ..core.config import DataConfig
from .batch import Batch
from .shards import (
    IMAGE_EXTS,
    INFO_FILE,
    HFSplit,
    ShardError,
    ShardSplit,
    ShardStream,
    find_shard_split,
    is_hf_dir,
    is_shard_dir,
    open_hf_split,
    write_info,
    write_shards,
)

log = logging.getLogger("mimlab.data")

IMG_EXTS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".npy",
}
KNOWN_STATS = {
    # measured on the JPEG CIFAR-10 copy's training split with `mimlab stats`
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "fmnist": ([0.2860], [0.3530]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")


class DataError(RuntimeError):
    """A problem with the user's data, with a message saying what to do."""


class BadImageError(DataError):
    """One file could not be read as an image."""


# ------------------------------------------------------------------------------ loading
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_warned_truncated = False


def _scale_to_uint8(a: np.ndarray, p: str | Path) -> np.ndarray:
    """Any numeric pixel array -> uint8 in 0..255 (same shape).

    uint8 as is; bool x255; uint16 (16-bit images) /257, so 65535 -> 255; other integers
    are kept when they fit in 0..255, else scaled from 0..65535 (or 0..max when larger);
    floats in [0, 1] x255, other floats clipped to 0..255. NaN/inf raise BadImageError.
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    kind = a.dtype.kind
    if kind not in "iuf":
        raise BadImageError(f"{p}: unsupported pixel type {a.dtype}")
    if a.size == 0:
        raise BadImageError(f"{p}: image has no pixels (shape {a.shape})")
    is_u16 = a.dtype == np.uint16
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise BadImageError(f"{p}: contains NaN or infinite values")
    hi = float(a.max())
    if is_u16:
        a = a / 257.0
    elif kind == "f":
        a = a * 255.0 if float(a.min()) >= 0 and hi <= 1 else a
    elif hi > 255:
        a = a * (255.0 / (65535.0 if hi <= 65535 else hi))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _pil_to_array(im: Image.Image, in_chans: int, p: str | Path) -> np.ndarray:
    """Decoded PIL image of any mode -> uint8 array [H, W, in_chans] (1, 3 or 4)."""
    mode = im.mode
    if mode in _HIGH_BIT_MODES:
        # 16-bit / 32-bit / float grey: scale to 8 bits ourselves (PIL's convert() clips
        # them to 255, which turns most of a 16-bit image white)
        g = _scale_to_uint8(np.asarray(im), p)[..., None]
        if in_chans == 1:
            return g
        rgb = np.repeat(g, 3, axis=2)
        return rgb if in_chans == 3 else np.concatenate([rgb, np.full_like(g, 255)], axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the palette's transparency, as PIL recommends
    target = {1: "L", 3: "RGB", 4: "RGBA"}[in_chans]
    if im.mode != target:
        im = im.convert(target)
    a = np.array(im)  # a writable copy
    return a[..., None] if a.ndim == 2 else a


def _load_npy(f, p: str) -> np.ndarray:
    a = np.load(f, allow_pickle=False)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise BadImageError(f"{p}: array must be [H, W, C], got shape {a.shape}")
    return _scale_to_uint8(a, p)


def load_image(path: str | Path, in_chans: int) -> torch.Tensor:
    """Read one image file as a uint8 tensor [in_chans, H, W] (see :func:`decode_image_bytes`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise BadImageError(f"{p}: not a readable image ({type(e).__name__}: {e})") from None
    return decode_image_bytes(data, p.suffix, in_chans, str(p))


def decode_image_bytes(data: bytes, ext: str, in_chans: int, name: str) -> torch.Tensor:
    """Decode one encoded image (a file's bytes; ``ext`` 'npy' / '.npy' means a numpy array,
    anything else is left to PIL) as a uint8 tensor [in_chans, H, W]; ``name`` is used in errors.

    Grayscale, RGB, RGBA, palette, CMYK, 16-bit and float images are converted to the requested
    channel count (1: luminance; 3: RGB, alpha dropped; 4: RGBA). Other counts need ``.npy``
    files [H, W, C] with that many channels ([H, W] and 1-channel arrays are repeated).
    16-bit pixels are scaled (65535 -> 255), not clipped; see :func:`_scale_to_uint8` for
    ``.npy`` dtypes. Raises :class:`BadImageError` naming the file on anything unreadable:
    missing, empty, corrupt, truncated (PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at
    its default, False, so a cut-off file is an error rather than a partly grey image),
    a decompression bomb, or a channel count that cannot be converted.
    """
    global _warned_truncated
    p = name
    try:
        if ext.lower().lstrip(".") == "npy":
            a = _load_npy(io.BytesIO(data), p)
        else:
            if len(data) == 0:
                raise BadImageError(f"{p}: empty file (0 bytes)")
            if in_chans not in (1, 3, 4):
                raise BadImageError(
                    f"{p}: cannot make {in_chans} channels from an image file; "
                    f"store such data as .npy [H, W, {in_chans}]"
                )
            if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated:
                _warned_truncated = True
                log.warning(
                    "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by other code: "
                    "truncated images will load partly grey instead of being reported"
                )
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                a = _pil_to_array(im, in_chans, p)
    except BadImageError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError,
        # zlib.error, struct.error, EOFError, DecompressionBombError ...: all mean "unreadable"
        raise BadImageError(f"{p}: not a readable image ({type(e).__name__}: {e})") from None
    if a.shape[2] != in_chans:
        if a.shape[2] == 1:
            a = np.repeat(a, in_chans, axis=2)
        else:
            hint = (
                " (it looks like [C, H, W]; store arrays as [H, W, C])"
                if a.shape[0] == in_chans
                else ""
            )
            raise BadImageError(
                f"{p}: has {a.shape[2]} channels, model.in_chans is {in_chans}{hint}"
            )
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise BadImageError(f"{p}: image has no pixels ({a.shape[0]}x{a.shape[1]})")
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------ sources
def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMG_EXTS and not p.name.startswith(".")


@dataclass
class Source:
    """What a dataset is made of, before transforms."""

    kind: str
    items: list  # file paths, or indices into `array`
    labels: list[int]
    classes: list[str]
    array: Optional[np.ndarray] = None  # [n, H, W, C] uint8 for in-memory sets
    name: str = ""
    reader: Optional[Callable[[Any, int], torch.Tensor]] = None  # (item, in_chans) -> image
    shards: Optional[ShardSplit] = None  # kind 'wds': streamed, ``items`` stays empty


def _scan_imagefolder(root: Path, labelled: bool) -> Source:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items, labels, empty = [], [], []
    for ci, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if p.is_file() and _is_image(p))
        if not files:
            empty.append(c)
        items += files
        labels += [ci] * len(files)
    if empty and labelled:
        raise DataError(
            f"{root}: class folder(s) without images: {', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''}; add images or remove the folder(s)"
        )
    if empty:
        log.warning("%s: ignoring %d class folder(s) without images", root, len(empty))
    return Source("imagefolder", items, labels, classes, name=root.name)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file (magic 0x00000801 labels / 0x00000803 images), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); re-download it") from None
    want = 0x0800 | ndim
    if len(data) < 4 or struct.unpack(">I", data[:4])[0] != want:
        got = f"0x{struct.unpack('>I', data[:4])[0]:08x}" if len(data) >= 4 else "nothing"
        raise DataError(
            f"{path}: not an unsigned-byte IDX file with {ndim} dimension(s) "
            f"(magic number {got}, expected 0x{want:08x})"
        )
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX file (header cut off); re-download it")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim)  # writable
    if arr.size != int(np.prod(dims)):
        raise DataError(
            f"{path}: truncated IDX file ({arr.size} of {int(np.prod(dims))} values);"
            " re-download it"
        )
    return arr.reshape(dims)


def _find_idx(root: Path, prefix: str, what: str) -> Optional[Path]:
    for ext in ("", ".gz"):
        for name in (
            f"{prefix}-{what}-ubyte{ext}",
            f"{prefix}-{what.replace('-', '.')}-ubyte{ext}",
        ):
            if (root / name).exists():
                return root / name
    return None


def _fmnist_source(root: Path, split: str) -> Source:
    prefix = {"train": "train", "test": "t10k", "val": "t10k", "t10k": "t10k"}.get(split, split)
    ip, lp = _find_idx(root, prefix, "images-idx3"), _find_idx(root, prefix, "labels-idx1")
    if ip is None or lp is None:
        raise DataError(
            f"{root}: no {prefix}-images-idx3-ubyte(.gz) / {prefix}-labels-idx1-ubyte"
            f"(.gz) found for split '{split}'"
        )
    images, labels = _read_idx(ip, 3), _read_idx(lp, 1)
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} images but {len(labels)} labels")
    classes = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
    return Source(
        "fmnist",
        list(range(len(images))),
        labels.astype(int).tolist(),
        classes,
        array=images[..., None],
        name="fmnist",
    )


def _photos_source(spec: str) -> Source:
    try:
        import skimage.data as skd  # lazy: optional dependency (builtin:photos only)
    except ImportError:  # pragma: no cover
        raise DataError("builtin:photos needs scikit-image (pip install scikit-image)") from None
    names = spec.split(":")[2].split(",") if spec.count(":") >= 2 else list(PHOTO_NAMES)
    arrs = []
    for n in names:
        if n not in PHOTO_NAMES:
            raise DataError(f"unknown builtin photo '{n}'; choose from {', '.join(PHOTO_NAMES)}")
        a = getattr(skd, n)()
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        arrs.append(a[..., :3].astype(np.uint8))
    return Source("photos", list(range(len(arrs))), [-1] * len(arrs), [], array=arrs, name="photos")


def detect_kind(root: Path) -> str:
    """'fmnist' (IDX files present), 'hf' (a ``save_to_disk`` folder or parquet files), 'wds'
    (an ``_info.json`` shard index or .tar files, at the top or in train/, test/, ...),
    'imagefolder' (sub-folders and no images at the top) or 'folder'."""
    if any(root.glob("*idx3-ubyte*")):
        return "fmnist"
    if is_hf_dir(root):
        return "hf"
    if is_shard_dir(root):
        return "wds"
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if subdirs and not any(_is_image(p) for p in root.iterdir() if p.is_file()):
        return "imagefolder"
    return "folder"


def scan_source(cfg: DataConfig, split: str, labelled: bool) -> Source:
    """Find the images of ``split`` ('train' or 'val') under ``cfg.path``."""
    if not cfg.path:
        raise DataError("no dataset given: pass --data PATH (or data.path=PATH)")
    if cfg.path.startswith("builtin:photos") or cfg.kind == "photos":
        if labelled:
            raise DataError("builtin photos have no labels; they are for pretraining only")
        return _photos_source(cfg.path)
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DataError(f"dataset path does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"dataset path is not a folder: {root}")
    sub = cfg.train_split if split == "train" else cfg.val_split
    kind = cfg.kind if cfg.kind != "auto" else detect_kind(root)
    if kind == "fmnist":
        return _fmnist_source(root, sub or "train")
    if kind in ("wds", "hf"):
        return _at_scale_source(cfg, root, sub, kind, labelled)
    if sub and (root / sub).is_dir():
        root = root / sub
    elif split != "train" and sub:
        raise DataError(f"{root}: no '{sub}' sub-folder for evaluation (set data.val_split)")
    if kind == "auto":
        kind = detect_kind(root)
    if kind == "imagefolder":
        src = _scan_imagefolder(root, labelled)
    elif kind == "folder":
        files = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p))
        if files and labelled:
            raise DataError(
                f"{root}: labels are needed but this is a plain folder of images; "
                "use an ImageFolder layout (one sub-folder per class)"
            )
        src = Source("folder", files, [-1] * len(files), [], name=root.name)
    else:
        raise DataError(
            f"data.kind: unknown kind '{kind}' (auto | imagefolder | folder | fmnist "
            "| photos | wds | hf)"
        )
    if not src.items:
        raise DataError(
            f"{root}: no images found (looked for {', '.join(sorted(IMG_EXTS))}, "
            "recursively); check data.path"
        )
    return src


class _HFImages:
    """``Source.reader`` of a Hugging Face split: (row, in_chans) -> uint8 image [C, H, W]."""

    def __init__(self, split: HFSplit):
        self.split = split

    def __call__(self, row: int, in_chans: int) -> torch.Tensor:
        data, path = self.split.payload(row)
        if data is None:
            if path:
                return load_image(path, in_chans)
            raise BadImageError(f"{self.split.name}[{row}]: no image stored in this row")
        return decode_image_bytes(
            data, Path(path or "").suffix, in_chans, f"{self.split.name}[{row}]"
        )


def _at_scale_source(cfg: DataConfig, root: Path, sub: str, kind: str, labelled: bool) -> Source:
    """Kinds 'hf' (random access through :class:`_HFImages`) and 'wds' (``shards`` set)."""
    try:
        if kind == "hf":
            hs = open_hf_split(root, sub, cfg.image_key, cfg.label_key)
        else:
            ss = find_shard_split(root, sub)
    except ShardError as e:
        raise DataError(str(e)) from None
    if kind == "hf":
        if labelled and hs.label_key is None:
            raise DataError(
                f"{root}: labels are needed but split '{hs.name}' has no label "
                "column; set data.label_key"
            )
        if not len(hs):
            raise DataError(f"{root}: split '{hs.name}' has no rows")
        return Source(
            "hf", list(range(len(hs))), hs.labels(), hs.classes, name=hs.name, reader=_HFImages(hs)
        )
    if labelled and not ss.classes:
        raise DataError(
            f"{root}: labels are needed but the shards have no class list "
            f"('classes' in {INFO_FILE}); write them with `mimlab shards`"
        )
    return Source("wds", [], [], ss.classes, name=f"{root.name}:{ss.name}", shards=ss)


# ------------------------------------------------------------------------------ subsets
def subset_indices(labels: Sequence[int], n: int, strategy: str, seed: int) -> list[int]:
    """Seeded choice of ``n`` items: 'random', 'one_per_class' (round-robin over classes) or
    'one_class' (all from one randomly chosen class)."""
    if strategy not in ("random", "one_per_class", "one_class"):
        raise DataError(
            f"unknown subset strategy '{strategy}' (random | one_per_class | one_class)"
        )
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if n >= len(labels):
        return list(range(len(labels)))
    if strategy == "random" or (labels < 0).all():
        return sorted(rng.choice(len(labels), n, replace=False).tolist())
    classes = np.unique(labels)
    if strategy == "one_class":
        c = rng.choice(classes)
        idx = np.flatnonzero(labels == c)
        return sorted(rng.choice(idx, min(n, len(idx)), replace=False).tolist())
    if strategy == "one_per_class":
        per = {c: rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes}
        out, order = [], rng.permutation(classes).tolist()
        while len(out) < n:
            for c in order:
                if per[c] and len(out) < n:
                    out.append(per[c].pop())
        return sorted(out)


def balanced_fraction(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Class-balanced, seeded subset keeping ``fraction`` of each class (at least 1 each)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if fraction == 1:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(idx))))
        out += rng.choice(idx, k, replace=False).tolist()
    return sorted(out)


# ------------------------------------------------------------------------------ transforms
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic 32-bit seed of one sample's augmentation."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


def train_transform(img_size: int, mean, std, crop_scale=(0.2, 1.0), hflip: bool = True):
    """MAE pretraining transform on uint8 tensors: RandomResizedCrop (bicubic), flip, normalise."""
    t = [
        T.RandomResizedCrop(
            img_size,
            scale=tuple(crop_scale),
            interpolation=T.InterpolationMode.BICUBIC,
            antialias=True,
        )
    ]
    if hflip:
        t.append(T.RandomHorizontalFlip())
    t += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return T.Compose(t)


def eval_transform(img_size: int, mean, std):
    """Resize (shorter side; /0.875 crop ratio from 128 px up) + centre crop + normalise."""
    resize = img_size if img_size < 128 else int(round(img_size / 0.875))
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(img_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )


def seeded_apply(transform: Optional[Callable], img: torch.Tensor, seed: int) -> torch.Tensor:
    """``transform(img)`` with torch's CPU generator and ``random`` seeded by ``seed``; the
    caller's states of both are restored afterwards (CUDA's generator is not touched)."""
    if transform is None:
        return img
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed CUDA's
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            return transform(img)
    finally:
        random.setstate(py_state)


class SeededTransform:
    """``(img, epoch, index) -> transform(img)`` seeded by (seed, epoch, index), as
    :class:`ImageDataset` seeds its samples (used by shard streams)."""

    def __init__(self, transform: Optional[Callable], seed: int):
        self.transform, self.seed = transform, seed

    def __call__(self, img: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        return seeded_apply(self.transform, img, sample_seed(self.seed, epoch, index))


class ImageDataset(Dataset):
    """Indexable by ``int`` or by ``(index, epoch)``; returns a :class:`mimlab.data.batch.Batch` of
    one image: ``images`` [C, H, W], ``labels``, ``index`` (position among the distinct items),
    ``skipped``.

    ``skipped`` counts the unreadable files visited for this sample with ``on_bad='skip'``:
    an unreadable file is replaced by the next readable one in index order (wrapping around),
    whose label is returned, and a warning names it (once per file and process). After
    ``max_bad_run`` unreadable files in a row (or all of them, if fewer) a :class:`DataError`
    is raised instead of searching on. With ``on_bad='error'`` the first unreadable file
    raises :class:`BadImageError` naming it. Both classes survive being re-raised by a
    ``DataLoader`` worker.

    The augmentation of sample ``index`` in ``epoch`` is seeded by (seed, epoch, index); the
    caller's global torch (CPU; CUDA's is not touched) and ``random`` RNG states are saved and
    restored around it, so loading in the main process (``num_workers=0``) does not disturb
    masking or dropout.
    """

    max_bad_run = 1000

    def __init__(
        self,
        src: Source,
        transform,
        in_chans: int,
        seed: int = 0,
        indices: Optional[list[int]] = None,
        repeat: int = 1,
        on_bad: str = "skip",
    ):
        if on_bad not in ("skip", "error"):
            raise DataError(f"data.on_bad must be 'skip' or 'error', got '{on_bad}'")
        self.src, self.transform, self.in_chans, self.seed = src, transform, in_chans, seed
        self.indices = list(range(len(src.items))) if indices is None else list(indices)
        self.repeat, self.on_bad = max(1, repeat), on_bad
        self._warned: set = set()
        if not self.indices:
            raise DataError(f"dataset '{src.name}' is empty after sub-sampling")

    def __len__(self) -> int:
        return len(self.indices) * self.repeat

    @property
    def labels(self) -> list[int]:
        return [self.src.labels[i] for i in self.indices] * self.repeat

    @property
    def classes(self) -> list[str]:
        return self.src.classes

    def _raw(self, j: int) -> torch.Tensor:
        item = self.src.items[j]
        if self.src.reader is not None:
            return self.src.reader(item, self.in_chans)
        if self.src.array is not None:
            a = self.src.array[item]
            t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
            if t.shape[0] != self.in_chans:
                if t.shape[0] == 1:
                    t = t.expand(self.in_chans, -1, -1)
                elif self.in_chans == 1:
                    t = (t.float().mean(0, keepdim=True)).round().to(torch.uint8)
                else:
                    raise DataError(
                        f"{self.src.name}: has {t.shape[0]} channels, model.in_chans "
                        f"is {self.in_chans}"
                    )
            return t.contiguous()
        return load_image(item, self.in_chans)

    def __getitem__(self, key):
        idx, epoch = key if isinstance(key, tuple) else (key, 0)
        n = len(self.indices)
        tries = min(n, self.max_bad_run)
        skipped, last_err = 0, None
        for attempt in range(tries):
            j = self.indices[(idx + attempt) % n]
            try:
                img = self._raw(j)
                break
            except BadImageError as e:
                if self.on_bad == "error":
                    raise BadImageError(
                        f"{e} -- fix or delete the file, or set data.on_bad=skip "
                        "to skip unreadable files"
                    ) from None
                skipped += 1
                last_err = e
                if j not in self._warned:
                    self._warned.add(j)
                    log.warning("skipping unreadable file: %s", e)
        else:
            what = f"all {n}" if tries == n else f"{tries} consecutive"
            first = self.src.items[self.indices[idx % n]]
            raise DataError(
                f"{self.src.name}: {what} files tried (from {first} on) were "
                f"unreadable; last error: {last_err}. Is this really an image "
                "folder, and does model.in_chans match the files?"
            )
        x = seeded_apply(self.transform, img, sample_seed(self.seed, epoch, idx))
        return Batch(x, int(self.src.labels[j]), idx % n, skipped)


class EpochSampler(Sampler):
    """Seeded permutation per epoch, split across ranks, yielding ``(index, epoch)`` pairs.

    ``start`` skips the first ``start`` samples of the epoch's global order (exact mid-epoch
    resume, also with a different number of processes). Each rank gets ``len // world`` samples
    (the tail is dropped so ranks stay in step).
    """

    def __init__(
        self,
        n: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ):
        self.n, self.seed, self.epoch, self.rank, self.world = n, seed, epoch, rank, world
        self.start, self.shuffle = start, shuffle

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1 & 0xFFFFFFF))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order()[self.start :]
        usable = (len(order) // self.world) * self.world
        for i in order[self.rank : usable : self.world]:
            yield (i, self.epoch)

    def __len__(self) -> int:
        return max(0, self.n - self.start) // self.world


# ------------------------------------------------------------------------------ tar shards
class ShardDecoder:
    """A :class:`ShardStream`'s ``decode``: WebDataset sample -> (uint8 image [C, H, W], label).

    The image is the sample's ``image_key`` entry, else its first entry with an image
    extension (:data:`mimlab.data.shards.IMAGE_EXTS`); the label is the integer text of its
    ``label_key`` entry (default ``cls``), -1 when absent. Unreadable images give ``None`` with
    ``on_bad='skip'`` (the stream substitutes and counts them) and raise
    :class:`BadImageError` with ``on_bad='error'``.
    """

    def __init__(
        self,
        in_chans: int,
        image_key: Optional[str] = None,
        label_key: Optional[str] = None,
        on_bad: str = "skip",
    ):
        if on_bad not in ("skip", "error"):
            raise DataError(f"data.on_bad must be 'skip' or 'error', got '{on_bad}'")
        self.in_chans, self.image_key = in_chans, image_key
        self.label_key, self.on_bad = label_key or "cls", on_bad
        self._warned: set = set()

    def __call__(self, sample: dict, where: str) -> tuple[Optional[torch.Tensor], int]:
        ext = self.image_key or next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or ext not in sample:
            have = ", ".join(k for k in sample if not k.startswith("__"))
            raise DataError(
                f"{where}: no image entry '{ext or '|'.join(IMAGE_EXTS)}' in the "
                f"sample (it has: {have}); set data.image_key"
            )
        raw = sample.get(self.label_key)
        try:
            label = int(raw) if raw is not None else -1
        except ValueError:
            raise DataError(
                f"{where}: label entry '{self.label_key}' is not an integer ({raw[:20]!r})"
            ) from None
        try:
            return decode_image_bytes(sample[ext], ext, self.in_chans, where), label
        except BadImageError as e:
            if self.on_bad == "error":
                raise BadImageError(
                    f"{e} -- fix or drop the sample, or set data.on_bad=skip "
                    "to skip unreadable images"
                ) from None
            if where not in self._warned:
                self._warned.add(where)
                log.warning("skipping unreadable sample: %s", e)
            return None, label


def shard_stream(
    cfg: DataConfig,
    src: Source,
    split: str,
    transform,
    in_chans: int,
    seed: int,
    train_aug: bool,
    label_fraction: float = 1.0,
) -> ShardStream:
    """The stream of a 'wds' source for ``build_dataset`` (shuffled when ``train_aug``).
    ``data.limit`` / ``data.val_limit`` keep the first N samples in shard order (a random
    subset when the shards were written shuffled, as ``mimlab shards`` does by default); the
    options that need random access are refused."""
    refused = [
        name
        for name, on in (
            ("data.holdout", cfg.holdout > 0),
            ("a label_fraction below 1", label_fraction < 1),
            ("data.repeat", split == "train" and cfg.repeat > 1),
            (f"data.subset={cfg.subset}", cfg.subset != "random" and cfg.limit is not None),
        )
        if on
    ]
    if refused:
        raise DataError(
            f"{', '.join(refused)}: not available for tar shards (data.kind=wds, "
            "streamed without random access); write the subset you need with "
            "`mimlab shards --limit N`, or use an image folder / data.kind=hf"
        )
    n = cfg.limit if split == "train" else cfg.val_limit
    ss = src.shards if n is None else src.shards.head(n)
    return ShardStream(
        ss,
        ShardDecoder(in_chans, cfg.image_key, cfg.label_key, cfg.on_bad),
        SeededTransform(transform, seed),
        seed=seed,
        shuffle=train_aug,
        shuffle_buffer=cfg.shuffle_buffer,
        error=DataError,
    )


def write_folder_shards(
    src: str | Path,
    out: str | Path,
    shard_size: int,
    limit: Optional[int] = None,
    seed: int = 0,
    order: str = "shuffled",
    progress: bool = True,
    splits: Sequence[str] = ("train", "test"),
) -> dict:
    """``mimlab shards``: write an image folder as WebDataset tar shards with an ``_info.json``.

    ``src`` is an ImageFolder (labels kept as ``.cls``, class names in the index), a CIFAR-style
    copy with ``train/`` and ``test/`` (one split each) or a plain folder of images (unlabelled,
    one 'train' split). ``order='shuffled'`` writes each split in a permutation seeded by
    ``seed`` (a stream then mixes classes even with a small shuffle buffer), 'sorted' in the
    folder's order. ``limit`` writes a seeded random subset of the training split (the images
    ``data.limit`` with ``data.subset_seed=seed`` would pick). ``splits`` names the splits
    written when the folder has them. Returns a summary (images and shards per split)."""
    if order not in ("shuffled", "sorted"):
        raise DataError(f"--order must be shuffled | sorted, got '{order}'")
    if not set(splits) <= {"train", "test"} or not splits:
        raise DataError(f"--splits must be train and/or test, got {','.join(splits) or 'none'}")
    root, out = Path(src).expanduser(), Path(out).expanduser()
    if (out / INFO_FILE).exists():
        raise DataError(f"{out} already holds shards ({INFO_FILE}); choose a new folder")
    cfg = DataConfig(path=str(root))
    has_train = (root / cfg.train_split).is_dir()
    plan = [("train", "train")] + (
        [("test", "val")] if has_train and (root / cfg.val_split).is_dir() else []
    )
    plan = [p for p in plan if p[0] in splits]
    if not has_train:
        cfg.train_split = ""
    written, classes = {}, None
    for name, which in plan:
        s = scan_source(cfg, which, labelled=False)
        if s.kind not in ("imagefolder", "folder"):
            raise DataError(
                f"{root}: `mimlab shards` needs image files (an ImageFolder or a "
                f"folder of images), not a '{s.kind}' data set"
            )
        idx = (
            subset_indices(s.labels, limit, "random", seed)
            if limit and name == "train"
            else list(range(len(s.items)))
        )
        if order == "shuffled":
            idx = np.random.default_rng(seed).permutation(idx).tolist()
        classes = s.classes if classes is None else classes
        if s.classes != classes:
            raise DataError(f"{root}: the {name} split's classes differ from the train split's")
        try:
            written[name] = write_shards(
                [(s.items[i], s.labels[i]) for i in idx], out, name, shard_size, progress
            )
        except ShardError as e:
            raise DataError(str(e)) from None
    if not written:
        raise DataError(f"{root}: none of the splits {', '.join(splits)} found")
    write_info(
        out,
        written,
        classes or [],
        {"mimlab": {"source": str(root), "order": order, "seed": seed, "limit": limit}},
    )
    return {
        "out": str(out),
        "classes": len(classes or []),
        **{
            k: {"images": v["num_samples"], "shards": len(v["filenames"])}
            for k, v in written.items()
        },
    }


def resolve_stats(
    cfg: DataConfig, src: Optional[Source], in_chans: int
) -> tuple[list[float], list[float]]:
    """Mean/std: explicit config, else known values for the dataset, else ImageNet's (RGB) or
    0.5 (other channel counts). Use :func:`compute_mean_std` to measure a new dataset."""
    if cfg.mean is not None:
        if len(cfg.mean) != in_chans or len(cfg.std) != in_chans:
            raise DataError(
                f"data.mean/std have {len(cfg.mean)}/{len(cfg.std)} values but "
                f"model.in_chans is {in_chans}"
            )
        return list(cfg.mean), list(cfg.std)
    key = None
    if src is not None:
        if src.kind == "fmnist":
            key = "fmnist"
        elif cfg.path and "cifar" in str(cfg.path).lower() and in_chans == 3:
            key = "cifar10"
        elif src.kind == "photos":
            key = "imagenet"
    if key and len(KNOWN_STATS[key][0]) == in_chans:
        return list(KNOWN_STATS[key][0]), list(KNOWN_STATS[key][1])
    return default_stats(in_chans)


def stats_origin(cfg: DataConfig, src: Optional[Source], in_chans: int) -> str:
    """Where :func:`resolve_stats`'s values come from, in words (logged by every run)."""
    if cfg.mean is not None:
        return "data.mean/std"
    if src is not None:
        if src.kind == "fmnist" and in_chans == 1:
            return "known Fashion-MNIST statistics"
        if cfg.path and "cifar" in str(cfg.path).lower() and in_chans == 3:
            return "known CIFAR-10 statistics (the path names cifar)"
    if in_chans == 3:
        return (
            "ImageNet's statistics (the default for RGB data, not measured on this data set; "
            "`mimlab stats DATA` measures them, set data.mean/std)"
        )
    return "0.5 / 0.5 (the default; `mimlab stats DATA` measures them, set data.mean/std)"


def default_stats(in_chans: int) -> tuple[list[float], list[float]]:
    """The one default normalisation: ImageNet's for RGB, 0.5 / 0.5 for other channel counts."""
    if in_chans == 3:
        return list(KNOWN_STATS["imagenet"][0]), list(KNOWN_STATS["imagenet"][1])
    return [0.5] * in_chans, [0.5] * in_chans


def compute_mean_std(
    cfg: DataConfig, in_chans: int, img_size: int, max_images: int = 5000, seed: int = 0
) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the training split (on up to ``max_images`` resized images: a
    seeded subset, or for tar shards the first ones)."""
    src = scan_source(cfg, "train", labelled=False)
    tf = T.Compose(
        [
            T.Resize(img_size, antialias=True),
            T.CenterCrop(img_size),
            T.ToDtype(torch.float32, scale=True),
        ]
    )
    if src.shards is not None:
        first = DataConfig(
            path=cfg.path,
            kind=cfg.kind,
            limit=max_images,
            image_key=cfg.image_key,
            label_key=cfg.label_key,
        )
        images = (b.images for b in shard_stream(first, src, "train", tf, in_chans, seed, False))
    else:
        idx = subset_indices(src.labels, max_images, "random", seed)
        ds = ImageDataset(src, tf, in_chans, indices=idx, on_bad="skip")
        images = (ds[i].images for i in range(len(ds)))
    s = torch.zeros(in_chans, dtype=torch.float64)
    s2 = torch.zeros(in_chans, dtype=torch.float64)
    cnt = 0
    for x in images:
        x = x.double()
        s += x.sum((1, 2))
        s2 += (x**2).sum((1, 2))
        cnt += x.shape[1] * x.shape[2]
    mean = s / cnt
    std = (s2 / cnt - mean**2).clamp_min(0).sqrt()
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def build_dataset(
    cfg: DataConfig,
    split: str,
    img_size: int,
    in_chans: int,
    seed: int,
    train_aug: bool,
    labelled: bool,
    label_fraction: float = 1.0,
    mean=None,
    std=None,
) -> ImageDataset:
    """Dataset for ``split`` ('train' | 'val'): training augmentation or eval transform."""
    held_out = cfg.holdout > 0 and labelled
    src = scan_source(cfg, "train" if held_out else split, labelled)
    if mean is None:
        mean, std = resolve_stats(cfg, src, in_chans)
        if split == "train":
            log.info(
                "normalisation: mean %s, std %s from %s",
                [round(float(v), 4) for v in mean],
                [round(float(v), 4) for v in std],
                stats_origin(cfg, src, in_chans),
            )
    tf = (
        train_transform(img_size, mean, std, cfg.crop_scale, cfg.hflip)
        if train_aug
        else eval_transform(img_size, mean, std)
    )
    if (
        src.shards is not None
    ):  # tar shards: streamed, split by rank and worker (mimlab.data.shards)
        ds = shard_stream(cfg, src, split, tf, in_chans, seed, train_aug, label_fraction)
        ds.mean, ds.std = mean, std
        return ds
    sseed = seed if cfg.subset_seed is None else cfg.subset_seed
    idx = None
    if held_out:
        # train and val both come from the training split: a class-balanced, seeded hold-out
        base = (
            subset_indices(src.labels, cfg.limit, cfg.subset, sseed)
            if cfg.limit is not None
            else list(range(len(src.items)))
        )
        held = set(balanced_fraction([src.labels[i] for i in base], cfg.holdout, sseed + 1))
        if split == "train":
            base = [b for j, b in enumerate(base) if j not in held]
            if label_fraction < 1:
                keep = balanced_fraction([src.labels[i] for i in base], label_fraction, sseed)
                base = [base[i] for i in keep]
        else:
            base = [b for j, b in enumerate(base) if j in held]
        idx = base
    elif split == "train":
        if cfg.limit is not None:
            idx = subset_indices(src.labels, cfg.limit, cfg.subset, sseed)
        if label_fraction < 1:
            base = idx if idx is not None else list(range(len(src.items)))
            keep = balanced_fraction([src.labels[i] for i in base], label_fraction, sseed)
            idx = [base[i] for i in keep]
    elif cfg.val_limit is not None and cfg.val_limit < len(src.items):
        labels = src.labels
        strategy = "one_per_class" if src.classes else "random"
        idx = subset_indices(labels, cfg.val_limit, strategy, sseed)
    ds = ImageDataset(
        src,
        tf,
        in_chans,
        seed=seed,
        indices=idx,
        repeat=cfg.repeat if split == "train" else 1,
        on_bad=cfg.on_bad,
    )
    ds.mean, ds.std = mean, std
    return ds


def labelled_splits(
    cfg: DataConfig,
    img_size: int,
    in_chans: int,
    seed: int,
    train_aug: bool,
    label_fraction: float = 1.0,
) -> tuple[ImageDataset, ImageDataset]:
    """``(train, val)`` of a labelled dataset for the evaluation protocols: the training split
    (augmented when ``train_aug``, ``label_fraction`` of its labels) and the held-out split with
    the eval transform, normalised with the training split's statistics."""
    train = build_dataset(
        cfg,
        "train",
        img_size,
        in_chans,
        seed,
        train_aug=train_aug,
        labelled=True,
        label_fraction=label_fraction,
    )
    val = build_dataset(
        cfg,
        "val",
        img_size,
        in_chans,
        seed,
        train_aug=False,
        labelled=True,
        mean=train.mean,
        std=train.std,
    )
    return train, val


def default_data_path() -> Optional[str]:
    """The shared CIFAR-10 copy beside the repository or working directory, if present."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        for rel in ("../shared/data/cifar10", "shared/data/cifar10"):
            p = (base / rel).resolve()
            if (p / "train").is_dir():
                return str(p)
    return None
