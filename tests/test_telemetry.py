import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from mlx_coach.telemetry.alerts import Alert
from mlx_coach.core.errors import UserError
from mlx_coach.telemetry.accumulators import Ema, PhaseAccumulator, epoch_phase
from mlx_coach.telemetry.progress import progress_line
from mlx_coach.telemetry.writer import Telemetry, read_jsonl


def load(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def text(acc, tag):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def raw_rows(path):
    def no_constants(name):
        raise AssertionError(f"bare {name} in JSONL")

    return [json.loads(line, parse_constant=no_constants) for line in open(path)]


def test_epoch_phase():
    assert [epoch_phase(p) for p in (0.0, 0.2, 0.33, 0.34, 0.5, 0.66, 0.67, 0.99, 1.0)] == [
        "early", "early", "early", "mid", "mid", "mid", "late", "late", "late"]
    assert epoch_phase(0.3, bounds=(0.25, 0.5)) == "mid"
    with pytest.raises(UserError, match="phase_bounds"):
        epoch_phase(0.5, bounds=(0.6, 0.3))
    with pytest.raises(ValueError):
        epoch_phase(1.5)


def test_run_directory_files_and_tensorboard_contents(tmp_path):
    console = io.StringIO()
    tel = Telemetry(tmp_path, console=True, stream=console)
    tel.custom_layout()
    for step in range(4):
        tel.log(step, {"gen/tokens_per_sec": 40.0 + step, "cache/hit_rate": 0.25 * step,
                       "reward/mean": np.float32(0.5), "note": "text is kept out of TensorBoard"})
    rows = {"early": {"tokens_per_sec": 48.0, "cache_hit_rate": 0.9, "cache_share": 0.1,
                      "fresh_reward_mean": float("nan"), "steps": 2},
            "mid": {"tokens_per_sec": 30.5, "cache_hit_rate": 0.4, "cache_share": 0.6,
                    "fresh_reward_mean": 0.3, "steps": 2}}
    tel.epoch_table(0, 3, rows)
    tel.text("run/config", "lr: 1e-5", 0)
    alert = Alert("warning", "kl_high", "KL to the reference is 0.3", "Raise the KL coefficient")
    tel.alert(3, alert)
    tel.event(2, "cache/clear", removed=17, reason="ttl")
    img = np.zeros((20, 30, 3), dtype=np.uint8)
    img[:, :15] = (255, 0, 0)
    img[5:10, 20:25] = (0, 128, 255)
    tel.image("eval/category_length_heatmap", img, 3)
    tel.close()

    acc = load(tmp_path)
    assert scalars(acc, "gen/tokens_per_sec") == [(0, 40.0), (1, 41.0), (2, 42.0), (3, 43.0)]
    assert scalars(acc, "cache/hit_rate") == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75)]
    assert scalars(acc, "events/cache/clear/removed") == [(2, 17.0)]
    assert "note" not in acc.Tags()["scalars"]

    (step, table), = text(acc, "epoch/phase_table")
    assert step == 3
    assert "| phase | tokens_per_sec | cache_hit_rate | cache_share | fresh_reward_mean | steps |" in table
    assert "| early | 48 | 0.9 | 0.1 | n/a | 2 |" in table
    assert "| mid | 30.5 | 0.4 | 0.6 | 0.3 | 2 |" in table
    assert text(acc, "run/config") == [(0, "lr: 1e-5")]
    (step, body), = text(acc, "alerts/kl_high")
    assert step == 3 and "KL to the reference is 0.3" in body and "Raise the KL coefficient" in body
    assert text(acc, "events/cache/clear") == [(2, "| event | removed | reason |\n|---|---|---|\n| cache/clear | 17 | ttl |")]

    (ev,) = acc.Images("eval/category_length_heatmap")
    assert (ev.step, ev.width, ev.height) == (3, 30, 20)
    decoded = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))
    assert np.array_equal(decoded, img)

    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["tok/s: per step and by epoch phase"] == ["^gen/tokens_per_sec$", "^gen/tokens_per_sec_by_phase/"]
    assert charts["cache hit rate: per step and by epoch phase"] == ["^cache/hit_rate$", "^cache/hit_rate_by_phase/"]
    assert charts["reward: fresh vs cached"] == ["^reward/fresh_mean$", "^reward/cached_mean$", "^reward/mean$"]
    assert charts["loss"] == ["^loss/total$", "^loss/policy$", "^loss/kl$", "^loss/total_ema$"]
    assert charts["memory (GB): process footprint vs MLX active and cache"] == [
        "^memory/footprint_gb$", "^memory/active_gb$", "^memory/cache_gb$"]

    metrics = raw_rows(tmp_path / "metrics.jsonl")
    assert metrics[0] == {"step": 0, "gen/tokens_per_sec": 40.0, "cache/hit_rate": 0.0, "reward/mean": 0.5,
                          "note": "text is kept out of TensorBoard"}
    assert [r["step"] for r in metrics] == [0, 1, 2, 3, 3]
    assert metrics[-1] == {"step": 3, "epoch": 0, "epoch_table": {**rows, "early": {**rows["early"],
                                                                                    "fresh_reward_mean": "nan"}}}
    assert raw_rows(tmp_path / "alerts.jsonl") == [{"step": 3, "level": "warning", "code": "kl_high",
                                                    "message": alert.message, "action": alert.action}]
    (event,) = raw_rows(tmp_path / "events.jsonl")
    assert (event["step"], event["kind"], event["removed"], event["reason"]) == (2, "cache/clear", 17, "ttl")
    assert console.getvalue() == (
        "[WARNING] step 3 kl_high: KL to the reference is 0.3 -> Raise the KL coefficient\n")


