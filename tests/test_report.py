"""The run report on a real run: files, Images-tab entries, and dashboards whose charts share a unit."""

import math
import re

import pytest
from PIL import Image

from mlx_coach.cli import main
from mlx_coach.telemetry.report import CHARTS, _by_phase, load_run
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


def test_the_trainer_writes_the_report_at_the_epoch_end(run):
    out = run / "report"
    md = (out / "report.md").read_text()
    for name in CHARTS:
        png = out / f"{name}.png"
        assert f"]({name}.png)" in md
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width >= 400
        assert png.stat().st_size < 300_000
    assert "## Epoch 0 by phase (ends at step 8)" in md and "| phase | tokens_per_sec |" in md
    assert "| early |" in md and "| late |" in md
    assert "## Validation" in md  # pass@1 at the epoch end


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
