import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2

from mlx_coach.core.errors import UserError
from mlx_coach.models.builtin_tiny import TINY_SPECIALS, init_weights, save_builtin_tiny
from mlx_coach.models.lora import adapter_config, adapters_disabled, apply_lora, frozen_copy, save_adapters, unfreeze_all
from mlx_coach.models.bpe import bytes_to_unicode
from mlx_coach.models.gguf import find_smollm2_gguf, load_gguf
from mlx_coach.models.loader import load_policy
from mlx_coach.engine.logprobs import sequence_logprobs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_builtin_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture
def tiny(tiny_dir):
    return load_policy(str(tiny_dir))


def logits_of(model, ids):
    return model(mx.array([ids]))[0]


# ---------------------------------------------------------------------------- builtin tiny


def test_builtin_folder_loads_and_generates_with_mlx_lm(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "llama"
    model, tok = mlx_lm.load(str(tiny_dir))
    text = mlx_lm.generate(model, tok, "def add(a, b):", max_tokens=5)
    assert isinstance(text, str)
    # byte-level: every byte is its own token, bos first
    s = "héllo\n\tworld"
    assert tok.encode(s) == [256] + list(s.encode())
    assert tok.decode(tok.encode(s), skip_special_tokens=True) == s
    assert tok.eos_token_ids == {257}
    assert len(tok) == 256 + len(TINY_SPECIALS)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.decode(chat).endswith("<|assistant|>\n")


def test_mlx_lm_cli_generates_from_builtin_folder(tiny_dir):
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(tiny_dir),
         "--prompt", "def f(x):", "--max-tokens", "5"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr
    assert "Generation: 5 tokens" in out.stdout


def test_load_policy_builtin_is_seeded_and_cached(tmp_path):
    m0, _, info0 = load_policy("builtin:tiny", cache_dir=tmp_path)
    assert info0["kind"] == "builtin" and info0["path"].endswith("builtin-tiny-seed0")
    assert 2e6 < info0["num_params"] < 5e6
    m0b, _, _ = load_policy("builtin:tiny@0", cache_dir=tmp_path / "other")
    m1, _, info1 = load_policy("builtin:tiny@1", cache_dir=tmp_path)
    w0 = dict(tree_flatten(m0.parameters()))
    w0b = dict(tree_flatten(m0b.parameters()))
    w1 = dict(tree_flatten(m1.parameters()))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert mx.array_equal(w0[name], w0b[name])
    assert not mx.array_equal(w0[name], w1[name])
    assert w0[name].dtype == mx.float32
    # the info path is what adapters name as base model: mlx_lm.load accepts it
    mlx_lm.load(info1["path"])
    m16, _, _ = load_policy("builtin:tiny", cache_dir=tmp_path, dtype="bfloat16")
    assert dict(tree_flatten(m16.parameters()))[name].dtype == mx.bfloat16


def test_load_policy_bad_specs_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.gguf").write_text("not a gguf")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "nonsense"}')
    cases = {
        "/nonexistent/model": "does not exist",
        "./missing-dir/model": "does not exist",
        str(tmp_path / "missing.gguf"): "not found",
        str(tmp_path / "fake.gguf"): "cannot read GGUF",
        str(tmp_path / "empty"): "no config.json",
        str(tmp_path / "notes.txt"): "neither",
        "builtin:huge": "unknown builtin",
        "builtin:tiny-3bit": "unknown builtin",
        str(tmp_path / "odd"): "cannot load model",
        # offline here: the hub is unreachable; online: no such repository. Never a download.
        "mlx-coach-tests/no-such-model-3f9a1c": "cannot fetch",
    }
    for spec, msg in cases.items():
        with pytest.raises(UserError, match=msg) as e:
            load_policy(spec, cache_dir=tmp_path / "cache")
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="dtype"):
        load_policy("builtin:tiny", cache_dir=tmp_path / "cache", dtype="float8")


# ---------------------------------------------------------------------------- dtype and quantized folders


