import math
import warnings

import numpy as np
import pytest
from scipy import stats

from modpo_trl.evaluation.pareto import (
    controllability,
    default_reference_point,
    generalization,
    hypervolume,
    mean_ci,
    non_dominated,
)

# ---------------------------------------------------------------- non_dominated


def test_non_dominated_2d_keeps_duplicates_drops_dominated():
    pts = [[1, 3], [2, 2], [3, 1], [1, 1], [2, 2]]
    assert non_dominated(pts).tolist() == [True, True, True, False, True]


def test_non_dominated_2d_weak_domination_removes_point():
    # [1, 2] is weakly dominated by [1, 3] (equal x, better y) -> dominated.
    assert non_dominated([[1, 3], [1, 2], [0, 5]]).tolist() == [True, False, True]


def test_non_dominated_returns_bool_array_of_len_k():
    mask = non_dominated(np.array([[0.0, 1.0]]))
    assert mask.dtype == bool and mask.shape == (1,) and mask.tolist() == [True]


def test_non_dominated_3d_by_hand():
    pts = [
        [1, 2, 3],  # non-dominated
        [3, 2, 1],  # non-dominated
        [1, 1, 1],  # dominated by both of the above
        [2, 2, 2],  # non-dominated (beats each of the first two on some objective)
        [1, 2, 2],  # dominated by [1, 2, 3] and by [2, 2, 2]
        [0, 0, 4],  # non-dominated (best on objective 3)
        [1, 2, 3],  # duplicate of a non-dominated point -> kept
    ]
    assert non_dominated(pts).tolist() == [True, True, False, True, False, True, True]


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ([1.0, 2.0], "2-D"),
        ([[1.0], [2.0]], "n >= 2"),
        ([[1.0, float("nan")]], "finite"),
        ([[1.0, float("inf")]], "finite"),
        (np.empty((0, 2)), "at least one"),
    ],
)
def test_non_dominated_validation(bad, fragment):
    with pytest.raises(ValueError, match="points") as exc:
        non_dominated(bad)
    assert fragment in str(exc.value)


# ---------------------------------------------------------------- hypervolume


def test_hypervolume_2d_staircase():
    # Union of rectangles from [0, 0]: x in [0,1] height 3, [1,2] height 2, [2,3] height 1.
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(1 * 3 + 1 * 2 + 1 * 1)


def test_hypervolume_ignores_dominated_and_duplicate_points():
    base = hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0])
    assert hypervolume([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2]], [0, 0]) == pytest.approx(base)


def test_hypervolume_ignores_points_not_dominating_reference():
    # [-1, 5] is worse than the reference on objective 0, [4, 0] equal to it on objective 1.
    assert hypervolume([[1, 3], [-1, 5], [4, 0]], [0, 0]) == pytest.approx(3.0)
    assert hypervolume([[-1, 5], [4, 0]], [0, 0]) == 0.0


def test_hypervolume_nonzero_reference():
    # One point [3, 4] against reference [1, 1]: (3-1) * (4-1) = 6.
    assert hypervolume([[3, 4]], [1, 1]) == pytest.approx(6.0)


def test_hypervolume_3d_single_point_and_inclusion_exclusion():
    assert hypervolume([[1, 2, 3]], [0, 0, 0]) == pytest.approx(6.0)
    # 6 + 6 - overlap box [min(1,3), min(2,2), min(3,1)] = [1, 2, 1] -> 2.
    assert hypervolume([[1, 2, 3], [3, 2, 1]], [0, 0, 0]) == pytest.approx(10.0)


def test_hypervolume_validation():
    with pytest.raises(ValueError, match=r"reference_point.*shape \(2,\)"):
        hypervolume([[1, 2]], [0, 0, 0])
    with pytest.raises(ValueError, match="reference_point must be finite"):
        hypervolume([[1, 2]], [0, float("nan")])
    with pytest.raises(ValueError, match="points must be finite"):
        hypervolume([[1, float("nan")]], [0, 0])
    with pytest.raises(ValueError, match="points must be a 2-D"):
        hypervolume([1, 2], [0, 0])


# ---------------------------------------------------------------- default_reference_point


def test_default_reference_point_small_example():
    pts = [[1.0, 10.0], [3.0, 20.0], [2.0, 15.0]]
    # min - 0.1 * range: 1 - 0.1*2 = 0.8 ; 10 - 0.1*10 = 9.0
    np.testing.assert_allclose(default_reference_point(pts), [0.8, 9.0])


def test_default_reference_point_zero_range():
    # Range 0 -> margin 0.1 * max(|min|, 1): objective 0: 5 - 0.5; objective 1: 0 - 0.1.
    np.testing.assert_allclose(default_reference_point([[5.0, 0.0], [5.0, 0.0]]), [4.5, -0.1])


def test_default_reference_point_is_strictly_dominated_by_every_point():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(20, 3))
    ref = default_reference_point(pts)
    assert np.all(pts > ref)
    assert hypervolume(pts, ref) > 0.0


# ---------------------------------------------------------------- controllability


def test_controllability_perfect_and_reversed_and_names():
    w1 = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    weights = np.stack([w1, 1 - w1], axis=1)
    # objective "a" rises with its weight; objective "b" falls as its own weight rises.
    scores = np.stack([[0.1, 0.2, 0.5, 0.9, 1.3], [0.1, 0.2, 0.3, 0.4, 0.5]], axis=1)
    out = controllability(weights, scores, ["a", "b"])
    assert set(out) == {"a", "b"}
    assert out["a"] == {"kendall_tau": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    assert out["b"] == {"kendall_tau": pytest.approx(-1.0), "spearman": pytest.approx(-1.0)}


def test_controllability_constant_input_is_nan_without_warnings():
    weights = [[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]]
    scores = [[1.0, 0.3], [1.0, 0.2], [1.0, 0.1]]  # objective 0 constant
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = controllability(weights, scores)
    assert list(out) == ["objective_0", "objective_1"]
    assert math.isnan(out["objective_0"]["kendall_tau"])
    assert math.isnan(out["objective_0"]["spearman"])
    # Objective 1: its weight falls (0.8 -> 0.2) while its score falls -> +1.
    assert out["objective_1"]["kendall_tau"] == pytest.approx(1.0)
    assert out["objective_1"]["spearman"] == pytest.approx(1.0)


def test_controllability_validation():
    with pytest.raises(ValueError, match="same shape"):
        controllability([[0.5, 0.5]], [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="objective_names"):
        controllability([[0.5, 0.5]], [[1, 2]], ["only_one"])


# ---------------------------------------------------------------- mean_ci


def test_mean_ci_matches_hand_computation():
    values = [1.0, 2.0, 3.0, 4.0]
    mean, half = mean_ci(values, confidence=0.95)
    # sample sd = sqrt(((1.5^2 + 0.5^2) * 2) / 3) = sqrt(5/3); sem = sd / 2
    expected = stats.t.ppf(0.975, df=3) * math.sqrt(5 / 3) / 2
    assert mean == pytest.approx(2.5)
    assert half == pytest.approx(expected)
    assert half == pytest.approx(2.0543, abs=1e-3)


def test_mean_ci_single_value():
    assert mean_ci([0.7]) == (pytest.approx(0.7), 0.0)


def test_mean_ci_non_finite_raises():
    with pytest.raises(ValueError, match=r"2 non-finite"):
        mean_ci([1.0, float("nan"), float("inf")])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=1.5)
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])


def test_generalization_interpolates_between_trained_preferences_2d():
    trained_w = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    trained_s = [[1.0, 0.0], [0.6, 0.6], [0.0, 1.0]]
    # (0.75, 0.25) lies halfway between the first two: interpolated (0.8, 0.3); achieved (0.9, 0.2)
    result = generalization(
        trained_w, trained_s, [[0.25, 0.75], [0.75, 0.25]], [[0.3, 0.8], [0.9, 0.2]], ["a", "b"]
    )
    first, second = result["per_preference"]
    assert first["interpolated"] == pytest.approx([0.3, 0.8]) and first["abs_error"] == pytest.approx(
        [0.0, 0.0]
    )
    assert second["interpolated"] == pytest.approx([0.8, 0.3])
    assert second["abs_error"] == pytest.approx([0.1, 0.1]) and not second["extrapolated"]
    assert result["mean_abs_error"] == pytest.approx({"a": 0.05, "b": 0.05})


def test_generalization_3d_inside_and_outside_the_trained_hull():
    trained_w = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    trained_s = np.eye(3)  # each vertex reaches its own objective only: the interpolation is w itself
    inside = generalization(trained_w, trained_s, [[0.2, 0.3, 0.5]], [[0.2, 0.3, 0.5]], ["a", "b", "c"])
    assert inside["per_preference"][0]["interpolated"] == pytest.approx([0.2, 0.3, 0.5])
    assert inside["mean_abs_error"] == pytest.approx({"a": 0, "b": 0, "c": 0}, abs=1e-12)
    # trained on two vertices and the centre only: a preference near the missing vertex is extrapolated
    partial = generalization(
        [[1, 0, 0], [0, 1, 0], [1 / 3, 1 / 3, 1 / 3]],
        np.eye(3),
        [[0.0, 0.1, 0.9]],
        [[0, 0, 1]],
        ["a", "b", "c"],
    )
    assert partial["per_preference"][0]["extrapolated"] is True
    with pytest.raises(ValueError, match="shapes do not match"):
        generalization(trained_w, trained_s, [[0.5, 0.5]], [[0.5, 0.5]], ["a", "b", "c"])
