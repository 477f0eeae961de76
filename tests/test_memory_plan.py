"""The memory plan (runtime/memory_plan.py, models/size.py, `mlx-coach plan`): a run's peak predicted from the
model's architecture and the run's sizes, before loading; sizes that cannot fit refused in one line."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_coach.cli import main
from mlx_coach.engine.rollout import RolloutConfig, generate_rollouts
from mlx_coach.models.builtin_tiny import save_builtin_tiny
from mlx_coach.models.gguf import find_smollm2_gguf
from mlx_coach.models.loader import load_policy
from mlx_coach.models.size import describe, describe_gguf
from mlx_coach.runtime.memory_plan import Capacity, RunShape, mac, predict, refusal, suggestions
from mlx_coach.telemetry.alert_rules import memory_over_plan
from mlx_coach.telemetry.alerts import AlertConfig, AlertState
from tests.test_trainer import rows, tiny_cfg

# a SmolLM2-135M-shaped llama (the architecture only: nothing is loaded)
SMOL = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
        "stored_dtype": "float16"}
ROOT = Path(__file__).resolve().parents[1]
SHAPE = RunShape(group_size=4, prompts_per_step=2, max_new_tokens=64, prompt_tokens=100, lora_rank=8)


@pytest.mark.parametrize("arch", [SMOL, describe("builtin:tiny")], ids=["smollm2-shaped", "tiny"])
@pytest.mark.parametrize("field, values", [("group_size", [2, 4, 8, 64]), ("prompts_per_step", [1, 2, 8]),
                                           ("max_new_tokens", [8, 64, 512]), ("prompt_tokens", [10, 100, 1000]),
                                           ("lora_rank", [1, 8, 128]), ("lora_layers", [1, 4, -1])])
def test_peaks_rise_with_each_size(arch, field, values):
    plans = [predict(arch, dataclasses.replace(SHAPE, **{field: v})) for v in values]
    for small, big in zip(plans, plans[1:]):
        assert small.mlx_peak <= big.mlx_peak and small.rss_peak <= big.rss_peak
    assert plans[0].rss_peak < plans[-1].rss_peak


@pytest.mark.parametrize("arch", [SMOL, describe("builtin:tiny")], ids=["smollm2-shaped", "tiny"])
def test_grad_accum_lowers_the_update_and_full_fine_tune_costs_more_than_lora(arch):
    shape = dataclasses.replace(SHAPE, group_size=8, prompts_per_step=4)
    peaks = [predict(arch, dataclasses.replace(shape, grad_accum=k)).mlx_peak for k in (1, 2, 4, 32)]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0]
    lora = dataclasses.replace(shape, dtype="float32")
    assert predict(arch, dataclasses.replace(lora, fine_tune="full")).mlx_peak > predict(arch, lora).mlx_peak
    # in a half dtype LoRA's float32 adapters keep float32 activations (measured larger than a full fine-tune's):
    # there the full fine-tune's frozen reference and optimizer state are what must cost more
    half_full, half_lora = (predict(arch, dataclasses.replace(shape, dtype="bfloat16", fine_tune=kind)).parts
                            for kind in ("full", "lora"))
    assert (half_full["reference"] + half_full["trainable_state"] + half_full["update_gradients"]
            > half_lora["reference"] + half_lora["trainable_state"] + half_lora["update_gradients"])


@pytest.mark.parametrize("arch", [SMOL, describe("builtin:tiny")], ids=["smollm2-shaped", "tiny"])
def test_quantized_weights_are_smaller_than_half_precision_than_float32(arch):
    def plan(dtype, bits=None):
        quant = {"quantization": {"bits": bits, "group_size": 64}} if bits else {}
        return predict({**arch, **quant}, dataclasses.replace(SHAPE, dtype=dtype))

    weights = [plan("bfloat16", 4).parts["weights"], plan("bfloat16", 8).parts["weights"],
               plan("bfloat16").parts["weights"], plan("float32").parts["weights"]]
    assert weights == sorted(weights) and len(set(weights)) == 4
    assert plan("bfloat16", 4).mlx_peak < plan("bfloat16").mlx_peak < plan("float32").mlx_peak
    assert plan("float16").mlx_peak == plan("bfloat16").mlx_peak


def test_builtin_specs_are_described_without_loading():
    tiny, four = describe("builtin:tiny@3"), describe("builtin:tiny-4bit")
    assert tiny["vocab_size"] == 262 and "quantization" not in tiny
    assert four["quantization"]["bits"] == 4 and four["hidden_size"] == tiny["hidden_size"]
    assert describe("someone/not-downloaded-model") is None


def test_gguf_header_gives_the_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    metadata = {"general.architecture": "llama", "llama.embedding_length": u32(64), "llama.block_count": u32(3),
                "llama.feed_forward_length": u32(128), "llama.attention.head_count": u32(4),
                "llama.attention.head_count_kv": u32(2), "tokenizer.ggml.tokens": [f"t{i}" for i in range(77)]}
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((77, 64)), "output.weight": mx.zeros((77, 64))}, metadata)
    arch = describe_gguf(path)
    assert (arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"]) == (64, 3, 128)
    assert (arch["num_attention_heads"], arch["num_key_value_heads"], arch["vocab_size"]) == (4, 2, 77)
    assert arch["tie_word_embeddings"] is False  # it has an output.weight
    assert describe(str(path))["hidden_size"] == 64


def test_each_suggestion_alone_makes_the_run_fit():
    capacity = mac(8)
    shape = dataclasses.replace(SHAPE, group_size=64, prompts_per_step=8, max_new_tokens=512)
    assert not capacity.fits(predict(SMOL, shape))
    fixes = suggestions(SMOL, shape, capacity)
    assert {key for key, _ in fixes} >= {"optim.grad_accum", "rollout.max_new_tokens"}
    attrs = {"optim.grad_accum": "grad_accum", "rollout.prompts_per_step": "prompts_per_step",
             "rollout.group_size": "group_size", "rollout.max_new_tokens": "max_new_tokens",
             "model.lora_rank": "lora_rank"}
    for key, value in fixes:
        assert capacity.fits(predict(SMOL, dataclasses.replace(shape, **{attrs[key]: value}))), key


def test_a_mac_working_set_limits_the_mlx_peak():
    plan = predict(SMOL, SHAPE)
    roomy = Capacity(physical=plan.rss_peak * 2, working_set=plan.mlx_peak * 2)
    tight = Capacity(physical=plan.rss_peak * 2, working_set=plan.mlx_peak / 2)
    assert roomy.fits(plan) and not tight.fits(plan)
    assert refusal(SMOL, SHAPE, roomy) is None and "working set" in refusal(SMOL, SHAPE, tight)


@pytest.mark.parametrize("setting", ["rollout.group_size=1000000", "model.lora_rank=1000000",
                                     "rollout.max_new_tokens=1000000"])
def test_train_refuses_a_run_that_cannot_fit_before_loading(tmp_path, capsys, setting):
    run = tmp_path / "run"
    # a fixed count: grad_accum auto would split a huge group into micro-batches that fit
    code = main(["train", "-c", "configs/tiny.yaml", "--output", str(run), "--set", "optim.grad_accum=1",
                 "--set", setting])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert setting.split("=")[0] in lines[0] and "GB" in lines[0], lines[0]
    assert not (run / "base_model").exists() and not (run / "config.yaml").exists()  # nothing was loaded


def test_plan_command_prints_both_peaks_and_a_fix_that_fits(capsys):
    assert main(["plan", "-c", "configs/tiny.yaml"]) == 0
    out = capsys.readouterr().out
    assert "MLX" in out and "RSS" in out and "this machine" in out and ": fits" in out
    assert "grad_accum auto: " in out  # the default, with the count it takes for this run
    big = ["plan", "-c", "configs/tiny.yaml", "--set", "optim.grad_accum=1", "--set", "rollout.group_size=20000",
           "--set", "rollout.max_new_tokens=48", "--memory", "8,16,32"]
    assert main(big) == 0
    verdicts = [line for line in capsys.readouterr().out.splitlines() if line.startswith("a Mac with")]
    assert len(verdicts) == 3 and all("does not fit" in v for v in verdicts)
    fix = verdicts[0].split("each of these alone fits: ")[1].split("; ")[0]  # e.g. optim.grad_accum=37
    assert main([*big[:-2], "--set", fix, "--memory", "8"]) == 0
    assert "a Mac with 8 GB: fits" in capsys.readouterr().out


@pytest.mark.parametrize("memory", ["abc", "0", "8,-1"])
def test_plan_refuses_bad_memory_sizes(capsys, memory):
    assert main(["plan", "-c", "configs/tiny.yaml", "--memory", memory]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--memory" in err


def test_memory_over_plan_fires_past_the_margin_only():
    cfg = AlertConfig(cooldown_steps=0)
    within = {"step": 1, "memory/peak_gb": 1.2, "memory/predicted_peak_gb": 1.0,
              "memory/footprint_gb": 1.0, "memory/predicted_rss_gb": 1.5}
    assert memory_over_plan(AlertState(), within, 0.25, cfg) == []
    over = dict(within, **{"memory/footprint_gb": 2.0})
    alerts = memory_over_plan(AlertState(), over, 0.25, cfg)
    assert [a.code for a in alerts] == ["memory_over_plan"] and "resident size" in alerts[0].message
    assert memory_over_plan(AlertState(), over, 0.5, cfg) == []
    assert memory_over_plan(AlertState(), {"step": 1, "memory/peak_gb": 9.0}, 0.25, cfg) == []  # no plan


def test_trainer_logs_the_prediction_beside_the_measured_peak(tmp_path):
    from mlx_coach.rl.loop import train

    cfg = tiny_cfg(tmp_path, train={"steps": 1})
    train(cfg, tmp_path / "run")
    step = [r for r in rows(tmp_path / "run") if "memory/peak_gb" in r][0]
    assert step["memory/predicted_peak_gb"] > 0 and step["memory/predicted_rss_gb"] > step["memory/predicted_peak_gb"]
    assert json.loads(json.dumps(step))["memory/peak_gb"] > 0


def _logits_bound_model(dtype):
    """A 1-block llama whose vocabulary dwarfs everything else: its update's memory is its logits'."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=8192,
                           tie_word_embeddings=True)
    model = llama.Model(args)
    model.set_dtype(dtype)
    model.freeze()
    model.model.layers[0].mlp.down_proj.unfreeze()  # a small trainable part, as an adapter is
    mx.eval(model.parameters())
    return model, {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
                   "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 8192, "tie_word_embeddings": True}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_plans_logits_copies_are_what_the_update_and_reference_pass_hold(dtype):
    import mlx.nn as nn

    from mlx_coach.config.tree import from_dict
    from mlx_coach.engine.logprobs import logprob_inputs, logprobs_from_inputs
    from mlx_coach.rl.objective import micro_batch_loss

    model, arch = _logits_bound_model(getattr(mx, dtype))
    algo = from_dict({}).algo
    group, prompts, prompt_len = 4, 2, 8

    def inputs(width):
        rows = group * prompts
        x = logprob_inputs([[1 + r // group] * prompt_len for r in range(rows)],
                           [[(7 * r + t) % 8192 for t in range(width)] for r in range(rows)], share_prompts=True)
        x.update(loss_mask=x["mask"], sampler_logp=mx.zeros((rows, width)), ref_logp=mx.zeros((rows, width)),
                 adv=mx.array([(-1.0) ** r for r in range(rows)]))
        mx.eval(x)
        return x

    def update(x):
        loss_and_grad = nn.value_and_grad(model, lambda m, b: micro_batch_loss(m, b, 0.04, algo=algo, temperature=0.7,
                                                                               max_len=64))
        mx.eval(loss_and_grad(model, x))

    def reference(x):
        mx.eval(logprobs_from_inputs(model, x, temperature=0.7)[0])

    def held(run, width):  # bytes the pass holds at its peak above what was alive before it
        x = inputs(width)
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        run(x)
        return mx.get_peak_memory() - before

    def planned(width):
        parts = predict(arch, RunShape(group_size=group, prompts_per_step=prompts, max_new_tokens=width,
                                       prompt_tokens=prompt_len, dtype=dtype)).parts
        return parts["update_activations"] + parts["update_logits"], parts["reference_pass"]

    # differences between two completion widths: the fixed costs (weights, inputs) cancel
    measured = [held(update, 64) - held(update, 16), held(reference, 64) - held(reference, 16)]
    predicted = [b - a for a, b in zip(planned(16), planned(64))]
    for got, want in zip(measured, predicted):
        assert 0.85 < want / got < 1.2, (dtype, got, want)


def test_bench_plans_full_length_switches_off_eos_and_stop_strings(tmp_path, monkeypatch):
    # `bench plan --full-length` measures the run shape the plan predicts: every completion max_new_tokens long
    spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "benchmarks" / "bench_plan.py")
    bench_plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_plan)
    model, tok, _ = load_policy(str(save_builtin_tiny(tmp_path / "m", seed=0)))
    monkeypatch.setattr(tok, "eos_token_ids", set(range(tok.vocab_size)), raising=False)  # any token ends
    cfg = RolloutConfig(temperature=1.0, group_size=4, max_new_tokens=10, stop=["a", "e", " ", "\n"])

    def lengths():
        return [len(r.token_ids) for r in generate_rollouts(model, tok, ["def f(x):\n"], cfg).rollouts]

    assert lengths() == [1] * 4
    with bench_plan.run_to_length():
        assert lengths() == [10] * 4
    assert lengths() == [1] * 4  # switched back on when the block ends


@pytest.mark.parametrize("spec", ["builtin:tiny", "builtin:tiny-8bit", "builtin:smollm2", "builtin:smollm2-4bit"])
def test_the_plan_sizes_the_dtype_a_load_without_one_computes_in(spec):
    # model.dtype null: the plan (before loading) and the load must agree on what the model computes in
    if "smollm2" in spec and find_smollm2_gguf() is None:
        pytest.skip("SmolLM2 GGUF not found (see find_smollm2_gguf)")
    _, _, info = load_policy(spec, dtype=None)
    assert describe(spec)["stored_dtype"] == info["dtype"]
