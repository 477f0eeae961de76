"""The chart helper: a second axis keeps a 0-1 series readable beside a series in the hundreds."""

import numpy as np
from PIL import Image

from mlx_coach.telemetry.plots import COLOURS, bar_chart, line_chart, png_to_hwc


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


def test_panels_stack_series_of_different_scales_one_above_the_other(tmp_path):
    from mlx_coach.telemetry.plots import line_panels

    steps = list(range(30))
    rate = [(s % 10) / 10 for s in steps]
    kl = [1e-4 * s for s in steps]
    path = line_panels(tmp_path / "p.png", "curve", [dict(left={"rate": (steps, rate)}, left_limits=(0, 1)),
                                                    dict(left={"kl": (steps, kl)})])
    img = png_to_hwc(path)
    assert img.shape[0] > img.shape[1] * 0.6  # taller than one chart: two panels
    # each panel draws its first series in the first colour; the KL line (1e-4..3e-3) fills its own
    # panel's height instead of lying flat along the rate panel's zero
    rows = _rows_with(img, _rgb(COLOURS[0]))
    mid = img.shape[0] // 2
    upper, lower = rows[rows < mid], rows[rows >= mid]
    assert upper.size and lower.size
    assert lower.max() - lower.min() > 0.3 * (img.shape[0] - mid)
