"""Protocol v2's statistics (mimlab.core.stats: welch, subtest, holm, claim_verdict).

The coverage tests simulate experiments with a known difference and a known run-to-run spread
and count how often the 95 % interval covers the truth: Welch's interval on per-run values
covers it about 95 % of the time, v1's nested pairing (3 pretraining runs x 3 fine-tuning
seeds against 3 reused random-init seeds, counted as 9 paired units) does not.
"""

import math

import numpy as np
import pytest

from mimlab.core.stats import (
    NOT_REPRODUCED,
    REPRODUCED,
    UNDECIDED,
    claim_verdict,
    holm,
    paired_diff,
    subtest,
    welch,
)

SIMS = 4000  # binomial sd of a 95 % coverage estimate: 0.0034


def test_welch_matches_a_hand_computation():
    a, b = [10.0, 12.0, 14.0], [9.0, 9.5, 10.0]
    d = welch(a, b)
    va, vb = 4.0 / 3, 0.25 / 3
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert d.mean == pytest.approx(2.5) and d.se == pytest.approx(se)
    assert d.df == pytest.approx(df)
    # t quantile at df = 2.2353...: between t_2 (4.303) and t_3 (3.182)
    q = (d.hi - d.mean) / se
    assert 3.182 < q < 4.303
    # the interval includes 0, so the one-sided p-value of "A above B" exceeds 0.025
    assert d.lo < 0 < d.hi and 0.025 < d.p_above(0) < 0.1
    assert d.p_above(-3.0) < 0.025 and d.p_below(8.0) < 0.025
    assert d.p_above(0) + d.p_below(0) == pytest.approx(1.0)


def test_welch_needs_two_units():
    with pytest.raises(ValueError, match=">= 2 units"):
        welch([1.0], [1.0, 2.0])


def _coverage_v2(rng, delta, sd_a, sd_b, n_a, n_b):
    hit = 0
    for _ in range(SIMS):
        a = delta + sd_a * rng.standard_normal(n_a)
        b = sd_b * rng.standard_normal(n_b)
        d = welch(a, b)
        hit += d.lo <= delta <= d.hi
    return hit / SIMS


@pytest.mark.parametrize(
    "sd_a, sd_b, n_a, n_b",
    [(1.0, 1.0, 3, 3), (1.5, 0.3, 3, 3), (0.4, 1.2, 3, 5)],
)
def test_welch_interval_covers_the_truth_95_percent(sd_a, sd_b, n_a, n_b):
    cov = _coverage_v2(np.random.default_rng(0), 2.0, sd_a, sd_b, n_a, n_b)
    # Welch's df is below the pooled df, so with equal spreads it is slightly conservative
    assert 0.935 <= cov <= 0.975, cov


def test_v1_nested_pairing_undercovers_and_v2_does_not():
    """v1 design: MAE = 3 pretraining runs x 3 FT seeds, random init = 3 FT seeds reused against
    every MAE run, the 9 pairs counted as independent units (t with 8 df). With a pretraining
    spread larger than the fine-tuning spread its interval misses the truth far more often than
    5 %. v2 on the same kind of data: one FT per run, Welch on the runs."""
    rng = np.random.default_rng(1)
    delta, sd_run, sd_ft = 2.0, 1.0, 0.3
    hit_v1 = hit_v2 = 0
    for _ in range(SIMS):
        r = sd_run * rng.standard_normal(3)  # pretraining runs of MAE
        f = sd_ft * rng.standard_normal((3, 3))  # MAE FT seeds per run
        g = sd_ft * rng.standard_normal(3)  # random-init FT seeds (reused in v1)
        mae = delta + r[:, None] + f  # [run, ft seed]
        # v1: unit (i, j) of MAE paired with random seed j; per-image term omitted (a v1
        # interval only gets wider with it, and the test images are the same in both designs)
        d = (mae - g[None, :]).reshape(-1)
        half = 2.306 * d.std(ddof=1) / math.sqrt(len(d))  # t_8
        hit_v1 += abs(d.mean() - delta) <= half
        w = welch(mae[:, 0], g)  # v2: the run is the unit (one FT seed per run)
        hit_v2 += w.lo <= delta <= w.hi
    cov_v1, cov_v2 = hit_v1 / SIMS, hit_v2 / SIMS
    assert cov_v1 < 0.85, cov_v1
    assert 0.935 <= cov_v2 <= 0.965, cov_v2


