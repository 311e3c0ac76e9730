"""The min-norm point of the convex hull of gradients: MGDA's common descent direction (Désidéri, 2012; as a
multi-task solver: Sener & Koltun, 2018, "Multi-Task Learning as Multi-Objective Optimization").

    alpha* = argmin_{alpha in simplex} || sum_i alpha_i g_i ||^2

`-sum_i alpha*_i g_i` decreases every objective at once (or is 0 at a Pareto-stationary point). Two objectives
have a closed form; up to `EXACT_UP_TO` are solved exactly, face by face of the simplex; more by Frank-Wolfe on
the Gram matrix (the pairwise variant, which moves weight from the worst vertex in the support to the best one and
converges linearly on the simplex), with a warning naming the duality gap when it stops at `max_iter` first.

`descent_coefficients` adds the scale normalisation and a preference over the losses (`weights`). Fed gradients
with respect to a shared intermediate tensor rather than the parameters (as `MOCTrainer` does with the per-sequence
log-probs), the solve is Sener & Koltun's MGDA-UB: it minimises an upper bound of the parameter-space norm, and
its direction is a common descent direction for that tensor, not guaranteed one for the parameters.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import torch

# Up to this many losses the min-norm point is solved exactly (2^k - 1 faces, each a (k+1)-sized linear system:
# about a millisecond for 8); beyond, Frank-Wolfe iterates.
EXACT_UP_TO = 8


def _two(g11: float, g12: float, g22: float) -> float:
    """The `gamma` in [0, 1] minimising ||gamma a + (1 - gamma) b||^2, given a.a, a.b, b.b."""
    denominator = g11 - 2 * g12 + g22  # ||a - b||^2
    if denominator <= 0:  # a == b: every gamma gives the same point
        return 0.5
    return min(max((g22 - g12) / denominator, 0.0), 1.0)


def min_norm_coefficients(grads: torch.Tensor, max_iter: int = 250, tol: float = 1e-10) -> torch.Tensor:
    """`alpha` on the simplex minimising `||alpha @ grads||` for `grads` of shape `(k, d)`; returns shape `(k,)`.

    `max_iter` and `tol` (on the Frank-Wolfe duality gap, which bounds the distance to the optimal squared norm)
    only matter for `k > EXACT_UP_TO`. Solved in float64; returned in the dtype of `grads`.
    """
    if grads.dim() != 2 or grads.size(0) == 0:
        raise ValueError(f"grads must have shape (k, d) with k >= 1, got {tuple(grads.shape)}")
    k = grads.size(0)
    gram = (grads.double() @ grads.double().T).cpu()
    if k == 1:
        alpha = torch.ones(1, dtype=torch.float64)
    elif k == 2:
        gamma = _two(gram[0, 0].item(), gram[0, 1].item(), gram[1, 1].item())
        alpha = torch.tensor([gamma, 1 - gamma], dtype=torch.float64)
    elif k <= EXACT_UP_TO:
        alpha = _exact(gram)
    else:
        alpha = _frank_wolfe(gram, max_iter, tol)
    return alpha.to(dtype=grads.dtype, device=grads.device)


def _exact(gram: torch.Tensor) -> torch.Tensor:
    """The min-norm point, tried on every face S of the simplex: inside S the optimum solves the KKT system
    `G_SS a = lambda 1, sum(a) = 1`; the best of the feasible (`a >= 0`) solutions is the global optimum, since the
    optimum lies inside the face of its support, where that system has one solution."""
    g = gram.numpy()
    k = len(g)
    scale = max(float(np.abs(g).max()), 1e-300)
    best, best_value = None, math.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            system = np.zeros((size + 1, size + 1))
            system[:size, :size] = g[np.ix_(idx, idx)]
            system[:size, size] = -1.0
            system[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            solution = np.linalg.lstsq(system, rhs, rcond=None)[0]
            a = solution[:size]
            if np.abs(system @ solution - rhs).max() > 1e-9 * max(scale, 1.0) or a.min() < -1e-12:
                continue  # no stationary point inside this face
            a = np.clip(a, 0.0, None)
            a /= a.sum()
            value = float(a @ g[np.ix_(idx, idx)] @ a)
            if value < best_value - 1e-15 * scale:
                alpha = np.zeros(k)
                alpha[idx] = a
                best, best_value = alpha, value
    return torch.from_numpy(best)


def _frank_wolfe(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    k = gram.size(0)
    # Start from the best pair (Sener & Koltun), which is already optimal when two gradients decide the point.
    best = None
    for i in range(k):
        for j in range(i + 1, k):
            gamma = _two(gram[i, i].item(), gram[i, j].item(), gram[j, j].item())
            value = (
                gamma**2 * gram[i, i] + 2 * gamma * (1 - gamma) * gram[i, j] + (1 - gamma) ** 2 * gram[j, j]
            )
            if best is None or value < best[0]:
                best = (value, i, j, gamma)
    _, i, j, gamma = best
    alpha = torch.zeros(k, dtype=torch.float64)
    alpha[i], alpha[j] = gamma, 1 - gamma
    for _ in range(max_iter):
        grad = gram @ alpha  # gradient of ||alpha @ G||^2 / 2 in alpha
        s = int(grad.argmin())  # the vertex Frank-Wolfe moves towards
        gap = (alpha @ grad - grad[s]).item()  # duality gap
        if gap < tol:
            break
        support = (alpha > 0).nonzero().flatten()
        a = int(support[grad[support].argmax()])  # the vertex weight is taken from
        # Exact line search along e_s - e_a for step in [0, alpha_a]: ||v + step (g_s - g_a)||^2.
        curvature = gram[s, s] - 2 * gram[s, a] + gram[a, a]
        cap = alpha[a].item()
        step = cap if curvature <= 0 else min(((grad[a] - grad[s]) / curvature).item(), cap)
        alpha[s] += step
        alpha[a] -= step
    else:
        grad = gram @ alpha
        gap = (alpha @ grad - grad.min()).item()
        if gap >= tol:
            warnings.warn(
                f"MGDA's Frank-Wolfe solver stopped at mgda_max_iter={max_iter} with duality gap {gap:.3g} > "
                f"mgda_tol={tol:g} ({k} losses): the loss weights are not the min-norm point yet; raise mgda_max_iter",
                RuntimeWarning,
                stacklevel=4,
            )
    return alpha


def descent_coefficients(
    grads: torch.Tensor,
    normalization: str = "l2",
    max_iter: int = 250,
    tol: float = 1e-10,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Coefficients `c` on the simplex for the losses whose gradients are `grads` `(k, d)`, such that
    `sum_i c_i g_i` is MGDA's common descent direction (it decreases every loss, unless none can be).

    - `"none"`: `c` is the min-norm point of the raw gradients (plain MGDA). A loss with a much larger gradient
      then gets almost no weight unless it conflicts with the others.
    - `"l2"`: the min-norm point of the unit gradients `g_i / ||g_i||` (Sener & Koltun's "l2" normalisation),
      rescaled to the raw gradients (`c_i` proportional to `alpha_i / ||g_i||`): the direction no longer depends on
      the scale of each loss, the step stays that of a convex combination of the losses. A zero gradient (that
      loss is already stationary) gets no weight.

    `weights` (`(k,)`, `>= 0`, not all 0): a preference `rho` over the losses. The solver then finds the min-norm
    point `d` of the hull of `v_i = g_i / rho_i` (unit `g_i` with `"l2"`). Its optimality conditions,
    `v_i . d >= ||d||^2` for every `i` (equality where `alpha_i > 0`), say that every loss decreases along `d` at a
    rate of at least `rho_i ||d||^2`: the update keeps each loss's preference share, and resolves conflicts by
    protecting the loss that falls furthest behind its share (the steepest direction of the weighted Chebyshev
    scalarisation `max_i rate_i / rho_i`). For non-conflicting (orthogonal) gradients it is the linear
    combination `sum_i rho_i u_i` of the unit gradients. A loss with `rho_i = 0` gets no weight. Without `weights`
    every `rho_i` is 1: plain MGDA, which balances the losses whatever the preference.
    """
    if normalization not in ("l2", "none"):
        raise ValueError(f"normalization={normalization!r} is not valid; valid: ['l2', 'none']")
    k = grads.size(0)
    rho = torch.ones(k, dtype=torch.float64) if weights is None else _check_weights(weights, k)
    norms = grads.double().norm(dim=1).cpu()
    scale = norms * rho if normalization == "l2" else rho  # v_i = g_i / scale_i
    live = (rho > 0) & (norms > 0) if normalization == "l2" else rho > 0
    if not live.any():  # nothing left to descend: the preference itself
        return (rho / rho.sum()).to(dtype=grads.dtype, device=grads.device)
    coefficients = torch.zeros(k, dtype=torch.float64)
    vertices = grads[live].double().cpu() / scale[live, None]
    coefficients[live] = min_norm_coefficients(vertices, max_iter, tol) / scale[live]
    return (coefficients / coefficients.sum()).to(dtype=grads.dtype, device=grads.device)


def _check_weights(weights: torch.Tensor, k: int) -> torch.Tensor:
    rho = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().flatten()
    if rho.numel() != k or not torch.isfinite(rho).all() or (rho < 0).any() or rho.sum() <= 0:
        raise ValueError(
            f"weights={rho.tolist()} must be {k} finite numbers >= 0, not all 0 (one per gradient)"
        )
    return rho
