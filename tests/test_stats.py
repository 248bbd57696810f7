"""Paired statistics of mimlab.core.stats and the claim verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from mimlab.core.stats import pack_correct, paired_diff, t975, unpack_correct, verdict


def test_pack_roundtrip():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 1000):
        c = rng.random(n) < 0.4
        assert np.array_equal(unpack_correct(pack_correct(c)), c)
    with pytest.raises(ValueError, match="packed correctness"):
        unpack_correct("nonsense")


def test_t_quantiles():
    assert t975(2) == pytest.approx(4.303)
    assert t975(100) == pytest.approx(1.96)
    with pytest.raises(ValueError):
        t975(0)


def test_paired_diff_hand_computed():
    # 2 units x 4 images: A right on 3/4 and 4/4, B right on 2/4 and 2/4
    a = [np.array([1, 1, 1, 0], bool), np.array([1, 1, 1, 1], bool)]
    b = [np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)]
    d = paired_diff(a, b)
    assert d.mean == pytest.approx(37.5)  # (25 + 50) / 2
    assert d.seed_sd == pytest.approx(np.std([25, 50], ddof=1))
    e = 100 * np.array([0, 0.5, 0.5, 0.5])  # per-image mean difference
    assert d.image_se == pytest.approx(e.std(ddof=1) / 2)
    half = np.hypot(12.706 * d.seed_sd / np.sqrt(2), 1.96 * d.image_se)
    assert (d.lo, d.hi) == pytest.approx((37.5 - half, 37.5 + half))
    assert d.a_mean == pytest.approx(87.5) and d.b_mean == pytest.approx(50.0)


def test_single_unit_uses_yardstick():
    a = [np.ones(100, bool)]
    b = [np.r_[np.ones(50, bool), np.zeros(50, bool)]]
    d0 = paired_diff(a, b)
    d1 = paired_diff(a, b, seed_sd=2.0)
    assert d0.seed_sd is None and d1.hi - d1.lo > d0.hi - d0.lo


def test_verdicts():
    rng = np.random.default_rng(1)
    n = 5000
    base = rng.random((3, n)) < 0.5
    better = base | (rng.random((3, n)) < 0.2)  # clearly more correct
    assert verdict(paired_diff(list(better), list(base)), ">") == "holds"
    assert verdict(paired_diff(list(base), list(better)), ">") == "contradicted"
    assert verdict(paired_diff(list(base), list(better)), "<") == "holds"
    same = paired_diff(list(base), list(base))
    assert verdict(same, "~", margin=1.0) == "holds"
    assert verdict(same, ">") == "undecided"
    assert verdict(paired_diff(list(better), list(base)), "~", margin=1.0) == "contradicted"
    with pytest.raises(ValueError):
        verdict(same, "?")
    with pytest.raises(ValueError, match="same number"):
        paired_diff(list(base), list(base[:2]))
