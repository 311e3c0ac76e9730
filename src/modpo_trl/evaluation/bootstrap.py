"""Intervals over prompts for every figure of an evaluation report: a paired, seeded bootstrap.

Every candidate answers the same prompts, so one resample of the prompts (drawn with replacement, the same
draw for every candidate) gives every candidate's mean scores at once, and any statistic of those means (the
difference between two candidates, a method's hypervolume, a rank correlation) gets its distribution over the
resamples; its interval is the central `confidence` share of that distribution (percentile bootstrap). Sharing
the draw pairs the candidates: a prompt that is hard for all of them moves all their means together, so
differences between candidates get much tighter intervals than the candidates' own means.

A difference is *resolved* when its interval excludes 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .pareto import hypervolume, non_dominated, rank_correlations

__all__ = [
    "DOMINATED",
    "DOMINATED_NOISY",
    "FRONT",
    "FRONT_NOISY",
    "PromptBootstrap",
    "interval",
    "resample_indices",
    "resolved",
]

# What each candidate's place in the joint front is (`PromptBootstrap.front`).
FRONT, FRONT_NOISY, DOMINATED_NOISY, DOMINATED = (
    "non-dominated",
    "non-dominated within noise",
    "dominated within noise",
    "dominated",
)


def resample_indices(n_prompts: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n_prompts) prompt indices drawn with replacement, reproducible from `seed`."""
    if n_prompts < 1 or resamples < 1:
        raise ValueError(f"need n_prompts >= 1 and resamples >= 1, got {n_prompts} and {resamples}")
    return np.random.default_rng(seed).integers(0, n_prompts, size=(resamples, n_prompts))