def test_v1_borrowed_spread_undercovers():
    """v1 gave single-run arms MAE's pretraining sd (0.154) as if known; when the arm's own
    run-to-run sd is 1 point, its interval covers the truth far less than 95 % of the time."""
    rng = np.random.default_rng(2)
    hit = 0
    for _ in range(SIMS):
        a = 1.0 + 1.0 * rng.standard_normal()  # one pretraining run of the arm
        b = 0.3 * rng.standard_normal(3)  # random init, 3 seeds
        half = math.sqrt((1.96 * 0.154) ** 2 + (4.303 * b.std(ddof=1) / math.sqrt(3)) ** 2)
        hit += abs(a - b.mean() - 1.0) <= half
    assert hit / SIMS < 0.7


def test_subtests_and_their_words():
    up = welch([5.0, 5.2, 4.9], [1.0, 1.1, 0.8])
    down = welch([1.0, 1.1, 0.8], [5.0, 5.2, 4.9])
    near = welch([3.0, 3.05, 2.95], [3.0, 3.02, 2.97])
    noisy = welch([0.0, 6.0, -5.0], [0.0, 0.5, -0.5])
    assert claim_verdict([subtest(up, ">")])["verdict"] == REPRODUCED
    assert claim_verdict([subtest(down, ">")])["verdict"] == NOT_REPRODUCED
    assert claim_verdict([subtest(noisy, ">")])["verdict"] == UNDECIDED
    assert claim_verdict([subtest(near, "~", 0.5)])["verdict"] == REPRODUCED
    assert claim_verdict([subtest(up, "~", 0.5)])["verdict"] == NOT_REPRODUCED
    # an effect that is significant but far below the smallest effect that matters
    small = welch([0.03, 0.031, 0.029], [0.0, 0.001, -0.001])
    assert claim_verdict([subtest(small, ">")])["verdict"] == REPRODUCED
    assert claim_verdict([subtest(small, "effect", 0.375)])["verdict"] == NOT_REPRODUCED
    with pytest.raises(ValueError, match="positive margin"):
        subtest(near, "~", 0.0)


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03], 0.05) == [True, False, False]  # 0.03 > 0.05/2
    assert holm([0.01, 0.02, 0.024], 0.05) == [True, True, True]
    assert holm([0.2, 0.001], 0.05) == [False, True]


def test_a_claim_needs_all_subtests_and_corrects_refutations():
    up = subtest(welch([5.0, 5.2, 4.9], [1.0, 1.1, 0.8]), ">")
    unclear = subtest(welch([0.0, 6.0, -5.0], [0.0, 0.5, -0.5]), ">")
    assert claim_verdict([up, unclear])["verdict"] == UNDECIDED
    # a refutation at p = 0.02 alone counts; among 3 sub-tests Holm needs p < 0.025/3
    weak = {"kind": ">", "margin": 0.0, "p_support": 0.98, "p_refute": 0.02}
    assert claim_verdict([weak])["verdict"] == NOT_REPRODUCED
    assert claim_verdict([up, up, weak])["verdict"] == UNDECIDED


def test_v1_paired_diff_still_available_for_the_appendix():
    a = [np.array([1, 1, 0, 1], bool), np.array([1, 0, 0, 1], bool)]
    b = [np.array([0, 1, 0, 1], bool), np.array([0, 0, 0, 1], bool)]
    assert paired_diff(a, b).mean == pytest.approx(25.0)
