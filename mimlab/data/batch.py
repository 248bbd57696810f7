"""The contract between the data layer and everything that consumes it (methods, evaluation).

A dataset item is a :class:`Batch` of one image; the ``DataLoader`` collates a list of them
into a :class:`Batch` whose fields gain a leading batch dimension. Fields are read by name.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Batch(NamedTuple):
    """``images``: the normalised image(s), [C, H, W] per item, [B, C, H, W] collated.
    ``labels``: class index (-1 where the data has no labels; pretraining ignores them).
    ``index``: the item's position among the dataset's distinct items (``data.repeat`` copies
    share it; a stream's running position); precomputed per-item data such as the teacher cache
    is looked up with it. ``skipped``: unreadable files skipped to produce the item."""

    images: Any
    labels: Any
    index: Any
    skipped: Any

    def to(self, device, non_blocking: bool = True) -> "Batch":
        """Images and labels on ``device`` (index and skipped stay where they are)."""
        return self._replace(
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )
