"""The min-norm solver: hand-made 2- and 3-objective cases, the 2-objective closed form, Frank-Wolfe vs a grid;
the preference-weighted solve against scipy's SLSQP on random and degenerate cases."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from modpo_trl.trainers.mgda import descent_coefficients, min_norm_coefficients


def norm(alpha, grads):
    return (alpha.double() @ grads.double()).norm().item()


def simplex_grid_3(steps=400):
    i, j = torch.meshgrid(torch.arange(steps + 1), torch.arange(steps + 1), indexing="ij")
    keep = i + j <= steps
    return torch.stack([i[keep], j[keep], steps - i[keep] - j[keep]], 1).double() / steps


def test_two_conflicting_gradients_cancel_at_one_half():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    alpha = min_norm_coefficients(grads)
    assert torch.allclose(alpha, torch.tensor([0.5, 0.5])) and norm(alpha, grads) == 0.0
    # unequal lengths: the point of the segment through 0 (2/3 of the short one, 1/3 of the long one)
    alpha = min_norm_coefficients(torch.tensor([[1.0, 0.0], [-2.0, 0.0]]))
    assert torch.allclose(alpha, torch.tensor([2 / 3, 1 / 3]))


def test_two_aligned_gradients_weight_the_shorter():
    grads = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    assert torch.allclose(min_norm_coefficients(grads), torch.tensor([1.0, 0.0]))
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    assert torch.allclose(min_norm_coefficients(same), torch.tensor([0.5, 0.5]))  # any point: the middle


def test_a_short_gradient_inside_the_hull_takes_all_the_weight():
    grads = torch.tensor([[0.1, 0.0], [1.0, 1.0]])  # g1 . (g2 - g1) >= 0: g1 is the min-norm point
    assert torch.allclose(min_norm_coefficients(grads), torch.tensor([1.0, 0.0]))
    grads3 = torch.tensor([[1.0, 1.0, 0.0], [0.05, 0.05, 0.05], [1.0, -0.2, 1.0]])
    assert torch.allclose(min_norm_coefficients(grads3), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def test_two_objectives_match_the_closed_form():
    torch.manual_seed(0)
    for _ in range(50):
        g1, g2 = torch.randn(2, 5).double()
        gamma = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)
        alpha = min_norm_coefficients(torch.stack([g1, g2]))
        assert torch.allclose(alpha, torch.stack([gamma, 1 - gamma]))
        assert alpha.dtype == torch.float64 and alpha.sum() == pytest.approx(1.0)


def test_three_directions_120_degrees_apart_balance_at_the_centre():
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    grads = torch.stack([angles.cos(), angles.sin()], 1)
    alpha = min_norm_coefficients(grads)
    assert torch.allclose(alpha, torch.full((3,), 1 / 3), atol=1e-5) and norm(alpha, grads) < 1e-5


def test_frank_wolfe_matches_a_brute_force_grid_for_three_objectives():
    torch.manual_seed(1)
    grid = simplex_grid_3()
    for trial in range(30):
        grads = torch.randn(3, 2 + trial % 5) * torch.tensor([1.0, 0.3, 3.0])[:, None]
        alpha = min_norm_coefficients(grads)
        assert alpha.min() >= 0 and alpha.sum().item() == pytest.approx(1.0)
        best = (grid @ grads.double()).norm(dim=1).min().item()
        assert norm(alpha, grads) <= best + 1e-4


def test_one_objective_and_bad_shapes():
    assert min_norm_coefficients(torch.tensor([[3.0, 4.0]])).tolist() == [1.0]
    with pytest.raises(ValueError, match=r"grads must have shape \(k, d\) with k >= 1, got \(3,\)"):
        min_norm_coefficients(torch.ones(3))


def test_l2_normalisation_makes_the_direction_independent_of_the_losses_scales():
    grads = torch.tensor([[100.0, 0.0], [0.0, 1.0]])  # orthogonal: no conflict, very different scales
    plain = descent_coefficients(grads, "none")
    assert torch.allclose(plain, torch.tensor([1 / 10001, 10000 / 10001]))  # the small gradient takes it all
    c = descent_coefficients(grads, "l2")
    assert torch.allclose(
        c, torch.tensor([1 / 101, 100 / 101])
    )  # c_i ~ alpha_i / ||g_i||, alpha = (1/2, 1/2)
    direction = c @ grads
    assert torch.allclose(direction[0], direction[1])  # the same angle to both gradients
    # a loss that is already stationary (zero gradient) stops plain MGDA, and is left out with "l2"
    stationary = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert descent_coefficients(stationary, "none").tolist() == [1.0, 0.0]
    assert descent_coefficients(stationary, "l2").tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"normalization='max' is not valid; valid: \['l2', 'none'\]"):
        descent_coefficients(grads, "max")


def is_min_norm_point(alpha, grads, tol=1e-9):
    """The optimality conditions on the simplex: no vertex direction decreases ||alpha @ G||^2."""
    gram = grads.double() @ grads.double().T
    grad = gram @ alpha.double()
    return (
        alpha.min() >= 0
        and abs(alpha.sum().item() - 1) < 1e-12
        and (grad - alpha.double() @ grad).min() > -tol
    )


def test_up_to_eight_losses_are_solved_exactly_whatever_mgda_max_iter():
    """Frank-Wolfe stopped silently at max_iter; small problems now have no iteration budget to run out of."""
    torch.manual_seed(2)
    for trial in range(40):
        k = 3 + trial % 6
        grads = torch.randn(k, 2 + trial % 7).double()  # often fewer dimensions than losses: rank-deficient
        alpha = min_norm_coefficients(grads, max_iter=1)
        assert is_min_norm_point(alpha, grads), (k, alpha)


def test_frank_wolfe_warns_with_its_duality_gap_when_it_stops_at_max_iter():
    torch.manual_seed(3)
    grads = torch.randn(10, 6).double()
    with pytest.warns(
        RuntimeWarning, match=r"stopped at mgda_max_iter=1 with duality gap [0-9.e+-]+ > mgda_tol"
    ):
        min_norm_coefficients(grads, max_iter=1)
    alpha = min_norm_coefficients(grads, max_iter=10_000, tol=1e-12)  # converged: no warning, optimal
    assert is_min_norm_point(alpha, grads, tol=1e-6)


def scipy_min_norm_point(vertices: np.ndarray) -> np.ndarray:
    """The min-norm point of the hull of `vertices` (k, d), solved independently: SLSQP on the simplex QP."""
    k = len(vertices)
    gram = vertices @ vertices.T
    gram = gram / np.abs(gram).max()  # well scaled for SLSQP's tolerances; the minimiser does not change
    result = minimize(
        lambda a: a @ gram @ a,
        np.full(k, 1.0 / k),
        jac=lambda a: 2 * gram @ a,
        bounds=[(0.0, 1.0)] * k,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0}],
        method="SLSQP",
        options={"ftol": 1e-13, "maxiter": 1000},
    )
    assert result.success, result.message
    return result.x @ vertices


@pytest.mark.parametrize("normalization", ["l2", "none"])
def test_weighted_solve_matches_scipy_on_random_cases(normalization):
    rng = np.random.default_rng(0)
    for trial in range(60):
        k, d = int(rng.integers(2, 6)), int(rng.integers(2, 9))
        grads = rng.normal(size=(k, d)) * rng.uniform(0.05, 5.0, size=(k, 1))
        if trial % 3 == 0:  # a shared component: gradients that agree more often than random ones
            grads += rng.normal(size=d)
        rho = rng.dirichlet(np.ones(k))
        if trial % 4 == 0:
            rho[0] = 0.0
            rho /= rho.sum()
        # ill-conditioned cases (a weight of 0.01 scales a vertex by 100) need more than the default 250 iterations
        c = descent_coefficients(
            torch.tensor(grads), normalization, max_iter=5000, weights=torch.tensor(rho)
        ).numpy()
        assert c.min() >= 0 and c.sum() == pytest.approx(1.0) and (c[rho == 0] == 0).all()
        live = rho > 0
        scale = (np.linalg.norm(grads, axis=1) if normalization == "l2" else 1.0) * np.where(live, rho, 1.0)
        vertices = (grads / scale[:, None])[live]
        expected = scipy_min_norm_point(vertices)
        ours = (c @ grads) / (c @ scale)  # c_i = alpha_i / scale_i, renormalised: back to sum_i alpha_i v_i
        # the same point (SLSQP stops a little short: our squared norm is never larger, and the minimum is flat)
        assert ours @ ours <= expected @ expected + 1e-9 * max(1.0, expected @ expected)
        np.testing.assert_allclose(ours, expected, atol=1e-4 * max(1.0, np.linalg.norm(expected)))
        assert (vertices @ ours >= (ours @ ours) * (1 - 1e-6) - 1e-9).all()


def test_weighted_solve_keeps_the_preference_share_of_non_conflicting_losses():
    """The issue's example: two orthogonal gradients (losses on disjoint pairs) of equal length. Plain MGDA splits
    50/50 whatever the preference; the weighted solve returns the preference; with unequal lengths it is the
    preference on the unit gradients (l2)."""
    grads = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    for w in ([0.9, 0.1], [0.1, 0.9]):
        assert torch.allclose(descent_coefficients(grads), torch.tensor([0.5, 0.5]))
        assert torch.allclose(descent_coefficients(grads, weights=torch.tensor(w)), torch.tensor(w))
    scaled = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    c = descent_coefficients(scaled, weights=torch.tensor([0.9, 0.1]))
    direction = c @ scaled
    assert (direction / direction.sum()).tolist() == pytest.approx([0.9, 0.1])  # shares on unit gradients


def test_weighted_solve_degenerate_cases():
    w = torch.tensor([0.7, 0.3])
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    c = descent_coefficients(same, weights=w)  # any hull point is the same point: a convex combination
    assert c.sum().item() == pytest.approx(1.0) and torch.allclose(c @ same, same[0])
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # no common descent: the hull holds 0
    c = descent_coefficients(opposite, weights=w)
    assert (c @ opposite).norm().item() < 1e-9 and c.tolist() == pytest.approx([0.5, 0.5])
    parallel = torch.tensor([[1.0, 1.0], [4.0, 4.0]])  # aligned, different lengths: unit gradients coincide
    c = descent_coefficients(parallel, weights=w)
    assert c.min() >= 0 and torch.allclose(
        (c @ parallel) / (c @ parallel).norm(), parallel[0] / parallel[0].norm()
    )
    stationary = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert descent_coefficients(stationary, "l2", weights=w).tolist() == [0.0, 1.0]
    assert descent_coefficients(stationary, "none", weights=w).tolist() == [1.0, 0.0]
    assert descent_coefficients(torch.zeros(2, 3), weights=w).tolist() == pytest.approx([0.7, 0.3])
    assert descent_coefficients(torch.tensor([[2.0, 0.0]]), weights=torch.tensor([1.0])).tolist() == [1.0]
    one = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert descent_coefficients(one, weights=torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]
    for bad in ([0.5], [0.0, 0.0], [-0.1, 1.1], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match=r"weights=.* must be 2 finite numbers >= 0, not all 0"):
            descent_coefficients(one, weights=torch.tensor(bad))
