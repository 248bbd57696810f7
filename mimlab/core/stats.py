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


# ------------------------------------------------------------------ protocol v2: runs as units
#
# Protocol v2 (docs/results/standard/protocol.md) makes the *run* the unit: one value per
# pretraining run (random init: per fine-tuning seed), compared with Welch's t, which lets the
# two arms have their own spread and counts each arm's runs once. A claim's sub-tests are
# combined with Holm's correction (see :func:`claim_verdict`).

#: the words of protocol v2
REPRODUCED, NOT_REPRODUCED, UNDECIDED = "reproduced", "not reproduced", "undecided"


def _t():
    import scipy.stats  # lazy: scipy is only needed by the suite's statistics

    return scipy.stats.t


@dataclass
class RunDiff:
    """``mean(A) - mean(B)`` over per-run values with its Welch interval (level ``1 - alpha``).

    ``se``: standard error, ``df``: Welch-Satterthwaite degrees of freedom (``inf`` when both
    arms have no spread)."""

    mean: float
    lo: float
    hi: float
    se: float
    df: float
    a_mean: float
    b_mean: float
    a_units: list
    b_units: list
    alpha: float = 0.05

    def to_dict(self) -> dict:
        return asdict(self)

    def fmt(self, nd: int = 2) -> str:
        return f"{self.mean:+.{nd}f} [{self.lo:+.{nd}f}, {self.hi:+.{nd}f}]"

    def p_above(self, x: float) -> float:
        """One-sided p-value of H0 ``difference <= x`` (small: the difference is above x)."""
        if self.se == 0:
            return 0.0 if self.mean > x else 1.0
        return float(_t().sf((self.mean - x) / self.se, self.df))

    def p_below(self, x: float) -> float:
        """One-sided p-value of H0 ``difference >= x`` (small: the difference is below x)."""
        if self.se == 0:
            return 0.0 if self.mean < x else 1.0
        return float(_t().cdf((self.mean - x) / self.se, self.df))


def _welch_se_df(var_a: float, n_a: int, var_b: float, n_b: int) -> tuple[float, float]:
    """Standard error of a difference of two means (per-unit variances ``var_*`` over ``n_*``
    units) and its Welch-Satterthwaite degrees of freedom (``inf`` without spread)."""
    va, vb = var_a / n_a, var_b / n_b
    se = math.sqrt(va + vb)
    if se == 0:
        return 0.0, math.inf
    return se, (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))


def welch(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> RunDiff:
    """Welch's two-sample t interval for ``mean(a) - mean(b)``; ``a``, ``b``: one value per
    unit (run), at least 2 each."""
    A, B = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(A) < 2 or len(B) < 2:
        raise ValueError(f"Welch's t needs >= 2 units per arm, got {len(A)} and {len(B)}")
    se, df = _welch_se_df(float(A.var(ddof=1)), len(A), float(B.var(ddof=1)), len(B))
    half = float(_t().ppf(1 - alpha / 2, df)) * se if se > 0 else 0.0
    m = float(A.mean() - B.mean())
    return RunDiff(
        m,
        m - half,
        m + half,
        se,
        float(df),
        float(A.mean()),
        float(B.mean()),
        [float(x) for x in A],
        [float(x) for x in B],
        alpha,
    )


def subtest(diff: RunDiff, kind: str, margin: float = 0.0) -> dict:
    """One sub-test of a claim: the one-sided p-values for (``p_support``) and against
    (``p_refute``) it.

    * ``>``: A above B; refuted when A is below B;
    * ``<``: the mirror image;
    * ``~``: A within ``±margin`` of B (two one-sided tests); refuted when A is outside it;
    * ``>=``: A at least as good as B (non-inferiority): A above ``B - margin``; refuted when
      A is below ``B - margin``;
    * ``effect``: A above B by an effect that matters, ``margin`` = the smallest one (e.g. a
      quarter of the paper's effect): supported when A is above B and the interval reaches
      ``margin``, refuted when A - B is below ``margin``.
    """
    if kind == ">":
        sup, ref = diff.p_above(0.0), diff.p_below(0.0)
    elif kind == "<":
        sup, ref = diff.p_below(0.0), diff.p_above(0.0)
    elif kind == "~":
        if margin <= 0:
            raise ValueError(f"an '≈' sub-test needs a positive margin, got {margin}")
        sup = max(diff.p_above(-margin), diff.p_below(margin))
        ref = min(diff.p_below(-margin), diff.p_above(margin))
    elif kind == ">=":
        if margin <= 0:
            raise ValueError(
                f"a '>=' (non-inferiority) sub-test needs a positive margin, got {margin}"
            )
        sup, ref = diff.p_above(-margin), diff.p_below(-margin)
    elif kind == "effect":
        sup = diff.p_above(0.0) if diff.hi >= margin else 1.0
        ref = diff.p_below(margin)
    else:
        raise ValueError(f"sub-test kind must be '>', '<', '~', '>=' or 'effect', got {kind!r}")
    return {"kind": kind, "margin": margin, "p_support": sup, "p_refute": ref}


def holm(pvalues: Sequence[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure: which hypotheses are rejected at family-wise level
    ``alpha``."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - rank):
            break
        out[i] = True
    return out


def claim_verdict(tests: Sequence[dict], alpha: float = 0.025) -> dict:
    """Protocol v2's verdict of a claim made of ``tests`` (from :func:`subtest`); ``alpha`` is
    one-sided (0.025: the decisions agree with the two-sided 95 % intervals).

    **reproduced**: every sub-test supports the claim at ``alpha`` (intersection-union: no
    correction is needed to conclude that all hold); **not reproduced**: at least one sub-test
    refutes it after Holm's correction across the sub-tests; otherwise **undecided**."""
    if not tests:
        raise ValueError("a claim needs at least one sub-test")
    refuted = holm([t["p_refute"] for t in tests], alpha)
    if any(refuted):
        word = NOT_REPRODUCED
    elif all(t["p_support"] < alpha for t in tests):
        word = REPRODUCED
    else:
        word = UNDECIDED
    return {"verdict": word, "refuted": refuted, "alpha_one_sided": alpha}


def units_for_power(
    diff: RunDiff,
    kind: str,
    margin: float = 0.0,
    alpha: float = 0.025,
    power: float = 0.8,
    cap: int = 100,
) -> Optional[int]:
    """Units per arm at which a sub-test of kind ``kind`` (see :func:`subtest`) would decide, one
    way or the other, with probability ``power`` at one-sided level ``alpha`` -- if the true
    difference and the per-arm spreads were the ones observed in ``diff`` (a plan for the next
    budget, not a result). The distance that has to be resolved is the difference's distance
    to the sub-test's boundary (0; the "≈" band's edge ``±margin``; ``-margin`` for ``>=``;
    ``margin`` for ``effect``); with Welch's degrees of freedom at ``n`` units per arm, ``n``
    is the smallest with ``distance / se_n >= t_{1-alpha} + t_{power}``. None: not within
    ``cap`` units (the difference sits on the boundary), or no spread to scale."""
    m = diff.mean
    boundary = {
        ">": 0.0,
        "<": 0.0,
        "~": math.copysign(margin, m),
        ">=": -margin,
        "effect": margin,
    }[kind]
    distance = abs(m - boundary)
    va = float(np.var(diff.a_units, ddof=1))
    vb = float(np.var(diff.b_units, ddof=1))
    if va + vb == 0 or distance == 0:
        return None
    t = _t()
    for n in range(2, cap + 1):
        se, df = _welch_se_df(va, n, vb, n)
        if distance / se >= float(t.ppf(1 - alpha, df)) + float(t.ppf(power, df)):
            return n
    return None
