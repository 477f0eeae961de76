"""The run report on a real run: files, the tables and charts it shows, Images-tab entries, and dashboards whose
charts share a unit."""

import math
import re

import numpy as np
import pytest
from PIL import Image
from test_plots import keep_figures

from mlx_coach.cli import main
from mlx_coach.telemetry.report import CHARTS, _by_phase, draw_charts, load_run
from mlx_coach.telemetry.scalar_charts import custom_scalar_layout, unit_of
from tests.test_trainer import tiny_cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """10 steps of builtin:tiny on 32 training stubs (8 steps an epoch): one epoch end, with validation,
    the unit-test reward and a cache, so hits and cached rewards appear in the second epoch."""
    from mlx_coach.rl.loop import train

    tmp = tmp_path_factory.mktemp("report")
    cfg = tiny_cfg(tmp, train={"steps": 10, "epochs_val": True, "val_limit": 4},
                   rewards=[{"type": "tests"},
                            {"type": "function", "function": "mlx_coach.rewards.shaping:code_charset", "weight": 0.2}],
                   cache={"policy": "lru"})
    train(cfg, tmp / "run")
    return tmp / "run"


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _md_tables(md):
    """Each markdown table of `md`: (the heading above it, header cells, body rows of cells)."""
    tables, heading, block = [], "", []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if block:
            tables.append((heading, block[0], block[2:]))
            block = []
        if line.startswith("#"):
            heading = line
    return tables


def _shows(cell, value):
    """A table cell shows `value` (4 significant digits; n/a for no value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return cell == "n/a"
    return float(cell) == pytest.approx(value, rel=1e-3, abs=1e-12) if isinstance(value, float) else cell == str(value)


def test_the_trainer_writes_the_report_at_the_epoch_end(run):
    out = run / "report"
    md = (out / "report.md").read_text()
    for name in CHARTS:
        png = out / f"{name}.png"
        assert re.search(rf"!\[[^\]]*\]\({name}\.png\)", md), name  # shown in the report, not only written
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width >= 400
        assert png.stat().st_size < 300_000
    _, tables, evals = load_run(run)
    (epoch, end, rows), = tables
    assert (epoch, end) == (0, 8)
    # the epoch's by-phase table: one row a phase, each cell the value the run logged; its heading names both
    (heading, header, body), = [t for t in _md_tables(md) if t[1][0] == "phase"]
    assert re.search(rf"\b{epoch}\b", heading) and re.search(rf"\b{end}\b", heading)
    assert [r[0] for r in body] == list(rows) and {"early", "late"} <= set(rows)  # 8 steps span the phases
    assert "tokens_per_sec" in header
    for cells in body:
        for column, cell in zip(header[1:], cells[1:]):
            assert _shows(cell, rows[cells[0]].get(column)), (cells[0], column, cell)
    # validation pass@1 at the epoch end
    (_, header, body), = [t for t in _md_tables(md) if "pass@1" in t[1]]
    assert [(int(r[header.index("step")]), float(r[header.index("pass@1")])) for r in body] == \
        [(s, pytest.approx(v, rel=1e-3)) for s, v in evals]


def _drawn(monkeypatch, run, out):
    """draw_charts on the run's metrics, each chart read back off its matplotlib figure: {chart: axes},
    axes {"left"/"right": [series (xs, ys, colour, linestyle)]} and "marked" (x of the vertical markers)."""
    figures = keep_figures(monkeypatch)
    steps, tables, evals = load_run(run)
    draw_charts(steps, tables, evals, out)
    charts = {}
    for name, fig in figures.items():
        chart = {"left": [], "right": [], "marked": set()}
        for ax in fig.axes:
            for line in ax.lines:
                xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
                if len(xs) == 2 and xs[0] == xs[1] and line.get_transform() != ax.transData:
                    chart["marked"].add(xs[0])  # a vertical line across the axes
                    continue
                chart[ax.yaxis.get_label_position()].append((xs, ys, line.get_color(), line.get_linestyle()))
        charts[name] = chart
    return charts, steps, evals


def _merged(series):
    """Lines that split one quantity (by epoch phase) into one: at each x, the one line with a value there."""
    ys = np.vstack([s[1] for s in series])
    drawn = ~np.isnan(ys)
    assert (drawn.sum(axis=0) <= 1).all()  # the pieces never overlap
    return np.where(drawn.any(axis=0), np.where(drawn, ys, 0.0).sum(axis=0), np.nan)


def _values(steps, key):
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in steps])


def _same(a, b):
    return np.array_equal(np.asarray(a, float), np.asarray(b, float), equal_nan=True)


def _one_line_each(series, expected):
    """The lines' values are the expected series, one line each (in any order)."""
    left = [s[1] for s in series]
    for values in expected:
        match = [i for i, ys in enumerate(left) if _same(ys, values)]
        if not match:
            return False
        left.pop(match[0])
    return not left


