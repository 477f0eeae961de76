"""The chart helper: a second axis keeps a 0-1 series readable beside a series in the hundreds."""

import numpy as np
from PIL import Image

from mlx_coach.plots import COLOURS, bar_chart, line_chart, png_to_hwc


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
    assert img.shape == (450, 800, 3)
    rows = _rows_with(img, _rgb(COLOURS[1]))
    # on one shared axis (600..800) a 0..0.9 series would be a flat line below the plot;
    # on its own axis it covers most of the plot's height
    assert rows.size and rows.max() - rows.min() > 0.5 * 300


def test_gaps_break_the_line_and_bars_are_drawn(tmp_path):
    path = line_chart(tmp_path / "g.png", "gap", {"a": ([0, 1, 2, 3], [1.0, None, float("nan"), 2.0])})
    assert Image.open(path).format == "PNG"
    path = bar_chart(tmp_path / "b.png", "calls", {"lru": {"calls": 10}, "epoch": {"calls": 20}},
                     errors={"lru": {"calls": 2}, "epoch": {"calls": 3}})
    img = png_to_hwc(path)
    assert _rows_with(img, _rgb(COLOURS[0])).size > 50
