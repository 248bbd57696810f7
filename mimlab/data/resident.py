"""A training set held on the training device (``data.resident=true``): CIFAR-scale data fed to
a GPU without a CPU decode in the loop.

The images are decoded once (shorter side resized to ``img_size``, centre crop: exact for
CIFAR's 32 px at ``img_size=32``) and kept as uint8 ``[N, C, S, S]`` on the device (CIFAR-10's
50,000 training images: 150 MiB). Each batch is gathered there and augmented there in one
batched op: random resized crop (scale ``data.crop_scale``, aspect ratio 3/4-4/3) and
horizontal flip as one affine ``grid_sample`` (bilinear), then normalised.

Seeded and resumable: the epoch's order is :class:`~mimlab.data.datasets.EpochSampler`'s (the
same images in the same order as the decoding loader), and every sample's crop and flip are a
row of one table of uniforms drawn per epoch from ``(seed, epoch)`` and looked up by the
sample's position in the epoch's order; so a run resumed mid-epoch, also with another number
of processes, sees exactly the batches of an uninterrupted one. No host-device sync per batch.

Not the same pixels as the decoding path: bilinear resampling instead of torchvision's
antialiased bicubic, and a crop box clamped into the image instead of torchvision's ten tries
with a centre-crop fallback. Only crop and flip: a method that needs other per-sample
augmentation on the loader should keep the decoding path.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from .batch import Batch
from .datasets import DataError, EpochSampler, sample_seed

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect ratios


def crop_flip_params(u: torch.Tensor, scale: Sequence[float], hflip: bool) -> torch.Tensor:
    """Uniforms ``u`` [B, 5] -> affine matrices [B, 2, 3] of ``affine_grid`` (normalised
    coordinates): a box of area fraction in ``scale`` and aspect ratio in 3/4-4/3, clamped into
    the image, placed uniformly, mirrored when ``hflip`` and the fifth uniform is < 0.5."""
    lo, hi = float(scale[0]), float(scale[1])
    area = lo + (hi - lo) * u[:, 0]
    logr = math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * u[:, 1]
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fractions of the image side
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (w + (2.0 - 2.0 * w) * u[:, 2]) - 1.0  # box centre in [-1 + w, 1 - w]
    cy = (h + (2.0 - 2.0 * h) * u[:, 3]) - 1.0
    sx = torch.where((u[:, 4] < 0.5) & hflip, -w, w)
    theta = torch.zeros(u.shape[0], 2, 3, dtype=u.dtype, device=u.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return theta


def augment(
    images: torch.Tensor,
    u: torch.Tensor,
    size: int,
    scale: Sequence[float],
    hflip: bool,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """uint8 ``images`` [B, C, S, S] -> normalised float [B, C, size, size]: crop + flip from
    the uniforms ``u`` [B, 5] (:func:`crop_flip_params`), bilinear, then ``(x - mean) / std``."""
    x = images.float().div_(255.0)
    theta = crop_flip_params(u.to(x.dtype), scale, hflip)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class ResidentDataset:
    """The items of a decoding training set (:class:`~mimlab.data.datasets.ImageDataset`),
    decoded once into a uint8 tensor; :meth:`to_device` moves it to the training device and
    :meth:`make_loader` (what :class:`~mimlab.train.engine.Engine` calls for an epoch) yields
    augmented :class:`~mimlab.data.batch.Batch` es there."""

    def __init__(self, base, img_size: int, crop_scale: Sequence[float], hflip: bool):
        self.base, self.img_size = base, int(img_size)
        self.crop_scale, self.hflip = [float(s) for s in crop_scale], bool(hflip)
        self.mean, self.std = base.mean, base.std
        self.seed = base.seed
        self.repeat = base.repeat
        n = len(base.indices)
        imgs = torch.empty(n, base.in_chans, self.img_size, self.img_size, dtype=torch.uint8)
        for k, j in enumerate(base.indices):
            imgs[k] = self._fit(base._raw(j))
        self.images = imgs
        self.labels_t = torch.tensor([base.src.labels[j] for j in base.indices], dtype=torch.long)
        self.device = torch.device("cpu")
        self._norm = (torch.tensor(self.mean), torch.tensor(self.std))

    def _fit(self, img: torch.Tensor) -> torch.Tensor:
        if tuple(img.shape[-2:]) == (self.img_size, self.img_size):
            return img
        img = TF.resize(img, self.img_size, InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(img, [self.img_size, self.img_size])

    def to_device(self, device: torch.device) -> "ResidentDataset":
        self.device = torch.device(device)
        self.images = self.images.to(self.device)
        self.labels_t = self.labels_t.to(self.device)
        self._norm = tuple(t.to(self.device) for t in self._norm)
        return self

    def __len__(self) -> int:
        return self.images.shape[0] * self.repeat

    @property
    def labels(self) -> list[int]:
        return self.labels_t.tolist() * self.repeat

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    def epoch_uniforms(self, seed: int, epoch: int) -> torch.Tensor:
        """[len(self), 5] uniforms of the epoch, drawn on the CPU from ``(seed, epoch)`` (the
        same on every device and process) and moved to the device once per epoch."""
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, 0x5EED))
        return torch.rand(len(self), 5, generator=g).to(self.device)

    def make_loader(
        self,
        batch_size: int,
        seed: int,
        epoch: int,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> "ResidentLoader":
        return ResidentLoader(self, batch_size, seed, epoch, start, rank, world)


class ResidentLoader:
    """One epoch of a :class:`ResidentDataset`: this rank's full batches from sample ``start``
    of the epoch's global order on (:class:`~mimlab.data.datasets.EpochSampler`)."""

    def __init__(
        self,
        ds: ResidentDataset,
        batch_size: int,
        seed: int,
        epoch: int,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.ds, self.batch_size = ds, batch_size
        sampler = EpochSampler(len(ds), seed, epoch, rank, world, start=start)
        mine = [i for i, _ in sampler]  # this rank's share, in order (once per epoch)
        self.n_batches = len(mine) // batch_size
        self.order = torch.tensor(mine[: self.n_batches * batch_size], dtype=torch.long)
        self.seed, self.epoch = seed, epoch
        self._skipped = torch.zeros(batch_size, dtype=torch.long)  # host tensor, as decoded

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[Batch]:
        ds = self.ds
        order = self.order.to(ds.device)
        u = ds.epoch_uniforms(self.seed, self.epoch)
        n = ds.images.shape[0]
        for b in range(self.n_batches):
            pos = order[b * self.batch_size : (b + 1) * self.batch_size]
            item = pos % n  # data.repeat copies share an image (and its index)
            x = augment(ds.images[item], u[pos], ds.img_size, ds.crop_scale, ds.hflip, *ds._norm)
            yield Batch(x, ds.labels_t[item], item, self._skipped)


def resident_dataset(
    dataset,
    img_size: int,
    crop_scale: Sequence[float],
    hflip: bool,
    device: Optional[torch.device] = None,
) -> ResidentDataset:
    """``dataset`` (a decoding training set) held as a :class:`ResidentDataset`, on
    ``device`` when given (else the engine moves it to the training device)."""
    if not hasattr(dataset, "_raw") or not hasattr(dataset, "indices"):
        raise DataError(
            "data.resident=true needs an image folder or array data set (tar shards stream)"
        )
    ds = ResidentDataset(dataset, img_size, crop_scale, hflip)
    return ds.to_device(device) if device is not None else ds