def test_each_chart_shows_its_two_units_on_two_axes_in_lines_told_apart(run, tmp_path, monkeypatch):
    charts, steps, evals = _drawn(monkeypatch, run, tmp_path)
    assert set(charts) == set(CHARTS)
    xs = np.array([r["step"] for r in steps], float)
    toks = _values(steps, "gen/tokens_per_sec")

    c = charts["throughput_vs_hit_rate"]  # tok/s left, hit rate right, each split by epoch phase
    assert all(_same(s[0], xs) for s in c["left"] + c["right"])
    assert _same(_merged(c["left"]), toks) and _same(_merged(c["right"]), _values(steps, "cache/hit_rate"))

    c = charts["throughput_vs_memory"]  # tok/s left, every logged memory series right (GB)
    memory = [k for k in ("memory/footprint_gb", "memory/active_gb", "memory/cache_gb") if any(k in r for r in steps)]
    assert memory and _one_line_each(c["left"], [toks])
    assert _one_line_each(c["right"], [_values(steps, k) for k in memory])

    c = charts["reward_fresh_vs_cached"]  # fresh and cached reward left, validation pass@1 right
    assert _one_line_each(c["left"], [_values(steps, k) for k in ("reward/fresh_mean", "reward/cached_mean")])
    (right,) = c["right"]
    assert _same(right[0], [s for s, _ in evals]) and _same(right[1], [v for _, v in evals])

    for name, c in charts.items():
        lines = c["left"] + c["right"]
        assert c["left"] and c["right"], name  # two units, two axes
        assert len({(s[2], s[3]) for s in lines}) == len(lines), name  # no two lines drawn alike
        # a right-axis line never looks like a left-axis one: the style says which axis to read
        assert not {s[3] for s in c["left"]} & {s[3] for s in c["right"]}, name
        assert c["marked"] == {8.0}, name  # the epoch end


def test_each_chart_is_on_the_images_tab_at_the_epoch_end(run):
    acc = _events(run)
    for name in CHARTS:
        (image,) = acc.Images(f"report/{name}")
        assert image.step == 8
        with Image.open(run / "report" / f"{name}.png") as png:
            assert (image.width, image.height) == png.size


def test_every_custom_scalar_chart_holds_one_unit(run):
    """Over the tags this run logged: each chart's series share a unit, and no chart is empty."""
    tags = _events(run).Tags()["scalars"]
    for category in custom_scalar_layout().values():
        for title, (_, patterns) in category.items():
            picked = [t for t in tags if any(re.match(p, t) for p in patterns)]
            assert picked, title
            units = {unit_of(t) for t in picked}
            assert len(units) == 1, (title, {t: unit_of(t) for t in picked})


def test_units_tell_throughput_memory_and_rates_apart():
    assert len({unit_of(t) for t in ("gen/tokens_per_sec", "cache/hit_rate", "memory/footprint_gb",
                                     "gen/tokens_per_sec_rel", "reward/mean", "loss/policy")}) == 6
    assert unit_of("cache/hit_rate_by_phase/mid") == unit_of("memory/cache_share") == unit_of("eval/pass@1")


def test_each_step_is_drawn_in_exactly_one_phase_series(run):
    steps, tables, evals = load_run(run)
    assert [s for s, _ in evals] == [8] and [(e, s) for e, s, _ in tables] == [(0, 8)]
    series = _by_phase(steps, "gen/tokens_per_sec", (1 / 3, 2 / 3))
    assert set(series) == {"early", "mid", "late"}
    for i, row in enumerate(steps):
        finite = [p for p, (_, ys) in series.items() if not math.isnan(ys[i])]
        assert len(finite) == 1
        assert series[finite[0]][1][i] == row["gen/tokens_per_sec"]


def test_report_command_writes_elsewhere_and_refuses_a_folder_without_a_run(run, tmp_path, capsys):
    assert main(["report", str(run), "--output", str(tmp_path / "r")]) == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(["report.md", *(f"{n}.png" for n in CHARTS)])
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "metrics.jsonl" in err
