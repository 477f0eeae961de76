"""PNG charts for reports (run report, A/B report, learning benchmark): one chart per image.

Every line chart is drawn by `line_chart` (or `line_panels`: several stacked on one x axis): series
that share a unit go on the left axis; series in another unit (tok/s against a 0-1 hit rate, say) go
on a second, right-hand axis, so neither is pinned flat. Each series gets its own colour and marker;
right-axis series are dashed. A series may hold `None` or NaN where it has no value; the line breaks
there instead of drawing across the gap. `vlines` marks x positions (epoch boundaries).
matplotlib draws off-screen (Agg), so this works without a display.
"""

import math
import os

import numpy as np

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _as_array(values):
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def _draw(ax, series, start, marker_every, linestyle="-"):
    handles = []
    for i, (label, (xs, ys)) in enumerate(series.items()):
        k = start + i
        (line,) = ax.plot(
            _as_array(xs), _as_array(ys), label=label, color=COLOURS[k % len(COLOURS)],
            marker=MARKERS[k % len(MARKERS)], markersize=4, markevery=marker_every, linewidth=1.5,
            linestyle=linestyle,
        )
        handles.append(line)
    return handles


def _line_axes(ax, left, *, right=None, xlabel="step", left_label="", right_label="", vlines=(),
               vline_label="", left_limits=None, right_limits=None, title=""):
    """Draw one line chart (left series, optional right-axis series, x markers) on `ax`."""
    n_points = max((len(xs) for xs, _ in list(left.values()) + list((right or {}).values())), default=0)
    marker_every = max(1, n_points // 25)
    handles = _draw(ax, left, 0, marker_every)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(left_label)
    if left_limits:
        ax.set_ylim(*left_limits)
    if right:
        twin = ax.twinx()
        handles += _draw(twin, right, len(left), marker_every, linestyle="--")  # dashed: read on the right
        twin.set_ylabel(right_label)
        if right_limits:
            twin.set_ylim(*right_limits)
    for i, x in enumerate(vlines):
        line = ax.axvline(x, color="#888888", linestyle=":", linewidth=1,
                          label=vline_label if i == 0 and vline_label else None)
        if i == 0 and vline_label:
            handles.append(line)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if handles:
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], loc="best", fontsize=8)


def _save(plt, fig, path):
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def line_chart(path, title, left, *, right=None, xlabel="step", left_label="", right_label="",
               vlines=(), vline_label="", left_limits=None, right_limits=None, size=(8, 4.5)):
    """Write one PNG chart to `path` and return the path.

    `left` and `right` map a series label to `(xs, ys)`. `left_limits` / `right_limits` fix an axis
    range, e.g. (0, 1) for a rate.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        _line_axes(ax, left, right=right, xlabel=xlabel, left_label=left_label, right_label=right_label,
                   vlines=vlines, vline_label=vline_label, left_limits=left_limits, right_limits=right_limits,
                   title=title)
        return _save(plt, fig, path)
    finally:
        plt.close(fig)


def line_panels(path, title, panels, *, size=None):
    """One PNG of line charts stacked on a shared x axis, for series whose scales differ too much for
    two axes (rates in 0-1 above, KL around 1e-3 below). Each panel is a dict of `line_chart`'s keyword
    arguments (left, right, left_label, right_label, left_limits, right_limits, vlines, xlabel)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False, dpi=100,
                             figsize=size or (8, 2.2 + 2.3 * len(panels)))
    try:
        for i, (ax, panel) in enumerate(zip(axes[:, 0], panels)):
            panel = dict(panel)
            panel.setdefault("xlabel", "step" if i == len(panels) - 1 else "")
            _line_axes(ax, panel.pop("left"), title=title if i == 0 else "", **panel)
        return _save(plt, fig, path)
    finally:
        plt.close(fig)


def bar_chart(path, title, groups, *, ylabel="", errors=None, size=(8, 4.5)):
    """One PNG of grouped bars: `groups` maps a group label to {bar label: value}; `errors` has the same
    shape and holds half-widths of an interval drawn on each bar (or None)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        group_names = list(groups)
        bar_names = list(dict.fromkeys(b for g in groups.values() for b in g))  # in order of first appearance
        width = 0.8 / max(1, len(bar_names))
        for k, bar in enumerate(bar_names):
            xs = np.arange(len(group_names)) + k * width
            ys = [groups[g].get(bar, math.nan) for g in group_names]
            err = None
            if errors:
                err = [errors.get(g, {}).get(bar, 0.0) or 0.0 for g in group_names]
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=bar, color=COLOURS[k % len(COLOURS)])
        ax.set_xticks(np.arange(len(group_names)) + width * (len(bar_names) - 1) / 2)
        ax.set_xticklabels(group_names)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        return _save(plt, fig, path)
    finally:
        plt.close(fig)


def png_to_hwc(path):
    """A PNG as an HxWx3 uint8 array (for TensorBoard's Images tab)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))