def test_quantize_folder_is_mlx_lm_layout_and_the_load_cast_spares_the_quantization(tiny_dir, tmp_path):
    from mlx_coach.models.quantize import quantize_folder

    q = quantize_folder(tiny_dir, tmp_path / "q4", bits=4, dtype="bfloat16")
    config = json.loads((q / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["torch_dtype"] == "bfloat16"
    stored = mx.load(str(q / "model.safetensors"))
    plain, _ = mlx_lm.load(str(q))  # mlx-lm's own loader reads it as quantized
    assert isinstance(plain.model.layers[0].mlp.down_proj, nn.QuantizedLinear)

    model, _, info = load_policy(str(q), dtype=None)  # the folder's
    assert info["dtype"] == "bfloat16" and info["quantization"]["bits"] == 4
    assert model.model.norm.weight.dtype == mx.bfloat16
    model, _, info = load_policy(str(q), dtype="float32")
    assert info["dtype"] == "float32" and model.model.norm.weight.dtype == mx.float32
    params = dict(tree_flatten(model.parameters()))
    packed = [k for k in stored if k.endswith((".scales", ".biases")) or stored[k].dtype == mx.uint32]
    assert packed and all(params[k].dtype == stored[k].dtype and mx.array_equal(params[k], stored[k]) for k in packed)
    # a half dtype other than the scales' would compute in float32: refused in one line
    with pytest.raises(UserError, match="model.dtype.*bfloat16 scales") as e:
        load_policy(str(q), dtype="float16")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="already quantized"):
        quantize_folder(q, tmp_path / "again", bits=8)
    with pytest.raises(UserError, match="bits"):
        quantize_folder(tiny_dir, tmp_path / "q3", bits=3)


def test_lora_on_a_half_precision_quantized_base_keeps_float32_adapters(tiny_dir, tmp_path):
    from mlx_coach.models.quantize import quantize_folder

    q = quantize_folder(tiny_dir, tmp_path / "q8", bits=8, dtype="float16")
    model, _, _ = load_policy(str(q), dtype=None)
    apply_lora(model, rank=4, alpha=8)
    lora = dict(tree_flatten(model.trainable_parameters()))
    assert lora and all(v.dtype == mx.float32 for v in lora.values())
    assert model(mx.array([[1, 2, 3]])).dtype == mx.float16  # the adapters' output follows the input's dtype


def test_builtin_quantized_specs_are_seeded_and_cached_per_dtype(tmp_path):
    model, _, info = load_policy("builtin:tiny-8bit@1", dtype="float16", cache_dir=tmp_path)
    assert info["kind"] == "builtin" and info["quantization"]["bits"] == 8 and info["dtype"] == "float16"
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == mx.float16
    again = load_policy("builtin:tiny-8bit@1", dtype="float16", cache_dir=tmp_path)[2]
    assert again["path"] == info["path"]
    plain = load_policy("builtin:tiny-4bit@1", cache_dir=tmp_path)[2]  # no dtype: the tiny folder's float32
    assert plain["quantization"]["bits"] == 4 and plain["dtype"] == "float32" and plain["path"] != info["path"]


def test_model_dtype_is_a_validated_config_key():
    from mlx_coach.config.tree import from_dict, validate

    assert from_dict({}).model.dtype is None
    assert from_dict({"model": {"dtype": "bfloat16"}}).model.dtype == "bfloat16"
    with pytest.raises(UserError, match="model.dtype"):
        validate(from_dict({"model": {"dtype": "float8"}}))


# ---------------------------------------------------------------------------- GGUF


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = [
    ("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output"),
    ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"), ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
]


def write_gguf(path, model, args, tokens, merges, arch="llama"):
    weights = {}
    for name, w in tree_flatten(model.parameters()):
        if arch == "llama" and "q_proj" in name:
            w = _permute(w, args.num_attention_heads)
        elif arch == "llama" and "k_proj" in name:
            w = _permute(w, args.num_key_value_heads)
        name = name.replace("model.layers.", "blk.")
        for hf, gg in _TO_GGUF:
            name = name.replace(hf, gg)
        weights[name] = w
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    md = {
        "general.architecture": arch,
        f"{arch}.embedding_length": u32(args.hidden_size),
        f"{arch}.block_count": u32(args.num_hidden_layers),
        f"{arch}.feed_forward_length": u32(args.intermediate_size),
        f"{arch}.attention.head_count": u32(args.num_attention_heads),
        f"{arch}.attention.head_count_kv": u32(args.num_key_value_heads),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(args.rms_norm_eps, dtype=mx.float32),
        f"{arch}.rope.freq_base": mx.array(args.rope_theta, dtype=mx.float32),
        f"{arch}.context_length": u32(2048),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array(
            [3 if t.startswith("<|") else 1 for t in tokens], dtype=mx.int32
        ),
        "tokenizer.ggml.bos_token_id": u32(tokens.index("<|bos|>")),
        "tokenizer.ggml.eos_token_id": u32(tokens.index("<|eos|>")),
        "tokenizer.ggml.add_bos_token": mx.array(True),
        "tokenizer.chat_template":
            "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
    }
    mx.save_gguf(str(path), weights, md)


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_gguf_round_trip_matches_original_logits(tmp_path, arch, tied):
    byte_tokens = [bytes_to_unicode()[b] for b in range(256)]
    merged = ["de", "def", "in", "Ġre"]
    merges = ["d e", "de f", "i n", "Ġ r", "Ġr e"]
    tokens = byte_tokens + merged + ["Ġr", "<|bos|>", "<|eos|>"]
    family = {"llama": llama, "qwen2": qwen2}[arch]
    args = family.ModelArgs(
        model_type=arch, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=len(tokens),
        rope_theta=10000.0, tie_word_embeddings=tied,
    )
    model = init_weights(family.Model(args), seed=3)
    # non-zero biases (qwen2 has q/k/v biases) so that their mapping is checked too
    biases = [(n, 0.1 * mx.random.normal(p.shape, key=mx.random.key(i)))
              for i, (n, p) in enumerate(tree_flatten(model.parameters())) if n.endswith(".bias")]
    model.load_weights(biases, strict=False)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, args, tokens, merges, arch=arch)

    loaded, tok, info = load_gguf(path, cache_dir=tmp_path / "cache")
    assert info["kind"] == "gguf" and info["source"] == str(path)
    assert info["config"]["model_type"] == arch and (arch == "llama" or biases)
    ids = tok.encode("def f(x):\n return x in y")
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:3] == ["<|bos|>", "def", "Ġ"] and "Ġre" in pieces and "in" in pieces
    np.testing.assert_allclose(
        np.array(logits_of(loaded, ids)), np.array(logits_of(model, ids)), atol=1e-5, rtol=1e-5
    )
    assert tok.eos_token_ids == {tokens.index("<|eos|>")}
    assert tok.decode(ids, skip_special_tokens=True) == "def f(x):\n return x in y"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
    # the converted folder is a plain mlx-lm model (adapters can name it as their base)
    again, _ = mlx_lm.load(info["path"])
    assert ("lm_head" in dict(again.children())) == (not tied)
    # converted once: a second load reuses the cached folder
    _, _, info2 = load_gguf(path, cache_dir=tmp_path / "cache")
    assert info2["path"] == info["path"]