def interval(samples: ArrayLike, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis of `samples`. NaN samples (an undefined rank correlation) are
    left out; where every sample is NaN the interval is NaN."""
    tail = 50.0 * (1.0 - confidence)
    with warnings.catch_warnings():  # numpy warns on an all-NaN column, whose NaN interval is what we want
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(np.asarray(samples, dtype=float), [tail, 100.0 - tail], axis=0)
    return lo, hi


def resolved(lo: ArrayLike, hi: ArrayLike) -> np.ndarray:
    """Whether an interval excludes 0."""
    return (np.asarray(lo) > 0) | (np.asarray(hi) < 0)


@dataclass
class PromptBootstrap:
    """The per-prompt scores of K candidates, `values` (K, P, n): P prompts, n objectives, with one set of
    prompt resamples shared by every statistic (`indices`, (B, P); default: `resamples` draws from `seed`)."""

    values: np.ndarray
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0
    indices: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=float)
        if self.values.ndim != 3 or 0 in self.values.shape:
            raise ValueError(
                f"values must be a non-empty (candidates, prompts, objectives) array, got {self.values.shape}"
            )
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.indices is None:
            self.indices = resample_indices(self.values.shape[1], self.resamples, self.seed)

    @cached_property
    def means(self) -> np.ndarray:
        """(K, n) mean scores over all prompts."""
        return self.values.mean(axis=1)

    @cached_property
    def resampled(self) -> np.ndarray:
        """(B, K, n) mean scores in each resample."""
        return self.values[:, self.indices].mean(axis=2).transpose(1, 0, 2)

    @cached_property
    def _differences(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, lo, hi), each (K, K, n): candidate j's mean minus candidate i's at [i, j]."""
        estimate = self.means[None, :, :] - self.means[:, None, :]
        lo, hi = interval(self.resampled[:, None, :, :] - self.resampled[:, :, None, :], self.confidence)
        return estimate, lo, hi

    def difference(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate j's mean minus candidate i's, per objective: (estimate, lo, hi), each (n,)."""
        estimate, lo, hi = self._differences
        return estimate[i, j], lo[i, j], hi[i, j]

    def hypervolumes(self, sets: dict[str, list[int]], reference_point: np.ndarray) -> dict[str, Any]:
        """Each set's hypervolume against the one `reference_point` (the same in every resample) with its
        interval (`value`), and for every pair of sets the first's minus the second's (`difference`; paired:
        both from the same resamples)."""
        samples = {
            name: np.array([hypervolume(m[rows], reference_point) for m in self.resampled])
            for name, rows in sets.items()
        }
        value, difference = {}, []
        for name, rows in sets.items():
            lo, hi = interval(samples[name], self.confidence)
            value[name] = {
                "estimate": hypervolume(self.means[rows], reference_point),
                "ci": [float(lo), float(hi)],
            }
        names = list(sets)
        for a, first in enumerate(names):
            for second in names[a + 1 :]:
                lo, hi = interval(samples[first] - samples[second], self.confidence)
                difference.append(
                    {
                        "first": first,
                        "second": second,
                        "estimate": value[first]["estimate"] - value[second]["estimate"],
                        "ci": [float(lo), float(hi)],
                        "resolved": bool(resolved(lo, hi)),
                    }
                )
        return {"value": value, "difference": difference}

    def controllability(self, rows: list[int], weights: np.ndarray, names: list[str]) -> dict[str, dict]:
        """Kendall's tau and Spearman's rho between requested weights and achieved means, per objective, with
        intervals (`pareto.controllability`'s numbers)."""
        tau, rho = rank_correlations(weights, self.means[rows][None])
        tau_b, rho_b = rank_correlations(weights, self.resampled[:, rows])
        (tau_lo, tau_hi), (rho_lo, rho_hi) = (
            interval(tau_b, self.confidence),
            interval(rho_b, self.confidence),
        )
        return {
            name: {
                "kendall_tau": float(tau[0, k]),
                "kendall_tau_ci": [float(tau_lo[k]), float(tau_hi[k])],
                "spearman": float(rho[0, k]),
                "spearman_ci": [float(rho_lo[k]), float(rho_hi[k])],
            }
            for k, name in enumerate(names)
        }

    def neighbours(
        self, rows: list[int], weights: np.ndarray, labels: list[str], names: list[str]
    ) -> dict[str, list[dict]]:
        """Per objective, consecutive candidates in the order of their weight on it (equal weights skipped):
        the more-weighted one's mean minus the other's, with its interval; `resolved` when the interval
        excludes 0 (the order is beyond noise), `as_requested` when the estimate is positive."""
        out: dict[str, list[dict]] = {}
        for k, name in enumerate(names):
            order = sorted(range(len(rows)), key=lambda r: weights[r, k])
            pairs = []
            for a, b in zip(order, order[1:], strict=False):
                if weights[a, k] == weights[b, k]:
                    continue
                estimate, lo, hi = self.difference(rows[a], rows[b])
                pairs.append(
                    {
                        "lower": labels[a],
                        "higher": labels[b],
                        "difference": float(estimate[k]),
                        "ci": [float(lo[k]), float(hi[k])],
                        "resolved": bool(resolved(lo[k], hi[k])),
                        "as_requested": bool(estimate[k] > 0),
                    }
                )
            out[name] = pairs
        return out

    def front(self) -> list[dict]:
        """Each candidate's place in the joint front of all K: non-dominated or not on the means (as
        `pareto.non_dominated`), and whether that is beyond noise. Candidate j *dominates i beyond noise* when
        every objective's interval of j - i lies at or above 0 and one lies above 0; j *may dominate i* when
        every interval reaches 0 or above and one lies partly above. `dominated_by` lists the former,
        `may_be_dominated_by` the latter (for a non-dominated i: the candidates that noise could put above
        it)."""
        _, lo, hi = self._differences
        mask = non_dominated(self.means)
        beyond = np.all(lo >= 0, axis=2) & np.any(lo > 0, axis=2)  # [i, j]: j dominates i beyond noise
        possible = np.all(hi >= 0, axis=2) & np.any(hi > 0, axis=2)
        np.fill_diagonal(beyond, False)
        np.fill_diagonal(possible, False)
        out = []
        for i, on_front in enumerate(mask):
            by = np.flatnonzero(beyond[i]).tolist()
            maybe = [j for j in np.flatnonzero(possible[i]).tolist() if j not in by]
            if on_front:  # (a percentile interval may, rarely, miss its estimate: then `by` flags it too)
                status = FRONT_NOISY if maybe or by else FRONT
            else:
                status = DOMINATED if by else DOMINATED_NOISY
            out.append({"status": status, "dominated_by": by, "may_be_dominated_by": maybe})
        return out
