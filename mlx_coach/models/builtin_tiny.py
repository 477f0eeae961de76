"""`builtin:tiny[@SEED]`: a seeded 2.4M-parameter llama with a byte-level tokenizer, written as an
HF-layout folder (so mlx-lm's own tools load it) and cached."""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_coach.models.bpe import _write_tokenizer, byte_level_tokenizer, bytes_to_unicode
from mlx_coach.models.folder import CACHE_ROOT, _atomic_folder


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


def save_builtin_tiny(folder, seed=0, **sizes) -> Path:
    """Write the builtin tiny llama (seeded weights, byte-level tokenizer) as an HF-layout folder.

    sizes: TINY_CONFIG entries to override (hidden_size, num_hidden_layers, ...), for a smaller model
    where a test's cost matters more than the builtin's shape."""
    from mlx_lm.models import llama

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_CONFIG, **sizes, vocab_size=256 + len(TINY_SPECIALS))
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
