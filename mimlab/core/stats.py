"""Statistics for comparing two arms (methods, inits) evaluated on the same test images.

An *arm* is a set of evaluation *units* (one fine-tuning seed, or one pretraining seed x one
fine-tuning seed); each unit gives a per-image correctness vector over the same ``N`` test
images (same order). Two arms are compared *paired*: unit ``i`` of arm A with unit ``i`` of
arm B (same fine-tuning seed, so the same data order and head initialisation), and image
``j`` with image ``j``.

The difference of top-1 (A - B, in points) has two sources of noise:

* **seeds**: the spread of the per-unit differences ``d_i`` (variance ``s_d^2``) -- the
  training noise we would see with other seeds;
* **test images**: the finite test set; for the unit-averaged per-image difference
  ``e_j = mean_i (a_ij - b_ij)`` its standard error is ``sd(e) / sqrt(N)``.

The 95 % interval is ``mean(d) +- sqrt((t_{n-1} s_d / sqrt(n))^2 + (1.96 sd(e)/sqrt(N))^2)``:
Student-t for the few seeds (with 3 units, ``t_2 = 4.30``: wide on purpose), normal for the
many images, combined in quadrature. With a single unit the seed term is unknown and the
interval uses a ``seed_sd`` yardstick when given (e.g. the spread of from-scratch seeds),
otherwise only the image term (and :func:`verdict` says so).

Verdicts for ordering claims (``A > B``): **holds** when the whole interval is above 0,
**contradicted** when it is below 0, otherwise **undecided**. For "≈" claims with margin
``m`` (points): **holds** when the interval lies inside ``[-m, m]``, **contradicted** when it
lies entirely outside it, otherwise **undecided**.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

# two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t975(df: int) -> float:
    """97.5 % quantile of Student's t with ``df`` degrees of freedom (normal beyond 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def pack_correct(correct: Sequence[bool]) -> str:
    """Per-image correctness [N] -> compact hex string (for results.json)."""
    bits = np.packbits(np.asarray(correct, dtype=bool))
    return f"{len(correct)}:{bits.tobytes().hex()}"


def unpack_correct(s: str) -> np.ndarray:
    """Inverse of :func:`pack_correct`: bool array [N]."""
    try:
        n, hexs = s.split(":", 1)
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(hexs), dtype=np.uint8))
        return bits[: int(n)].astype(bool)
    except ValueError as e:
        raise ValueError(f"not a packed correctness string: {s[:40]!r}...") from e


@dataclass
class Diff:
    """A - B in top-1 points (or another per-image score's unit) with its 95 % interval."""

    mean: float
    lo: float
    hi: float
    n_units: int
    n_images: int
    seed_sd: Optional[float]  # sd of the per-unit differences (None with one unit)
    image_se: float  # standard error from the test images
    a_mean: float
    b_mean: float
    a_units: list
    b_units: list

    def to_dict(self) -> dict:
        return asdict(self)

    def fmt(self, nd: int = 2) -> str:
        return f"{self.mean:+.{nd}f} [{self.lo:+.{nd}f}, {self.hi:+.{nd}f}]"


def paired_diff(
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    seed_sd: Optional[float] = None,
    scale: float = 100.0,
) -> Diff:
    """Paired difference of top-1 (points) between arms ``a`` and ``b``.

    ``a[i]``, ``b[i]``: bool correctness [N] of unit ``i`` of each arm on the same images.
    ``seed_sd``: yardstick for the per-unit spread of the difference when there is one unit.
    ``scale``: 100 turns correctness into points; 1 keeps real-valued per-image scores (e.g.
    PSNR in dB) in their own unit.
    """
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired arms need the same number (>= 1) of units, got {len(a)} and {len(b)}"
        )
    A = np.stack([np.asarray(x, dtype=np.float64) for x in a])  # [n, N]
    B = np.stack([np.asarray(x, dtype=np.float64) for x in b])  # [n, N]
    if A.shape != B.shape:
        raise ValueError(f"arms were scored on different test sets: {A.shape} vs {B.shape}")
    n, N = A.shape
    d = scale * (A.mean(1) - B.mean(1))  # [n] per-unit diffs
    e = scale * (A - B).mean(0)  # [N] per-image diffs
    image_se = float(e.std(ddof=1) / math.sqrt(N)) if N > 1 else 0.0
    sd = float(d.std(ddof=1)) if n > 1 else None
    if sd is not None:
        seed_half = t975(n - 1) * sd / math.sqrt(n)
    elif seed_sd is not None:
        seed_half = 1.96 * seed_sd
    else:
        seed_half = 0.0
    half = math.sqrt(seed_half**2 + (1.96 * image_se) ** 2)
    m = float(d.mean())
    return Diff(
        m,
        m - half,
        m + half,
        n,
        N,
        sd,
        image_se,
        float(scale * A.mean()),
        float(scale * B.mean()),
        [float(x) for x in scale * A.mean(1)],
        [float(x) for x in scale * B.mean(1)],
    )


def verdict(diff: Diff, kind: str = ">", margin: float = 1.0) -> str:
    """``holds`` | ``contradicted`` | ``undecided`` for claim ``A > B`` (kind ``>``),
    ``A < B`` (``<``) or ``A ≈ B`` within ``margin`` points (``~``)."""
    if kind == ">":
        return "holds" if diff.lo > 0 else "contradicted" if diff.hi < 0 else "undecided"
    if kind == "<":
        return "holds" if diff.hi < 0 else "contradicted" if diff.lo > 0 else "undecided"
    if kind == "~":
        if -margin <= diff.lo and diff.hi <= margin:
            return "holds"
        if diff.lo > margin or diff.hi < -margin:
            return "contradicted"
        return "undecided"
    raise ValueError(f"claim kind must be '>', '<' or '~', got {kind!r}")
