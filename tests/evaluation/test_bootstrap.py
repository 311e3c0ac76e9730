"""The paired bootstrap over prompts against hand computations: every resample of 3 prompts enumerated (27 of
them, each as likely), so the bootstrap distribution is exact and its percentiles can be worked out by hand."""

import itertools

import numpy as np
import pytest
from scipy import stats

from modpo_trl.evaluation.bootstrap import (
    DOMINATED,
    DOMINATED_NOISY,
    FRONT,
    FRONT_NOISY,
    PromptBootstrap,
    interval,
    resample_indices,
)
from modpo_trl.evaluation.pareto import controllability, hypervolume, rank_correlations

EVERY_RESAMPLE_OF_3 = np.array(list(itertools.product(range(3), repeat=3)))  # (27, 3)


def boot(values, **kwargs):
    """PromptBootstrap of candidates given as (prompts, objectives) lists."""
    return PromptBootstrap(np.array(values, dtype=float), **kwargs)


def test_paired_difference_by_hand():
    # Prompt 3 is much harder than prompt 1 for both candidates; b beats a by 0, 0 and 3 on the three prompts.
    a = [[1.0, 0.0], [5.0, 0.0], [9.0, 0.0]]
    b = [[1.0, 1.0], [5.0, 1.0], [12.0, 1.0]]
    bs = boot([a, b], indices=EVERY_RESAMPLE_OF_3)
    estimate, lo, hi = bs.difference(0, 1)
    # The mean of 3 draws from the differences {0, 0, 3}: 0 in 8 of the 27 resamples, 1 in 12, 2 in 6, 3 in 1.
    # Sorted, numpy's linear percentile puts 2.5% at position 0.025 * 26 = 0.65 (between two zeros: 0) and 97.5%
    # at 25.35: 2 + 0.35 * (3 - 2) = 2.35.
    assert estimate[0] == pytest.approx(1.0) and lo[0] == pytest.approx(0.0) and hi[0] == pytest.approx(2.35)
    # Objective 1: b is better by exactly 1 on every prompt: no noise in the paired difference at all ...
    assert (estimate[1], lo[1], hi[1]) == pytest.approx((1.0, 1.0, 1.0))
    # ... while a's own mean varies across resamples from 1 to 9: pairing removes the prompts' shared difficulty.
    alone_lo, alone_hi = interval(bs.resampled[:, 0, 0], 0.95)
    assert (alone_lo, alone_hi) == pytest.approx((1 + 0.65 * 4 / 3, 9 - 0.65 * 4 / 3))
    # j - i at [i, j]: the other way round is the negative
    assert bs.difference(1, 0)[1][0] == pytest.approx(-2.35)


def test_resamples_are_seeded():
    assert np.array_equal(resample_indices(10, 50, seed=3), resample_indices(10, 50, seed=3))
    assert not np.array_equal(resample_indices(10, 50, seed=3), resample_indices(10, 50, seed=4))
    values = np.random.default_rng(0).normal(size=(3, 10, 2))
    first, second = PromptBootstrap(values, seed=1), PromptBootstrap(values, seed=1)
    assert first.difference(0, 2)[1].tolist() == second.difference(0, 2)[1].tolist()


def test_hypervolume_interval_by_hand_with_one_reference_point():
    # One point (1, mean of [1, 2, 3]) against (0, 0): its hypervolume is the mean of objective 1.
    bs = boot([[[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]]], indices=EVERY_RESAMPLE_OF_3)
    out = bs.hypervolumes({"m": [0]}, np.array([0.0, 0.0]))
    # Sums of 3 draws from {1, 2, 3}: 3 once, 4 three times, ..., 9 once; sorted means 1, 4/3, 4/3, 4/3, ...
    # 2.5%: 1 + 0.65 * (4/3 - 1); 97.5%: 8/3 + 0.35 * (3 - 8/3).
    assert out["value"]["m"]["estimate"] == pytest.approx(2.0)
    assert out["value"]["m"]["ci"] == pytest.approx([1 + 0.65 / 3, 8 / 3 + 0.35 / 3])
    assert out["difference"] == []


def test_hypervolume_difference_is_paired():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 1.0, size=(40, 1))  # shared by both methods' candidates
    front = np.array([[3.0, 1.0], [2.0, 2.0], [1.0, 3.0]])
    values = np.stack([front[k] + difficulty + rng.normal(0, 0.01, (40, 2)) for k in range(3)] * 2)
    values[3:] += 0.2  # the second method's points are better on both objectives, on every prompt
    bs = PromptBootstrap(values, resamples=500)
    out = bs.hypervolumes({"a": [0, 1, 2], "b": [3, 4, 5]}, np.array([-5.0, -5.0]))
    (d,) = out["difference"]
    assert (d["first"], d["second"]) == ("a", "b") and d["estimate"] < 0
    # each method's own hypervolume varies with the prompts' difficulty; their difference much less
    width = {m: np.diff(v["ci"])[0] for m, v in out["value"].items()}
    assert d["resolved"] and np.diff(d["ci"])[0] < 0.2 * min(width.values())


def test_rank_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    weights = np.array([[0.0, 1.0], [0.2, 0.8], [0.2, 0.8], [0.6, 0.4], [1.0, 0.0]])  # a tie in the weights
    scores = np.round(rng.normal(size=(30, 5, 2)), 1)  # ties in the scores too
    tau, rho = rank_correlations(weights, scores)
    for b in range(30):
        for k in range(2):
            assert tau[b, k] == pytest.approx(stats.kendalltau(weights[:, k], scores[b, :, k]).statistic)
            assert rho[b, k] == pytest.approx(stats.spearmanr(weights[:, k], scores[b, :, k]).statistic)
    constant = rank_correlations(weights, np.ones((1, 5, 2)))
    assert np.isnan(constant[0]).all() and np.isnan(constant[1]).all()


