from pathlib import Path

import pytest
from matplotlib import image as mpimg

from modpo_trl.evaluation.plots import plot_pareto

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _points(n_obj: int) -> list[dict]:
    pts = []
    for k in range(5):
        w = k / 4
        scores = [w, 1 - w**2] + [0.5 * w + 0.1 * j for j in range(n_obj - 2)]
        pts.append(
            {
                "method": "MODPO",
                "label": f"w={w:.2f},{1 - w:.2f}",
                "scores": scores,
                "ci": [0.03] * n_obj,
            }
        )
    pts.append({"method": "MODPO", "label": "dominated", "scores": [0.1] * n_obj, "ci": None})
    pts += [
        {
            "method": "Rewarded Soups",
            "label": f"rs{k}",
            "scores": [k / 3 - 0.05, 0.9 - k / 4] + [0.2] * (n_obj - 2),
            "ci": None,
        }
        for k in range(4)
    ]
    pts.append({"method": "Reference", "label": "SFT", "scores": [0.3] * n_obj, "ci": [0.05] * n_obj})
    pts.append({"method": "DPO (single objective)", "label": "obj0", "scores": [0.95] + [0.15] * (n_obj - 1)})
    return pts


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] > 300 and img.shape[1] > 300


def test_plot_two_objectives(tmp_path):
    out = plot_pareto(
        _points(2),
        ["helpful", "harmless"],
        tmp_path / "sub" / "dir" / "front.png",
        title="MODPO vs baselines",
    )
    assert out == tmp_path / "sub" / "dir" / "front.png"
    _check_png(out)
    # Atomic write leaves no temp files behind.
    assert [p.name for p in out.parent.iterdir()] == ["front.png"]


def test_plot_three_objectives(tmp_path):
    out = plot_pareto(_points(3), ["helpful", "harmless", "humour"], str(tmp_path / "front3.png"))
    assert isinstance(out, Path)
    _check_png(out)


def test_plot_overwrites_existing_file(tmp_path):
    target = tmp_path / "front.png"
    target.write_bytes(b"old")
    plot_pareto(_points(2), ["a", "b"], target)
    _check_png(target)


def test_plot_empty_points_raises(tmp_path):
    with pytest.raises(ValueError, match="points"):
        plot_pareto([], ["a", "b"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_inconsistent_score_lengths_raises(tmp_path):
    pts = [
        {"method": "MODPO", "label": "a", "scores": [1.0, 2.0], "ci": None},
        {"method": "MODPO", "label": "b", "scores": [1.0, 2.0, 3.0], "ci": None},
    ]
    with pytest.raises(ValueError, match=r"'scores'.*\[2, 3\]"):
        plot_pareto(pts, ["a", "b"], tmp_path / "x.png")


def test_plot_objective_names_mismatch_raises(tmp_path):
    pts = [{"method": "MODPO", "label": "a", "scores": [1.0, 2.0, 3.0], "ci": None}]
    with pytest.raises(ValueError, match=r"objective_names.*\['a', 'b'\].*3"):
        plot_pareto(pts, ["a", "b"], tmp_path / "x.png")


def test_plot_bad_ci_and_missing_field_raise(tmp_path):
    with pytest.raises(ValueError, match=r"points\[0\]\['ci'\]"):
        plot_pareto(
            [{"method": "M", "label": "a", "scores": [1.0, 2.0], "ci": [0.1]}], ["a", "b"], tmp_path / "x.png"
        )
    with pytest.raises(ValueError, match=r"points\[0\].*missing.*method"):
        plot_pareto([{"label": "a", "scores": [1.0, 2.0]}], ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"points\[0\]\['scores'\].*finite"):
        plot_pareto(
            [{"method": "M", "label": "a", "scores": [1.0, float("nan")]}], ["a", "b"], tmp_path / "x.png"
        )


def test_error_bars_are_drawn_only_when_they_do_not_hide_the_points(tmp_path):
    from modpo_trl.evaluation.plots import _error_bars

    narrow = [{"scores": [k, 1 - k], "ci": [0.05, 0.05]} for k in (0.0, 0.5, 1.0)]
    assert _error_bars(narrow)[0] is True
    wide = [{"scores": [0.70 + k / 100, 0.5], "ci": [0.04, 0.03]} for k in range(3)]  # spread 0.02 and 0
    draw, median = _error_bars(wide)
    assert draw is False and median.tolist() == pytest.approx([0.04, 0.03])
    assert _error_bars([{"scores": [0.1, 0.2], "ci": None}]) == (False, None)
    points = [{"method": "m", "label": str(i), **p} for i, p in enumerate(wide)]
    assert plot_pareto(points, ["a", "b"], tmp_path / "wide.png").read_bytes().startswith(PNG_SIGNATURE)


def test_unresolved_neighbours_are_linked_in_the_panels_of_their_objective(tmp_path, monkeypatch):
    from modpo_trl.evaluation import plots

    drawn = {}
    original = plots._draw_panel

    def recording(ax, groups, styles, ix, iy, names, error_bars, links):
        drawn[(ix, iy)] = [(a["label"], b["label"]) for a, b in links]
        original(ax, groups, styles, ix, iy, names, error_bars, links)

    monkeypatch.setattr(plots, "_draw_panel", recording)
    points = _points(3)
    # points 1 and 2 within noise on objective 2 (and, listed twice, on objective 0); 3 and 4 on objective 1
    unresolved = [(1, 2, 2), (2, 1, 0), (3, 4, 1)]
    plain = plot_pareto(points, ["a", "b", "c"], tmp_path / "plain.png").read_bytes()
    linked = plot_pareto(points, ["a", "b", "c"], tmp_path / "linked.png", unresolved=unresolved).read_bytes()
    assert plain != linked
    pair_12, pair_34 = (points[1]["label"], points[2]["label"]), (points[3]["label"], points[4]["label"])
    assert drawn == {(0, 1): [pair_12, pair_34], (0, 2): [pair_12], (1, 2): [pair_12, pair_34]}
    with pytest.raises(ValueError, match=r"unresolved holds \(1, 99, 0\); valid: point indices 0\.\."):
        plot_pareto(points, ["a", "b", "c"], tmp_path / "x.png", unresolved=[(1, 99, 0)])
