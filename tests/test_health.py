import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_coach.core.errors import UserError
from mlx_coach.telemetry.health import TrendTracker, bucket_pass_rates, bucket_table, grad_norms_by_group, heatmap_image, lora_deltas, param_group, rate_color, top_layers_text, update_ratio

ARGS = llama.ModelArgs(
    model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
    rms_norm_eps=1e-5, vocab_size=50, num_key_value_heads=2, tie_word_embeddings=False,
)
LORA = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]}


def tiny_llama(lora=False):
    mx.random.seed(0)
    model = llama.Model(ARGS)
    if lora:
        model.freeze()
        linear_to_lora_layers(model, ARGS.num_hidden_layers, LORA)
    return model


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")


def grads_of(model):
    tokens = mx.random.randint(0, ARGS.vocab_size, (2, 9), key=mx.random.key(1))
    _, grads = nn.value_and_grad(model, loss_fn)(model, tokens)
    return grads


def np_norm(items):
    return math.sqrt(sum(float(np.sum(np.square(np.array(v, dtype=np.float64)))) for v in items))


def test_param_group_uses_mlx_lm_llama_paths():
    assert param_group("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert param_group("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert param_group("model.embed_tokens.weight") == "embeddings"
    assert param_group("lm_head.weight") == "embeddings"
    assert param_group("model.layers.0.self_attn.q_proj.lora_a") == "adapters"
    assert param_group("model.layers.0.mlp.up_proj.lora_b") == "adapters"
    assert param_group("model.layers.0.input_layernorm.weight") == "other"
    assert param_group("model.norm.weight") == "other"


def test_grad_norms_by_group_on_a_real_llama():
    grads = grads_of(tiny_llama())
    flat = tree_flatten(grads)
    out = grad_norms_by_group(grads)
    expect = {
        "attention": [v for k, v in flat if ".self_attn." in k],
        "mlp": [v for k, v in flat if ".mlp." in k],
        "embeddings": [v for k, v in flat if "embed_tokens" in k or k.startswith("lm_head")],
        "other": [v for k, v in flat if "layernorm" in k or k == "model.norm.weight"],
    }
    assert sum(len(v) for v in expect.values()) == len(flat)
    for group, arrays in expect.items():
        assert out[f"grad/norm/{group}"] == pytest.approx(np_norm(arrays), rel=1e-5)
        assert out[f"grad/norm/{group}"] > 0
    assert out["grad/norm/adapters"] == 0.0
    assert out["grad/norm/total"] == pytest.approx(np_norm([v for _, v in flat]), rel=1e-5)


def test_grad_norms_of_lora_grads_split_adapters_by_place():
    model = tiny_llama(lora=True)
    grads = grads_of(model)
    flat = tree_flatten(grads)
    assert flat and all(k.endswith(("lora_a", "lora_b")) for k, _ in flat)
    out = grad_norms_by_group(grads)
    assert out["grad/norm/attention"] == out["grad/norm/mlp"] == out["grad/norm/embeddings"] == 0.0
    assert out["grad/norm/adapters"] == pytest.approx(np_norm([v for _, v in flat]), rel=1e-5)
    assert out["grad/norm/adapters/attention"] == pytest.approx(
        np_norm([v for k, v in flat if ".self_attn." in k]), rel=1e-5)
    assert out["grad/norm/adapters/mlp"] == pytest.approx(np_norm([v for k, v in flat if ".mlp." in k]), rel=1e-5)
    assert out["grad/norm/total"] == pytest.approx(out["grad/norm/adapters"])


def test_non_finite_gradients_show_in_the_norms():
    out = grad_norms_by_group({"model": {"layers": [{"mlp": {"w": mx.array([1.0, float("nan")])}}]}})
    assert math.isnan(out["grad/norm/mlp"]) and math.isnan(out["grad/norm/total"])
    assert out["grad/norm/attention"] == 0.0


def test_update_ratio_after_a_real_sgd_step():
    model = tiny_llama(lora=True)
    # lora_b starts at zero; give it a value so ||theta|| covers both adapter matrices
    model.update({k: v for k, v in [("model", {"layers": [
        {"self_attn": {"q_proj": {"lora_b": mx.full((4, 32), 0.01)}}}, {}]})]})
    before = model.trainable_parameters()
    grads = grads_of(model)
    lr = 0.05
    optim.SGD(learning_rate=lr).update(model, grads)
    after = model.trainable_parameters()
    expected = lr * np_norm([v for _, v in tree_flatten(grads)]) / np_norm([v for _, v in tree_flatten(before)])
    assert update_ratio(before, after) == pytest.approx(expected, rel=1e-4)
    assert update_ratio(before, before) == 0.0
    assert update_ratio({"w": mx.zeros(3)}, {"w": mx.ones(3)}) == math.inf


def numpy_delta(a, b, a0, b0):
    a, b, a0, b0 = (np.array(x, dtype=np.float64) for x in (a, b, a0, b0))
    return float(np.linalg.norm(a @ b - a0 @ b0))


def test_lora_deltas_match_the_weight_change():
    model = tiny_llama(lora=True)
    initial = model.trainable_parameters()
    assert lora_deltas(initial, initial) == {m: 0.0 for m in
                                             {k.rpartition(".")[0] for k, _ in tree_flatten(initial)}}
    opt = optim.Adam(learning_rate=0.01)
    for _ in range(3):
        opt.update(model, grads_of(model))
    current = model.trainable_parameters()
    deltas = lora_deltas(initial, current)
    init, cur = dict(tree_flatten(initial)), dict(tree_flatten(current))
    assert len(deltas) == 6
    for module, value in deltas.items():
        expected = numpy_delta(cur[f"{module}.lora_a"], cur[f"{module}.lora_b"],
                               init[f"{module}.lora_a"], init[f"{module}.lora_b"])
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert value > 0

    # the delta is the change of the layer's effective weight: y - y0 = scale * x @ (A B - A0 B0)
    layer = model.model.layers[0].self_attn.q_proj
    x = mx.random.normal((3, 32), key=mx.random.key(2))
    diff = np.array(layer(x) - layer.linear(x)) / LORA["scale"]
    module = "model.layers.0.self_attn.q_proj"
    ab = np.array(cur[f"{module}.lora_a"]) @ np.array(cur[f"{module}.lora_b"])
    assert np.allclose(diff, np.array(x) @ ab, atol=1e-5)

    blocks = lora_deltas(initial, current, by="block")
    assert set(blocks) == {"model.layers.0", "model.layers.1"}
    layer0 = [v for m, v in deltas.items() if m.startswith("model.layers.0.")]
    assert blocks["model.layers.0"] == pytest.approx(math.sqrt(sum(v * v for v in layer0)))


def test_lora_deltas_from_non_zero_start_and_top_layers():
    rng = np.random.default_rng(0)
    arr = lambda *s: mx.array(rng.normal(size=s).astype(np.float32))  # noqa: E731
    init = {"layers.0.q.lora_a": arr(6, 2), "layers.0.q.lora_b": arr(2, 5),
            "layers.1.q.lora_a": arr(6, 2), "layers.1.q.lora_b": arr(2, 5)}
    cur = dict(init)
    cur["layers.1.q.lora_a"] = init["layers.1.q.lora_a"] + 0.5
    deltas = lora_deltas(init, cur)
    assert deltas["layers.0.q"] == 0.0
    assert deltas["layers.1.q"] == pytest.approx(numpy_delta(
        cur["layers.1.q.lora_a"], cur["layers.1.q.lora_b"], init["layers.1.q.lora_a"], init["layers.1.q.lora_b"]),
        rel=1e-4)
    text = top_layers_text({"a": 0.1, "b": 0.5, "c": 0.3}, k=2)
    assert text.splitlines() == ["| rank | layer | delta |", "|---|---|---|", "| 1 | b | 0.5 |", "| 2 | c | 0.3 |"]


RESULTS = [
    ("strings", 50, True), ("strings", 80, False), ("strings", 120, True),
    ("math", 99, True), ("math", 100, False), ("math", 700, True), ("math", 5000, True),
]


def test_bucket_pass_rates():
    categories, buckets, matrix = bucket_pass_rates(RESULTS, [100, 500])
    assert categories == ["math", "strings"]
    assert buckets == ["<100", "100-500", ">=500"]
    expected = np.array([[1.0, 0.0, 1.0], [0.5, 1.0, np.nan]])
    assert np.array_equal(matrix, expected, equal_nan=True)
    _, _, _, counts = bucket_table(RESULTS, [100, 500])
    assert counts.tolist() == [[1, 1, 2], [2, 1, 0]]
    assert bucket_pass_rates(RESULTS, [])[1] == ["all"]
    with pytest.raises(UserError, match="length_edges"):
        bucket_pass_rates(RESULTS, [500, 100])


def test_rate_color_reads_from_red_to_green_and_sets_no_data_apart():
    rates = [i / 100 for i in range(101)]
    colours = [rate_color(r) for r in rates]
    grey = rate_color(float("nan"))
    for c in colours + [grey]:
        assert len(c) == 3 and all(isinstance(x, int) and 0 <= x <= 255 for x in c)
    low, high = colours[0], colours[-1]
    assert low[0] > low[1] and high[1] > high[0]  # a zero rate reads red, a full one green
    greenness = [g - r for r, g, _ in colours]
    assert all(a < b for a, b in zip(greenness, greenness[1:]))  # each higher rate is greener: order reads off
    assert math.dist(low, high) > 150  # the ends are far apart, not two shades of one colour
    assert rate_color(-0.5) == low and rate_color(1.5) == high  # clamped to 0..1
    assert rate_color(None) == grey and grey[0] == grey[1] == grey[2]  # no data: a neutral grey...
    assert min(math.dist(grey, c) for c in colours) > 40  # ...unlike the colour of any rate


def count_color(img, color):
    return int(np.all(img == np.array(color, dtype=np.uint8), axis=-1).sum())


def test_heatmap_image_draws_cells_and_labels():
    categories, buckets, matrix, counts = bucket_table(RESULTS, [100, 500])
    img = heatmap_image(matrix, categories, buckets, title="pass rate", counts=counts)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    h, w, _ = img.shape
    assert 60 < h < 400 and 150 < w < 800
    grey, red, green = (count_color(img, rate_color(r)) for r in (float("nan"), 0.0, 1.0))
    # three full-rate cells, one empty cell, one zero-rate cell: green > grey, and red ~ grey (one cell each)
    assert grey > 500 and red > 500 and green > 2 * red
    dark = np.all(img < 60, axis=-1).sum()
    assert dark > 100  # label text was drawn
    # a NaN-free matrix has no grey cells; a longer row label widens the image
    full = heatmap_image(np.array([[0.25]]), ["x"], ["all"])
    assert count_color(full, rate_color(float("nan"))) == 0
    wide = heatmap_image(np.array([[0.25]]), ["a much longer category name"], ["all"])
    assert wide.shape[1] > full.shape[1] + 100
    with pytest.raises(ValueError):
        heatmap_image(np.zeros((2, 2)), ["a"], ["x", "y"])


def test_trend_tracker():
    t = TrendTracker(k=3)
    assert [t.update(v) for v in (0.1, 0.2, 0.3)] == ["insufficient"] * 3
    assert t.update(0.35) == "improving"
    assert t.update(0.35) == "improving"  # 0.35 is still a new best within the last 3
    assert t.update(0.34) == "improving"
    assert t.update(0.33) == "plateau"  # the last three (0.35, 0.34, 0.33) never beat 0.35
    assert t.best == (3, 0.35)
    t.update(0.2)
    assert t.update(0.2) == "regressing"  # 0.33, 0.2, 0.2 all below the earlier best
    t.update(float("nan"))  # ignored
    assert len(t.history) == 9

    loss = TrendTracker(k=2, higher_is_better=False, min_delta=0.05)
    assert [loss.update(v, epoch=e) for e, v in enumerate((1.0, 0.9, 0.93, 0.94, 0.99))] == [
        "insufficient", "insufficient", "improving", "plateau", "plateau"]
    assert loss.best == (1, 0.9)
    assert loss.update(1.2) == "regressing"  # 0.99 and 1.2 both worse than 0.9 by more than 0.05

    copy = TrendTracker()
    copy.load(loss.state_dict())
    assert copy.trend == "regressing" and copy.best == (1, 0.9)
