"""Teacher feature cache (``method.cache_teacher=true``): run a frozen teacher once per training
image and reuse its features in every epoch.

Valid only for a fixed augmentation (``data.crop_scale=[1,1]``, ``data.hflip=false``; checked by
:func:`mimlab.core.config.validate`): sample ``i`` then always yields the same image, so its teacher
features are a function of ``i``. (RandomResizedCrop at scale 1 keeps the whole image; for a
non-square image whose aspect ratio lies inside the crop's ratio range it may still shift by one
pixel, which the cache ignores.)

Storage: one file ``<root>/teacher/<key>.pt`` with ``root = $MIMLAB_CACHE`` (read when the cache
is opened) or ``~/.cache/mimlab``. It holds ``features``, float16 ``[n, N, C]`` (``n`` distinct
training images, ``N`` student patches, ``C`` teacher channels), and ``meta``, the inputs of the
key. It is written atomically by rank 0 (other ranks wait, then read it) and loaded
memory-mapped. Size: ``2 n N C`` bytes, e.g. 50k CIFAR images x 64 patches x 1280
EfficientNet channels = 8.2 GB; it is built in memory first.

Key: SHA-256 of the teacher spec, class, resolution, out_dim and a hash of its weights; the
student's image size, patch size, grid, channels and mean / std; the training transform; and a
fingerprint of the training set (each file's path, size and mtime, or the bytes of an in-memory
array, plus the subset indices). Changing any of them selects another file; stale files stay
(delete the folder to reclaim space).

Lookup: every :class:`mimlab.data.batch.Batch` carries each image's ``index`` among the dataset's
distinct items (the cache row). :func:`attach_teacher_cache` returns a ``batch_fn`` for the
engine's hook that hands ``batch.index`` to
:meth:`TeacherTarget.set_batch_indices <mimlab.methods.targets.TeacherTarget.set_batch_indices>`;
the target then returns the cached rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..core import dist
from ..core.config import ConfigError, PretrainConfig, data_workers
from ..core.dist import autocast_dtype
from ..data.batch import Batch
from ..io.checkpoint import save as atomic_save
from .targets import TeacherTarget

log = logging.getLogger("mimlab.teacher_cache")

CACHE_VERSION = 1


def cache_root() -> Path:
    """``$MIMLAB_CACHE`` or ``~/.cache/mimlab`` (read at call time)."""
    return Path(os.path.expanduser(os.environ.get("MIMLAB_CACHE") or "~/.cache/mimlab"))


def _unique_len(ds) -> int:
    """Distinct samples of a mimlab ImageDataset (``data.repeat`` copies share features)."""
    return len(ds.indices)


def dataset_fingerprint(ds) -> str:
    """Hash of what a mimlab ``ImageDataset`` is made of: its subset indices and each selected
    file's (path, size, mtime), or the bytes of an in-memory array."""
    h = hashlib.sha256()
    src = ds.src
    h.update(json.dumps([src.kind, src.name, list(ds.indices)]).encode())
    if src.array is not None:
        arr = src.array
        h.update(str((arr.shape, str(arr.dtype))).encode())
        for j in ds.indices:
            h.update(arr[src.items[j]].tobytes())
    else:
        for j in ds.indices:
            p = Path(src.items[j])
            try:
                st = p.stat()
                h.update(f"{p.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\tmissing\n".encode())
    return h.hexdigest()


def weights_hash(module: torch.nn.Module) -> str:
    """BLAKE2b of every tensor of ``module.state_dict()`` (names, shapes, dtypes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for k, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_meta(target: TeacherTarget, ds, cfg: PretrainConfig) -> dict:
    """Everything the cached features depend on (its JSON's SHA-256 is the file name)."""
    t = target.teacher
    m = cfg.model
    return {
        "version": CACHE_VERSION,
        "teacher": {
            "spec": target.spec,
            "class": type(t).__name__,
            "out_dim": int(t.out_dim),
            "size": list(t.teacher_size) if t.teacher_size else None,
            "weights": weights_hash(t),
        },
        "student": {
            "img_size": m.img_size,
            "patch_size": m.patch_size,
            "grid": list(target.grid),
            "in_chans": m.in_chans,
            "mean": [float(v) for v in ds.mean],
            "std": [float(v) for v in ds.std],
        },
        "transform": repr(ds.transform),
        "data": {"n": _unique_len(ds), "fingerprint": dataset_fingerprint(ds)},
    }


def cache_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]


