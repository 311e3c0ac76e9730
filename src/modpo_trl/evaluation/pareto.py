"""Pareto-front analysis of multi-objective evaluation results.

Every objective is *maximised* throughout this module (all rewards are "higher is
better"). ``moocore`` minimises by default, so calls into it either pass
``maximise=True`` or negate the points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import moocore
import numpy as np
from numpy.typing import ArrayLike
from scipy import stats
from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator

__all__ = [
    "controllability",
    "default_reference_point",
    "generalization",
    "hypervolume",
    "mean_ci",
    "non_dominated",
    "rank_correlations",
]


def _as_points(points: ArrayLike, name: str = "points", *, allow_empty: bool = False) -> np.ndarray:
    """Validate and convert ``points`` to a float (K, n) array with n >= 2."""
    try:
        arr = np.asarray(points, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric (K, n) array; conversion failed: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (K, n) array, got shape {arr.shape}")
    if arr.shape[1] < 2:
        raise ValueError(f"{name} must have n >= 2 objectives (columns), got shape {arr.shape}")
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} must contain at least one point, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} must be finite, got {bad} non-finite value(s) (NaN/inf)")
    return arr


def non_dominated(points: ArrayLike) -> np.ndarray:
    """Boolean mask (K,) of the points not dominated by any other point (maximisation).

    Duplicates of a non-dominated point are all kept, since none strictly dominates
    another.
    """
    arr = _as_points(points)
    # keep_weakly=True: moocore otherwise keeps only the first copy of duplicates.
    mask = moocore.is_nondominated(arr, maximise=True, keep_weakly=True)
    return np.asarray(mask, dtype=bool)


def hypervolume(points: ArrayLike, reference_point: ArrayLike) -> float:
    """Hypervolume dominated by ``points`` (maximisation) and bounded by ``reference_point``.

    Points that do not strictly dominate the reference point in every objective
    contribute nothing and are dropped; 0.0 is returned when none is left.
    """
    arr = _as_points(points, allow_empty=True)
    try:
        ref = np.asarray(reference_point, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"reference_point must be numeric; conversion failed: {exc}") from exc
    if ref.shape != (arr.shape[1],):
        raise ValueError(
            f"reference_point must have shape ({arr.shape[1]},) to match points of shape {arr.shape}, "
            f"got shape {ref.shape}"
        )
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"reference_point must be finite, got {ref.tolist()}")
    kept = arr[np.all(arr > ref, axis=1)]
    if kept.shape[0] == 0:
        return 0.0
    # Negate into moocore's minimisation convention rather than pass maximise=True:
    # identical result, and it does not depend on moocore's keyword-argument history.
    return float(moocore.hypervolume(-kept, ref=-ref))


def default_reference_point(points: ArrayLike) -> np.ndarray:
    """Default hypervolume reference point for maximised ``points`` of shape (K, n).

    Per objective: ``min - 0.1 * range`` where ``range = max - min`` over the given
    points; when the range is 0 (one point, or a constant objective) the margin is
    ``0.1 * max(|min|, 1.0)`` instead. Every point therefore strictly dominates the
    reference point and contributes to the hypervolume.

    Compute it **once over the union of all methods' points** (MODPO adapters,
    baselines, ...) and pass the same point to every :func:`hypervolume` call, or
    the hypervolumes of different methods are not comparable.
    """
    arr = _as_points(points)
    lo = arr.min(axis=0)
    rng = arr.max(axis=0) - lo
    margin = np.where(rng > 0, 0.1 * rng, 0.1 * np.maximum(np.abs(lo), 1.0))
    return lo - margin


def controllability(
    weights: ArrayLike,
    scores: ArrayLike,
    objective_names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Rank correlation between requested preference weights and achieved scores.

    ``weights`` (K, n) are the requested preference vectors and ``scores`` (K, n) the
    achieved mean scores. For each objective ``i`` returns
    ``{"kendall_tau": ..., "spearman": ...}`` between ``weights[:, i]`` and
    ``scores[:, i]``; NaN where undefined (fewer than 2 points or constant input).
    Keys are ``objective_names`` or ``"objective_0"``, ``"objective_1"``, ...
    """
    w = _as_points(weights, "weights")
    s = _as_points(scores, "scores")
    if w.shape != s.shape:
        raise ValueError(f"weights and scores must have the same shape, got {w.shape} and {s.shape}")
    n = w.shape[1]
    if objective_names is None:
        names = [f"objective_{i}" for i in range(n)]
    else:
        names = [str(x) for x in objective_names]
        if len(names) != n:
            raise ValueError(f"objective_names must have {n} entries to match weights/scores, got {names}")
        if len(set(names)) != n:
            raise ValueError(f"objective_names must be unique, got {names}")

    tau, rho = rank_correlations(w, s[None])
    return {
        name: {"kendall_tau": float(tau[0, i]), "spearman": float(rho[0, i])} for i, name in enumerate(names)
    }