def test_custom_scalar_tags_match_only_their_series(tmp_path):
    import re

    tel = Telemetry(tmp_path)
    tel.custom_layout()
    tel.close()
    (config,) = load(tmp_path).Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    tags = ["gen/tokens_per_sec", "gen/tokens_per_sec_by_phase/early", "cache/hit_rate",
            "cache/hit_rate_by_phase/mid", "memory/cache_share", "memory/cache_share_by_phase/late"]
    # TensorBoard's custom-scalars plugin selects series with re.match(pattern, tag)
    chart = {c.title: c.multiline.tag for cat in layout.category for c in cat.chart}
    picked = lambda title: [t for t in tags if any(re.match(p, t) for p in chart[title])]  # noqa: E731
    assert picked("tok/s: per step and by epoch phase") == ["gen/tokens_per_sec", "gen/tokens_per_sec_by_phase/early"]
    assert picked("MLX cache share: per step and by epoch phase") == [
        "memory/cache_share", "memory/cache_share_by_phase/late"]


def test_non_finite_values(tmp_path):
    tel = Telemetry(tmp_path, console=False)
    tel.log(0, {"loss/policy": float("nan"), "grad/norm/total": float("inf"), "loss/kl": -math.inf, "x": 1})
    tel.close()
    assert raw_rows(tmp_path / "metrics.jsonl") == [
        {"step": 0, "loss/policy": "nan", "grad/norm/total": "inf", "loss/kl": "-inf", "x": 1}]
    (row,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert math.isnan(row["loss/policy"]) and row["grad/norm/total"] == math.inf and row["loss/kl"] == -math.inf
    acc = load(tmp_path)
    assert math.isnan(acc.Scalars("loss/policy")[0].value)
    assert acc.Scalars("grad/norm/total")[0].value == math.inf


def test_resume_purges_later_steps(tmp_path):
    tel = Telemetry(tmp_path, console=False)
    for step in range(10):
        tel.log(step, {"loss/policy": float(step)})
    tel.event(7, "memory/clear", freed_bytes=1)
    tel.alert(8, Alert("info", "x", "m", "a"))
    tel.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "loss/po')  # torn by a crash

    tel = Telemetry(tmp_path, console=False, purge_step=5)
    for step in range(5, 8):
        tel.log(step, {"loss/policy": 100.0 + step})
    tel.close()

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss/policy"]) for r in rows] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0)]
    assert read_jsonl(tmp_path / "events.jsonl") == []
    assert read_jsonl(tmp_path / "alerts.jsonl") == []
    assert scalars(load(tmp_path), "loss/policy") == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0)]