class TeacherCache:
    """Cached features ``[n, N, C]`` (float16, usually memory-mapped) read by position."""

    def __init__(self, features: torch.Tensor, path: Path, built: bool):
        self.features, self.path, self.built = features, Path(path), built

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [B] (any device) -> float32 features [B, N, C] on the CPU."""
        return self.features[positions.detach().long().cpu() % len(self.features)].float()


@torch.no_grad()
def compute_features(
    target: TeacherTarget,
    ds,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 0,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Teacher features of samples ``0 .. n-1`` of ``ds`` (epoch 0) -> float16 [n, N, C]."""
    n = _unique_len(ds)
    out = torch.empty(n, target.grid[0] * target.grid[1], target.out_dim, dtype=torch.float16)
    teacher = target.teacher.to(device)
    loader = DataLoader(
        Subset(ds, range(n)),
        batch_size=batch_size,
        num_workers=num_workers,
        multiprocessing_context="fork" if num_workers > 0 and os.name == "posix" else None,
    )
    it = loader
    if progress and dist.is_main():
        it = tqdm(loader, desc="teacher cache", unit="batch", leave=False)
    i = 0
    for b in it:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            f = teacher(b.images.to(device), target.grid)  # [B, N, C]
        out[i : i + len(f)] = f.to(torch.float16).cpu()
        i += len(f)
    return out


def load_or_build(
    target: TeacherTarget, ds, cfg: PretrainConfig, device: torch.device
) -> TeacherCache:
    """Open the cache file matching ``(target, ds, cfg)``, building it first if needed."""
    meta = cache_meta(target, ds, cfg)
    path = cache_root() / "teacher" / f"{cache_key(meta)}.pt"
    n, shape = meta["data"]["n"], (target.grid[0] * target.grid[1], target.out_dim)

    def _load() -> Optional[torch.Tensor]:
        if not path.is_file():
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            f = obj["features"]
        except Exception as e:  # noqa: BLE001 - a damaged file is rebuilt
            log.warning("teacher cache %s unreadable (%s): rebuilding", path, e)
            return None
        if tuple(f.shape) != (n, *shape) or obj.get("meta") != meta:
            log.warning("teacher cache %s does not match this run: rebuilding", path)
            return None
        return f

    feats = _load() if dist.is_main() else None
    built = False
    if dist.is_main() and feats is None:
        log.info(
            "building teacher cache %s: %d images x %d patches x %d channels (%.1f MB)",
            path,
            n,
            *shape,
            2 * n * shape[0] * shape[1] / 1e6,
        )
        feats = compute_features(
            target,
            ds,
            device,
            min(cfg.optim.batch_size, 256),
            data_workers(cfg.data.num_workers),
            autocast_dtype(cfg.run.precision, device),
            cfg.run.progress,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"meta": meta, "features": feats}, path)
        built = True
        feats = _load()  # memory-mapped from now on
    dist.barrier()
    if not dist.is_main():
        feats = _load()
        if feats is None:
            raise RuntimeError(
                f"teacher cache {path} missing on rank {dist.rank()} (the cache "
                "directory must be shared by all processes)"
            )
    if not built:
        log.info("reusing teacher cache %s", path)
    return TeacherCache(feats, path, built)


def attach_teacher_cache(
    method: torch.nn.Module, ds, cfg: PretrainConfig, device: torch.device
) -> tuple[Callable, TeacherCache]:
    """Open / build the cache of ``method.target`` on ``ds`` and wire it in.

    Returns ``(batch_fn, cache)``: pass ``batch_fn`` to the :class:`~mimlab.train.engine.Engine`
    (it routes each batch's ``index`` to the target).
    """
    target = getattr(method, "target", None)
    if not isinstance(target, TeacherTarget):
        raise ConfigError(
            "method.cache_teacher needs a frozen teacher target (method.target=teacher | hog)"
        )
    if not all(hasattr(ds, a) for a in ("src", "indices", "transform")):
        raise ConfigError("method.cache_teacher works with mimlab's ImageDataset only")
    cache = load_or_build(target, ds, cfg, device)
    target.attach_cache(cache)

    def batch_fn(batch: Batch) -> Batch:
        target.set_batch_indices(batch.index)
        return batch

    return batch_fn, cache