def test_controllability_interval():
    weights = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    rng = np.random.default_rng(2)
    # objective 0 rises with its weight on every prompt; objective 1 is noise around one level
    values = np.stack(
        [np.stack([k + rng.normal(0, 0.1, 20), rng.normal(0, 1, 20)], axis=1) for k in range(3)]
    )
    out = PromptBootstrap(values, resamples=400).controllability([0, 1, 2], weights, ["up", "noise"])
    point = controllability(weights, values.mean(axis=1), ["up", "noise"])
    for name in ("up", "noise"):
        assert out[name]["kendall_tau"] == pytest.approx(point[name]["kendall_tau"])
        assert out[name]["spearman"] == pytest.approx(point[name]["spearman"])
    assert out["up"]["kendall_tau_ci"] == [1.0, 1.0] and out["up"]["spearman_ci"] == [1.0, 1.0]
    assert out["noise"]["kendall_tau_ci"][0] < 0 < out["noise"]["kendall_tau_ci"][1]


def _simulated(n_prompts: int, seed: int = 0) -> PromptBootstrap:
    """Five candidates on a front, each prompt with its own difficulty and each answer its own noise."""
    rng = np.random.default_rng(seed)
    front = np.array([[0.60, 0.70], [0.63, 0.66], [0.66, 0.63], [0.69, 0.60], [0.72, 0.56]])
    difficulty = rng.normal(0, 0.15, size=(n_prompts, 2))
    values = np.stack([f + difficulty + rng.normal(0, 0.08, size=(n_prompts, 2)) for f in front])
    return PromptBootstrap(values, resamples=1000, seed=seed)


def test_intervals_shrink_with_more_prompts():
    few, many = _simulated(20), _simulated(320)
    weights = np.array([[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0]])
    ref = np.array([0.3, 0.3])

    def widths(bs):
        _, lo, hi = bs.difference(0, 1)
        hv = bs.hypervolumes({"m": [0, 1, 2, 3, 4]}, ref)["value"]["m"]["ci"]
        tau = bs.controllability([0, 1, 2, 3, 4], weights, ["a", "b"])["a"]["kendall_tau_ci"]
        return hi - lo, hv[1] - hv[0], tau[1] - tau[0]

    (diff_few, hv_few, tau_few), (diff_many, hv_many, tau_many) = widths(few), widths(many)
    # 16x the prompts: about a quarter of the width
    assert np.all(diff_many < 0.4 * diff_few)
    assert hv_many < 0.4 * hv_few
    assert tau_many < tau_few


def test_front_beyond_and_within_noise():
    rng = np.random.default_rng(3)
    base = rng.normal(0.5, 0.2, size=(30, 2))
    top = base + 1.0  # better than `base` on both objectives by 1, on every prompt: dominates it beyond noise
    close = top - np.array([0.001, 0.001]) + rng.normal(0, 0.05, size=(30, 2))  # top's equal within noise
    left = top + np.array([-3.0, 3.0])  # a clear trade-off with `top`: on the front beyond noise
    bs = boot([base, top, close, left])
    places = bs.front()
    # `left` is 2 worse than `base` on objective 0: it does not dominate it
    assert places[0] == {"status": DOMINATED, "dominated_by": [1, 2], "may_be_dominated_by": []}
    assert places[1]["status"] == FRONT_NOISY and places[1]["may_be_dominated_by"] == [2]
    assert places[2]["status"] in (DOMINATED_NOISY, FRONT_NOISY)
    assert places[2]["dominated_by"] == [] and 1 in places[2]["may_be_dominated_by"]
    assert places[3] == {"status": FRONT, "dominated_by": [], "may_be_dominated_by": []}


def test_neighbours_resolved_and_inverted():
    weights = np.array([[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]])
    rng = np.random.default_rng(4)
    shared = rng.normal(0, 1.0, size=(25, 2))
    # objective a: +1, +1 (resolved); objective b: the middle weighting is clearly worse than the one with
    # less weight on b (inverted), the last two are equal within noise (unresolved)
    means = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 5.0]])
    values = np.stack([m + shared + rng.normal(0, 0.01, size=(25, 2)) for m in means])
    out = PromptBootstrap(values, resamples=500).neighbours([0, 1, 2], weights, ["x", "y", "z"], ["a", "b"])
    assert [(d["lower"], d["higher"], d["resolved"], d["as_requested"]) for d in out["a"]] == [
        ("x", "y", True, True),
        ("y", "z", True, True),
    ]
    assert [(d["lower"], d["higher"], d["resolved"]) for d in out["b"]] == [
        ("z", "y", True),
        ("y", "x", False),
    ]
    assert not out["b"][0]["as_requested"]  # y has more weight on b than z but 5 less of it
    assert out["b"][0]["difference"] == pytest.approx(-5.0, abs=0.02)


def test_bad_input():
    with pytest.raises(ValueError, match=r"values must be a non-empty \(candidates, prompts, objectives\)"):
        PromptBootstrap(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="confidence must be in"):
        PromptBootstrap(np.zeros((1, 3, 2)), confidence=95)


def test_hypervolume_statistic_matches_pareto_on_the_means():
    values = np.random.default_rng(5).uniform(size=(3, 12, 2))
    bs = PromptBootstrap(values, resamples=200)
    out = bs.hypervolumes({"all": [0, 1, 2]}, np.zeros(2))
    assert out["value"]["all"]["estimate"] == pytest.approx(hypervolume(values.mean(axis=1), np.zeros(2)))
