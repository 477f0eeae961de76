"""The chart helper: a second axis keeps a 0-1 series readable beside a series in the hundreds; gaps break
a line; bars show their values; panels stack series of different scales."""

from pathlib import Path

import numpy as np
from matplotlib.container import BarContainer
from PIL import Image

from mlx_coach.telemetry.plots import COLOURS, bar_chart, line_chart, line_panels, png_to_hwc


def keep_figures(monkeypatch):
    """{file stem: matplotlib Figure} of every chart saved from now on, to read what was drawn."""
    from matplotlib.figure import Figure

    figures, save = {}, Figure.savefig

    def keep(fig, path, *args, **kwargs):
        figures[Path(path).stem] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _rgb(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def _rows_with(img, colour):
    """Pixel rows holding `colour` (anti-aliasing aside, lines are drawn in exactly their colour)."""
    mask = np.all(np.abs(img.astype(int) - np.array(colour)) <= 8, axis=-1)
    return np.nonzero(mask.any(axis=1))[0]


def test_right_axis_series_spans_the_plot_height_not_a_flat_line(tmp_path):
    steps = list(range(40))
    toks = [600 + 10 * (s % 20) for s in steps]
    hit = [(s % 10) / 10 for s in steps]
    path = line_chart(tmp_path / "c.png", "tok/s vs hit rate", {"tok/s": (steps, toks)},
                      right={"hit rate": (steps, hit)}, right_limits=(0, 1))
    img = png_to_hwc(path)
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    left, right = _rows_with(img, _rgb(COLOURS[0])), _rows_with(img, _rgb(COLOURS[1]))
    # on one shared axis a 0..0.9 series would be a flat line below the 600..800 one (or, with the axis
    # set to 0..1, the 600..800 series would be off the chart); each on its own axis spans most of the height
    assert left.size and right.size
    assert min(left.max() - left.min(), right.max() - right.min()) > 0.5 * img.shape[0]


def test_gaps_break_the_line_and_bars_are_drawn(tmp_path, monkeypatch):
    figures = keep_figures(monkeypatch)
    path = line_chart(tmp_path / "g.png", "gap", {"a": ([0, 1, 2, 3], [1.0, None, float("nan"), 2.0])})
    assert Image.open(path).format == "PNG"
    (line,) = figures["g"].axes[0].lines
    ys = np.asarray(line.get_ydata(), float)
    # no value where the series has none: matplotlib draws no segment into or out of a NaN
    assert np.isnan(ys[1:3]).all() and list(ys[[0, 3]]) == [1.0, 2.0]
    path = bar_chart(tmp_path / "b.png", "calls", {"lru": {"calls": 10}, "epoch": {"calls": 20}},
                     errors={"lru": {"calls": 2}, "epoch": {"calls": 3}})
    img = png_to_hwc(path)
    assert _rows_with(img, _rgb(COLOURS[0])).size > 50
    ax = figures["b"].axes[0]
    assert [p.get_height() for p in ax.patches] == [10, 20]  # a bar a group, as tall as its value
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    (whiskers,) = bars.errorbar.lines[2]  # the interval drawn on each bar: its value -/+ its half-width
    assert sorted(tuple(seg[:, 1]) for seg in whiskers.get_segments()) == [(8, 12), (17, 23)]


def test_panels_stack_series_of_different_scales_one_above_the_other(tmp_path):
    steps = list(range(30))
    rate = [(s % 10) / 10 for s in steps]
    kl = [1e-4 * s for s in steps]
    one = png_to_hwc(line_panels(tmp_path / "one.png", "curve", [dict(left={"rate": (steps, rate)}, left_limits=(0, 1))]))
    img = png_to_hwc(line_panels(tmp_path / "p.png", "curve", [dict(left={"rate": (steps, rate)}, left_limits=(0, 1)),
                                                              dict(left={"kl": (steps, kl)})]))
    assert img.shape[1] == one.shape[1] and img.shape[0] > one.shape[0] * 1.5  # a second panel below the first
    # each panel draws its first series in the first colour; the KL line (1e-4..3e-3) fills its own
    # panel's height instead of lying flat along the rate panel's zero
    rows = _rows_with(img, _rgb(COLOURS[0]))
    mid = img.shape[0] // 2
    upper, lower = rows[rows < mid], rows[rows >= mid]
    assert upper.size and lower.size
    assert lower.max() - lower.min() > 0.3 * (img.shape[0] - mid)