def test_jsonl_only_without_tensorboard(tmp_path):
    tel = Telemetry(tmp_path, tensorboard=False, console=False)
    tel.log(1, {"a": 1.0})
    tel.text("t", "x", 1)
    tel.image("i", np.zeros((2, 2, 3), np.uint8), 1)
    tel.custom_layout()
    tel.close()
    assert not list(tmp_path.glob("events.out.tfevents*"))
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "a": 1.0}]


def step_metrics(toks, hits, misses, frag, fresh=None, fresh_n=None):
    m = {"tokens_per_sec": toks, "hits": hits, "misses": misses, "cache_share": frag,
         "fresh_reward_mean": fresh}
    if fresh_n is not None:
        m["fresh_count"] = fresh_n
    return m


def test_phase_accumulator_pools_hits_and_misses():
    acc = PhaseAccumulator()
    acc.add("early", step_metrics(50.0, 1, 0, 0.1, fresh=0.2, fresh_n=1))
    acc.add("early", step_metrics(40.0, 10, 30, 0.3, fresh=0.6, fresh_n=3))
    acc.add("mid", step_metrics(30.0, 0, 0, float("nan"), fresh=float("nan"), fresh_n=0))
    acc.add("late", {"tokens_per_sec": 20.0, "fresh_reward_mean": None})  # a step without fresh scores
    early = acc.by_phase_metrics("early")
    assert early == {
        "gen/tokens_per_sec_by_phase/early": 45.0,
        "cache/hit_rate_by_phase/early": 11 / 41,  # pooled, not the mean of 1.0 and 0.25
        "memory/cache_share_by_phase/early": pytest.approx(0.2),
    }
    # no lookups and no cache-share sample in "mid": those tags are left out
    assert acc.by_phase_metrics("mid") == {"gen/tokens_per_sec_by_phase/mid": 30.0}
    assert acc.by_phase_metrics("late") == {"gen/tokens_per_sec_by_phase/late": 20.0}
    rows = acc.epoch_rows()
    assert list(rows) == ["early", "mid", "late"]
    assert math.isnan(rows["late"]["fresh_reward_mean"]) and rows["late"]["tokens_per_sec"] == 20.0
    assert rows["early"]["fresh_reward_mean"] == pytest.approx((0.2 + 0.6 * 3) / 4)
    assert rows["early"]["steps"] == 2
    assert math.isnan(rows["mid"]["cache_hit_rate"]) and math.isnan(rows["mid"]["fresh_reward_mean"])

    copy = PhaseAccumulator()
    copy.load(json.loads(json.dumps(acc.state_dict())))
    assert copy.by_phase_metrics("early") == early
    acc.reset()
    assert acc.epoch_rows() == {} and acc.by_phase_metrics("early") == {}


def test_ema():
    ema = Ema(0.5)
    assert ema.value is None
    assert [ema.update(x) for x in (1.0, 3.0, float("nan"), np.float32(4.0))] == [1.0, 2.0, 2.0, 3.0]
    other = Ema(0.9)
    other.load(ema.state_dict())
    assert other.update(5.0) == 4.0 and other.count == 4
    with pytest.raises(UserError):
        Ema(0.0)


def test_progress_line():
    m = {"reward/mean": 0.41234, "gen/tokens_per_sec": 48.26, "loss/policy": 0.53219, "loss/kl": 0.0123}
    assert progress_line(12, 300, m) == "step  12/300 | reward 0.412 | tok/s 48.3 | loss 0.5322 | kl 0.0123"
    assert progress_line(3, 9, {"loss/total": float("nan")}) == (
        "step 3/9 | reward n/a | tok/s n/a | loss nan")