def rank_correlations(weights: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kendall's tau-b and Spearman's rho, per objective, between ``weights`` (K, n) and each of a stack of
    achieved scores ``scores`` (B, K, n) (B bootstrap resamples, or 1): two (B, n) arrays, equal to scipy's
    ``kendalltau`` / ``spearmanr`` (average ranks for ties), NaN where the input is constant or K < 2.

    Vectorised over B because the bootstrap asks for thousands of them."""
    k = weights.shape[0]
    i, j = np.triu_indices(k, 1)
    sign_w = np.sign(weights[i] - weights[j])  # (pairs, n)
    sign_s = np.sign(scores[:, i] - scores[:, j])  # (B, pairs, n)
    untied_w = np.count_nonzero(sign_w, axis=0)  # pairs not tied in the weights
    untied_s = np.count_nonzero(sign_s, axis=1)
    rank_w = stats.rankdata(weights, axis=0)
    rank_s = stats.rankdata(scores, axis=1)
    rank_w = rank_w - rank_w.mean(axis=0)
    rank_s = rank_s - rank_s.mean(axis=1, keepdims=True)
    # Constant input (no untied pair) is undefined: NaN, as scipy returns (without its warning).
    defined = (untied_w > 0) & (untied_s > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (sign_w * sign_s).sum(axis=1) / np.sqrt(untied_w * untied_s)
        rho = (rank_w * rank_s).sum(axis=1) / np.sqrt((rank_w**2).sum(axis=0) * (rank_s**2).sum(axis=1))
    return np.where(defined, tau, np.nan), np.where(defined, np.clip(rho, -1.0, 1.0), np.nan)


def generalization(
    trained_weights: ArrayLike,
    trained_scores: ArrayLike,
    heldout_weights: ArrayLike,
    heldout_scores: ArrayLike,
    objective_names: Sequence[str],
    simplex: bool = True,
) -> dict[str, object]:
    """How well a conditioned model generalises to preferences it never saw: for each held-out preference, the
    gap between its achieved scores and the scores interpolated from the trained preferences' results.

    Interpolation is linear over the preference coordinates: with ``simplex`` the weights but the last (which the
    others determine on the simplex), else the given coordinates as they are (e.g. DPA's angle, ``(K, 1)``): along
    the one coordinate for 2 objectives (or a 1-D parameter), piecewise-linear on a Delaunay triangulation for
    more. A held-out preference outside the trained preferences' convex hull takes its nearest trained point and
    is marked ``extrapolated``. Returns ``{"per_preference": [{"weights", "achieved", "interpolated", "abs_error",
    "extrapolated"}], "mean_abs_error": {name: float}}``.
    """
    ts, hs = _as_points(trained_scores, "trained_scores"), _as_points(heldout_scores, "heldout_scores")
    x, q = np.asarray(trained_weights, dtype=float), np.asarray(heldout_weights, dtype=float)
    if (
        x.ndim != 2
        or q.ndim != 2
        or (len(x), len(q)) != (len(ts), len(hs))
        or x.shape[1] != q.shape[1]
        or ts.shape[1] != hs.shape[1]
        or (simplex and x.shape != ts.shape)
    ):
        raise ValueError(f"shapes do not match: trained {x.shape}/{ts.shape}, held out {q.shape}/{hs.shape}")
    if not (np.isfinite(x).all() and np.isfinite(q).all()):
        raise ValueError("preference coordinates must be finite")
    hw = q
    if simplex:
        x, q = x[:, :-1], q[:, :-1]
    names = list(objective_names)
    if x.shape[1] == 1:  # np.interp needs increasing, distinct coordinates
        order = np.argsort(x[:, 0])
        xs, ys = x[order, 0], ts[order]
        inside = (q[:, 0] >= xs[0]) & (q[:, 0] <= xs[-1])
        predicted = np.stack([np.interp(q[:, 0], xs, ys[:, i]) for i in range(ts.shape[1])], axis=1)
    else:
        predicted = LinearNDInterpolator(x, ts)(q)
        inside = ~np.isnan(predicted).any(axis=1)
        predicted = np.where(inside[:, None], predicted, NearestNDInterpolator(x, ts)(q))
    errors = np.abs(hs - predicted)
    return {
        "per_preference": [
            {
                "weights": w.tolist(),
                "achieved": a.tolist(),
                "interpolated": p.tolist(),
                "abs_error": e.tolist(),
                "extrapolated": not bool(i),
            }
            for w, a, p, e, i in zip(hw, hs, predicted, errors, inside, strict=True)
        ],
        "mean_abs_error": {name: float(errors[:, k].mean()) for k, name in enumerate(names)},
    }


def mean_ci(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval of ``values``.

    The half-width is 0.0 for a single value (no spread can be estimated).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    try:
        arr = np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"values must be numeric; conversion failed: {exc}") from exc
    if arr.size == 0:
        raise ValueError("values must contain at least one value, got an empty sequence")
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        raise ValueError(
            f"values must be finite: {n_bad} non-finite value(s) (NaN/inf) given out of {arr.size}"
        )
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, 0.0
    sem = float(arr.std(ddof=1)) / math.sqrt(arr.size)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df=arr.size - 1)) * sem
    return mean, half
