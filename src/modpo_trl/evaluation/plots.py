"""Plots of multi-objective evaluation results (all objectives maximised)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..storage import atomic_path
from .pareto import non_dominated

__all__ = ["plot_pareto"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
# The package's methods keep their marker and colour in every figure; other methods take the next free ones.
_KNOWN_METHODS = ("reference", "modpo", "rewarded_soups", "moc", "dpa", "mod")


def _validate(points: Sequence[Mapping[str, Any]], objective_names: Sequence[str]) -> list[dict[str, Any]]:
    """Check ``points``/``objective_names`` and return normalised copies of the points."""
    if not isinstance(points, Sequence) or isinstance(points, str | bytes) or len(points) == 0:
        raise ValueError(f"points must be a non-empty list of dicts, got {points!r}")
    if isinstance(objective_names, str | bytes):
        raise ValueError(f"objective_names must be a list of strings, got {objective_names!r}")
    names = list(objective_names)
    if len(names) < 2:
        raise ValueError(f"objective_names must name at least 2 objectives, got {names}")

    normalised: list[dict[str, Any]] = []
    for i, p in enumerate(points):
        if not isinstance(p, Mapping):
            raise ValueError(f"points[{i}] must be a dict, got {type(p).__name__}: {p!r}")
        missing = [k for k in ("method", "label", "scores") if k not in p]
        if missing:
            raise ValueError(f"points[{i}] is missing field(s) {missing}; got keys {sorted(p)}")
        method, label = p["method"], p["label"]
        if not isinstance(method, str) or not method:
            raise ValueError(f"points[{i}]['method'] must be a non-empty string, got {method!r}")
        if not isinstance(label, str):
            raise ValueError(f"points[{i}]['label'] must be a string, got {label!r}")
        try:
            scores = np.asarray(p["scores"], dtype=float)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"points[{i}]['scores'] must be a list of numbers, got {p['scores']!r}") from exc
        if scores.ndim != 1:
            raise ValueError(f"points[{i}]['scores'] must be a flat list of numbers, got {p['scores']!r}")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"points[{i}]['scores'] must be finite, got {scores.tolist()}")
        ci = p.get("ci")
        if ci is not None:
            try:
                ci = np.asarray(ci, dtype=float)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"points[{i}]['ci'] must be a list of numbers or None, got {p['ci']!r}"
                ) from exc
            if ci.shape != scores.shape:
                raise ValueError(
                    f"points[{i}]['ci'] must have the same length as its 'scores' ({scores.size}), "
                    f"got {ci.tolist()}"
                )
            if not np.all(np.isfinite(ci)) or np.any(ci < 0):
                raise ValueError(f"points[{i}]['ci'] must be finite and >= 0, got {ci.tolist()}")
        normalised.append({"method": method, "label": label, "scores": scores, "ci": ci})

    lengths = [q["scores"].size for q in normalised]
    if len(set(lengths)) != 1:
        raise ValueError(f"points have inconsistent 'scores' lengths: {lengths}")
    if lengths[0] != len(names):
        raise ValueError(
            f"objective_names has {len(names)} entries {names}, but each point's 'scores' has {lengths[0]}"
        )
    return normalised


def _error_bars(pts: list[dict[str, Any]]) -> tuple[bool, np.ndarray | None]:
    """(draw error bars?, median CI half-width per objective). 95% intervals over prompts can dwarf the
    differences between candidates (which answer the same prompts): bars wider than half the points' spread
    would hide the points, so the heading gives their typical size instead."""
    cis = np.array([q["ci"] for q in pts if q["ci"] is not None])
    if not len(cis):
        return False, None
    median_ci = np.median(cis, axis=0)
    spread = np.ptp(np.array([q["scores"] for q in pts]), axis=0)
    return bool(np.all(median_ci <= 0.5 * np.maximum(spread, 1e-12))), median_ci


def _draw_panel(
    ax: Any,
    groups: dict[str, list[dict[str, Any]]],
    styles: dict[str, tuple[str, Any]],
    ix: int,
    iy: int,
    objective_names: Sequence[str],
    error_bars: bool,
    links: list[tuple[dict[str, Any], dict[str, Any]]],
) -> None:
    """Draw every method's points, error bars, front, labels and unresolved-neighbour links on one (x, y) pair
    of objectives."""
    for a, b in links:
        ax.plot(
            [a["scores"][ix], b["scores"][ix]],
            [a["scores"][iy], b["scores"][iy]],
            linestyle=(0, (1.5, 1.5)),
            color=styles[a["method"]][1],
            linewidth=1.8,
            alpha=0.85,
            zorder=3,
        )
    all_x = [q["scores"][ix] for pts in groups.values() for q in pts]
    # Labels of points in the right part of the panel go to their left, so they stay inside the figure.
    flip_at = min(all_x) + 0.6 * (max(all_x) - min(all_x))
    for method, pts in groups.items():
        marker, colour = styles[method]
        xy = np.array([[q["scores"][ix], q["scores"][iy]] for q in pts])
        if len(pts) > 1:
            # The front is taken in this panel's 2-D projection, so it is a proper staircase.
            front = xy[non_dominated(xy)]
            front = front[np.lexsort((-front[:, 1], front[:, 0]))]
            # where="pre": between two front points the attained level is the lower (right) one.
            ax.step(front[:, 0], front[:, 1], where="pre", color=colour, alpha=0.55, linewidth=1.2, zorder=2)
        ax.scatter(
            xy[:, 0],
            xy[:, 1],
            marker=marker,
            color=colour,
            s=42,
            edgecolors="black",
            linewidths=0.5,
            label=method,
            zorder=4,
        )
        for q, (x, y) in zip(pts, xy, strict=True):
            if error_bars and q["ci"] is not None:
                ax.errorbar(
                    x,
                    y,
                    xerr=q["ci"][ix],
                    yerr=q["ci"][iy],
                    fmt="none",
                    ecolor=colour,
                    elinewidth=0.9,
                    capsize=2,
                    alpha=0.8,
                    zorder=3,
                )
            if q["label"]:
                left = x > flip_at and max(all_x) > min(all_x)
                ax.annotate(
                    q["label"],
                    (x, y),
                    xytext=(-5 if left else 5, 4),
                    textcoords="offset points",
                    ha="right" if left else "left",
                    fontsize=6,
                    color=colour,
                    alpha=0.9,
                    zorder=5,
                )
    ax.set_xlabel(f"{objective_names[ix]} \u2192")
    ax.set_ylabel(f"{objective_names[iy]} \u2192")
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.margins(0.08)


def plot_pareto(
    points: list[dict],
    objective_names: list[str],
    path: str | Path,
    title: str | None = None,
    unresolved: Sequence[tuple[int, int, int]] = (),
) -> Path:
    """Plot per-method score points and their non-dominated fronts to a PNG at ``path``.

    Each point is ``{"method": str, "label": str, "scores": [float] * n,
    "ci": [float] * n | None}`` (``ci`` holds confidence half-widths, drawn as error
    bars). Two objectives give one panel; three or more give one panel per pair of
    objectives with a shared legend. Each method with more than one point gets its
    non-dominated front (in that panel's projection) drawn as a staircase. All
    objectives are "higher is better". ``unresolved`` holds ``(i, j, k)``: points i and
    j are neighbouring weightings whose order on objective k is within noise; they are
    linked by a dotted line in the panels that show objective k. The file is written
    atomically and its path returned.
    """
    pts = _validate(points, objective_names)
    for i, j, k in unresolved:
        if not (0 <= i < len(pts) and 0 <= j < len(pts) and 0 <= k < len(objective_names)):
            raise ValueError(
                f"unresolved holds ({i}, {j}, {k}); valid: point indices 0..{len(pts) - 1}, objective indices "
                f"0..{len(objective_names) - 1}"
            )
    names = [str(n) for n in objective_names]
    out = Path(path)

    groups: dict[str, list[dict[str, Any]]] = {}
    for q in pts:
        groups.setdefault(q["method"], []).append(q)
    palette = colormaps["tab10"]
    others = [m for m in groups if m not in _KNOWN_METHODS]
    slot = {
        m: _KNOWN_METHODS.index(m) if m in _KNOWN_METHODS else len(_KNOWN_METHODS) + others.index(m)
        for m in groups
    }
    styles = {m: (_MARKERS[k % len(_MARKERS)], palette(k % 10)) for m, k in slot.items()}

    pairs = list(itertools.combinations(range(len(names)), 2))
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    figsize = (7.0, 5.5) if len(pairs) == 1 else (5.0 * ncols, 4.4 * nrows + 0.8)
    fig = Figure(figsize=figsize, dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    error_bars, median_ci = _error_bars(pts)
    for ax, (ix, iy) in zip(axes, pairs, strict=False):
        shown = {(min(i, j), max(i, j)) for i, j, k in unresolved if k in (ix, iy)}
        links = [(pts[i], pts[j]) for i, j in sorted(shown)]
        _draw_panel(ax, groups, styles, ix, iy, names, error_bars, links)
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)

    heading = f"{title} (higher is better)" if title else "Pareto fronts (higher is better)"
    if error_bars:
        heading += "\nerror bars: 95% confidence intervals over prompts"
    elif median_ci is not None:
        typical = ", ".join(f"\u00b1{c:.2g} {n}" for c, n in zip(median_ci, names, strict=True))
        heading += f"\n95% CI over prompts, median: {typical} (too wide to draw)"
    if unresolved:
        heading += "\ndotted: neighbouring weightings whose order is within noise (paired interval)"
    if len(pairs) == 1:
        axes[0].set_title(heading, fontsize=10)
        axes[0].legend(loc="best", fontsize=8, framealpha=0.85)
    else:
        fig.suptitle(heading)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=8)

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    return out
