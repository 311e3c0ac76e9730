"""The min-norm solver: hand-made 2- and 3-objective cases, the 2-objective closed form, Frank-Wolfe vs a grid."""

import math

import pytest
import torch

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
