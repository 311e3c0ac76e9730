"""Points between a sweep's adapters: the extreme adapter of each objective, and a weighting's barycentric
coordinates in the extremes' weightings.

The extreme of objective i is the run with the largest weight on i (MODPO cannot train a target weight of 0, so
the extreme of a margin objective is a run such as w-0.20-0.80). A weighting `w` inside the extremes' convex
hull is `sum_j c_j * weighting(extreme_j)` with `c` on the simplex; Rewarded Soups interpolate the adapters'
weights with `c`, MOD mixes their next-token log-probs with `c` (each extreme is the optimum of its weighting's
linear reward, so both target `w`'s). At an extreme's own weighting, `c` is that vertex: the adapter itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..runs.method import Candidate

TOLERANCE = 1e-9  # coefficients below it are dropped; a coordinate below -TOLERANCE is outside the hull


class Extremes:
    """Each objective's extreme among `candidates` (adapters with `weights`, in objective order).

    Raises ValueError when there are fewer than 2 objectives or the extremes do not span the objectives."""

    def __init__(self, candidates: Sequence[Candidate], names: Sequence[str]):
        n = len(names)
        if n < 2:
            raise ValueError("needs 2+ objectives to interpolate between")
        if len(candidates) < n:
            raise ValueError(
                f"needs one finished weighting per objective ({n}) to interpolate; the run has {len(candidates)}"
            )
        weights = np.array([c.weights for c in candidates], dtype=float)
        # The largest weight on objective i, then the least weight spread over the others.
        self.indices = [
            max(
                range(len(candidates)),
                key=lambda k, i=i: (weights[k, i], -np.sum(np.delete(weights[k], i) ** 2)),
            )
            for i in range(n)
        ]
        self.candidates = [candidates[k] for k in self.indices]
        self.vertices = weights[self.indices].T  # column j: the weighting of objective j's extreme
        if len(set(self.indices)) < n or abs(np.linalg.det(self.vertices)) < 1e-9:
            tags = dict(zip(names, (c.label for c in self.candidates), strict=True))
            raise ValueError(f"the extremes {tags} do not span the objectives")

    def describe(self) -> str:
        return ", ".join(c.label for c in self.candidates)

    def parts(self, w: Sequence[float]) -> list[tuple[str, float]] | None:
        """`(extreme adapter, coefficient)` for the coefficients of `w` above `TOLERANCE`, or None when `w` lies
        outside the extremes' convex hull (a negative coordinate: extrapolation, not interpolation)."""
        coefficients = np.linalg.solve(self.vertices, np.asarray(w, dtype=float))
        if coefficients.min() < -TOLERANCE:
            return None
        return [
            (c.adapter, float(x)) for c, x in zip(self.candidates, coefficients, strict=True) if x > TOLERANCE
        ]