def test_gguf_unsupported_architecture_is_user_error(tmp_path):
    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["<|bos|>", "<|eos|>"]
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
        num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=len(tokens), num_key_value_heads=2,
    )
    path = tmp_path / "weird.gguf"
    write_gguf(path, init_weights(llama.Model(args), 0), args, tokens, [], arch="mamba")
    with pytest.raises(UserError, match="unsupported GGUF architecture 'mamba'"):
        load_policy(str(path), cache_dir=tmp_path / "cache")


SMOLLM2 = find_smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF not found (set MLX_COACH_SMOLLM2_GGUF; see find_smollm2_gguf)")
    return load_policy(str(SMOLLM2), cache_dir=tmp_path_factory.mktemp("smol"))


def test_smollm2_gguf_tokenizes_and_writes_code(smollm2):
    model, tok, info = smollm2
    assert info["config"]["num_hidden_layers"] == 30 and 1.3e8 < info["num_params"] < 1.4e8
    ids = tok.encode("def add(a, b):")
    assert tok.convert_ids_to_tokens(ids) == ["def", "Ġadd", "(", "a", ",", "Ġb", "):"]
    assert tok.convert_ids_to_tokens(tok.encode("x = 123")) == ["x", "Ġ=", "Ġ", "1", "2", "3"]
    assert tok.eos_token_ids == {2}  # <|im_end|>
    messages = [{"role": "user", "content": "Write a Python function that returns the square of a number."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert tok.decode(prompt).startswith("<|im_start|>system\n")
    text = mlx_lm.generate(model, tok, prompt, max_tokens=40)
    assert "def " in text and "return" in text and "**" in text
    # first-token distribution: a code fence is the model's clear favourite
    logits = logits_of(model, prompt)[-1]
    top = mx.argmax(logits).item()
    assert tok.decode([top]) in ("```", "Here", "def", "```python")
    assert (mx.softmax(logits)[top] > 0.3).item()


# ---------------------------------------------------------------------------- LoRA, reference


def _perturb_lora(model, seed=1):
    key = mx.random.key(seed)
    new = [
        (n, 0.05 * mx.random.normal(p.shape, key=mx.random.split(key, 100)[i % 100]))
        for i, (n, p) in enumerate(tree_flatten(model.trainable_parameters()))
        if n.endswith("lora_b")
    ]
    model.load_weights(new, strict=False)


def test_lora_trainable_params_and_adapters_disabled(tiny):
    model, tok, info = tiny
    ids = tok.encode("def add(a, b):\n    return")
    base = logits_of(model, ids)
    lora = apply_lora(model, rank=4, alpha=8, num_layers=2)
    assert lora == {
        "fine_tune_type": "lora", "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": None},
    }
    names = [n for n, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    assert {n.split(".")[2] for n in names} == {"2", "3"}  # last two of four blocks
    assert mx.array_equal(logits_of(model, ids), base)  # lora_b starts at zero
    _perturb_lora(model)
    adapted = logits_of(model, ids)
    assert not mx.allclose(adapted, base, atol=1e-4)
    with adapters_disabled(model):
        assert mx.array_equal(logits_of(model, ids), base)
    assert mx.array_equal(logits_of(model, ids), adapted)


def test_saved_adapters_load_in_mlx_lm(tiny, tmp_path):
    model, tok, info = tiny
    lora = apply_lora(model, rank=4, alpha=16, keys=["self_attn.q_proj", "self_attn.v_proj"])
    _perturb_lora(model)
    out = save_adapters(model, tmp_path / "ad", adapter_config(info["path"], lora))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["model"] == info["path"] and cfg["lora_parameters"]["scale"] == 4.0
    saved = mx.load(str(out / "adapters.safetensors"))
    assert set(saved) == {n for n, _ in tree_flatten(model.trainable_parameters())}
    assert all(".self_attn.q_proj." in n or ".self_attn.v_proj." in n for n in saved)
    reloaded, _ = mlx_lm.load(cfg["model"], adapter_path=str(out))
    ids = tok.encode("print('hi')")
    assert mx.allclose(logits_of(reloaded, ids), logits_of(model, ids), atol=1e-5)


def test_full_finetune_frozen_copy(tiny):
    model, tok, _ = tiny
    unfreeze_all(model)
    ref = frozen_copy(model)
    assert tree_flatten(ref.trainable_parameters()) == []
    n_all = len(tree_flatten(model.parameters()))
    assert len(tree_flatten(model.trainable_parameters())) == n_all
    ids = tok.encode("x = 1")
    before = logits_of(model, ids)
    assert mx.array_equal(logits_of(ref, ids), before)
    model.update(
        {"model": {"norm": {"weight": model.model.norm.weight * 2.0}}}
    )
    model.model.embed_tokens.weight = model.model.embed_tokens.weight + 0.1
    assert not mx.allclose(logits_of(model, ids), before)
    assert mx.array_equal(logits_of(ref, ids), before)
    cfg = adapter_config("/base")
    assert cfg == {"model": "/base", "fine_tune_type": "full", "num_layers": -1}


# ---------------------------------------------------------------------------- log-probs


def _reference_logprobs(model, prompt, completion):
    logits = logits_of(model, prompt + completion).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    rows = [logp[len(prompt) - 1 + t] for t in range(len(completion))]
    lp = [r[c].item() for r, c in zip(rows, completion)]
    ent = [(-(mx.exp(r) * r).sum()).item() for r in rows]
    return lp, ent


def test_sequence_logprobs_matches_unbatched_reference(tiny):
    model, tok, _ = tiny
    prompts = [tok.encode("def f(x):\n"), tok.encode("a"), tok.encode("import os\nimport sys\n\n")]
    completions = [tok.encode(" return x", add_special_tokens=False), [],
                   tok.encode("def main():\n    pass", add_special_tokens=False)]
    logp, mask, ent = sequence_logprobs(model, prompts, completions, with_entropy=True)
    T = max(len(c) for c in completions)
    assert logp.shape == mask.shape == ent.shape == (3, T) and logp.dtype == mx.float32
    for b, (p, c) in enumerate(zip(prompts, completions)):
        assert mask[b].tolist() == [1.0] * len(c) + [0.0] * (T - len(c))
        ref_lp, ref_ent = _reference_logprobs(model, p, c)
        np.testing.assert_allclose(np.array(logp[b, : len(c)]), ref_lp, atol=1e-4)
        np.testing.assert_allclose(np.array(ent[b, : len(c)]), ref_ent, atol=1e-4)
        assert not np.array(logp[b, len(c):]).any()
    # models outside the known llama family take the plain full-logits path: same numbers
    model.model_type = "something-else"
    logp2, _, ent2 = sequence_logprobs(model, prompts, completions, with_entropy=True)
    model.model_type = "llama"
    assert mx.allclose(logp2, logp, atol=1e-5) and mx.allclose(ent2, ent, atol=1e-5)
    lp_empty, mask_empty, none = sequence_logprobs(model, [prompts[1]], [[]])
    assert lp_empty.shape == (1, 1) and mask_empty.tolist() == [[0.0]] and none is None


def test_sequence_logprobs_is_differentiable_through_lora(tiny):
    model, tok, _ = tiny
    apply_lora(model, rank=4)
    _perturb_lora(model)
    prompts = [tok.encode("def f(x):"), tok.encode("y")]
    completions = [tok.encode(" return 1", add_special_tokens=False), [65, 66]]

    def loss_fn(m):
        logp, mask, _ = sequence_logprobs(m, prompts, completions)
        return -(logp * mask).sum() / mask.sum()

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    flat = dict(tree_flatten(grads))
    assert set(flat) == {n for n, _ in tree_flatten(model.trainable_parameters())}
    assert loss.item() > 0
    assert all(mx.abs(g).sum().item() > 0 for g in flat.values())


def test_shared_prompt_logprobs_equal_per_sample_logprobs_and_gradients(tiny):
    """Each group's prompt computed once (its keys and values gathered for the G rows) gives the
    per-sample forward's log-probs, entropies and LoRA gradients: groups of different prompt and
    completion lengths, an empty completion, with and without bucket padding."""
    model, tok, _ = tiny
    apply_lora(model, rank=4)
    _perturb_lora(model)
    rng = np.random.default_rng(0)
    prompts, comps = [], []
    for g, plen in enumerate((3, 17, 40)):
        p = rng.integers(0, 256, plen).tolist()
        for s in range(3):
            prompts.append(p)
            comps.append([] if (g, s) == (1, 2) else rng.integers(0, 256, int(rng.integers(1, 25))).tolist())

    def loss_fn(m, share, bucket):
        logp, mask, ent = sequence_logprobs(m, prompts, comps, with_entropy=True, temperature=0.7,
                                            share_prompts=share, bucket=bucket)
        return (logp * mask).sum() / mask.sum() + 0.1 * ent.sum(), (logp, ent)

    results = {}
    for share, bucket in ((False, 0), (True, 0), (True, 32)):
        (loss, (logp, ent)), grads = nn.value_and_grad(model, lambda m: loss_fn(m, share, bucket))(model)
        results[share, bucket] = (loss.item(), np.array(logp), np.array(ent), dict(tree_flatten(grads)))
    loss0, lp0, ent0, g0 = results[False, 0]
    assert lp0.shape == (9, max(len(c) for c in comps)) and not lp0[5].any()  # the empty completion: masked
    for key in ((True, 0), (True, 32)):
        loss1, lp1, ent1, g1 = results[key]
        # measured: up to 6e-6 apart in log-probs (attention sums in another order)
        np.testing.assert_allclose(lp1, lp0, atol=1e-4)
        np.testing.assert_allclose(ent1, ent0, atol=1e-4)
        assert loss1 == pytest.approx(loss0, rel=1e-5)
        diff = np.sqrt(sum(float(mx.sum(mx.square(g1[k] - g0[k])).item()) for k in g0))
        norm = np.sqrt(sum(float(mx.sum(mx.square(g0[k])).item()) for k in g0))
        assert norm > 0 and diff <= 1e-4 * norm, (key, diff, norm)
