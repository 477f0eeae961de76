"""`builtin:qwen2-mini[-4bit][@SEED]`: a seeded random miniature of Qwen2.5-Coder-Instruct, the model of the Mac
recipes, written as an HF-layout folder and cached.

The architecture is mlx-lm's qwen2 class (biases on q/k/v, tied embeddings, grouped-query attention, Qwen's rope
theta and norm epsilon); the tokenizer has Qwen2.5's format: a byte-level BPE tokenizer.json with Qwen's
pre-tokenizer split and added tokens (no BOS, eos <|im_end|>, pad <|endoftext|>), and a ChatML chat template that
adds Qwen's default system message when a conversation has none. The embedding has more rows than the tokenizer
has tokens, as Qwen's does. `-4bit` is that folder quantized as mlx-community's Qwen2.5 4-bit models are (mlx-lm's
quantization, 4 bits, group 64). Sizes are small so the recipes run end to end in CI; every width is a multiple
of 64, so every linear layer and the embedding are quantized. The weights (so the scales) are float32 where
Qwen2.5's are bfloat16: MLX's CPU quantized kernels are an order of magnitude slower with half-precision scales,
and the half-precision quantized path has its own tests on the builtin tiny model.
"""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_coach.models.bpe import _write_tokenizer, byte_level_tokenizer, bytes_to_unicode
from mlx_coach.models.builtin_tiny import init_weights
from mlx_coach.models.folder import CACHE_ROOT, _atomic_folder
from mlx_coach.models.quantize import quantize_folder

QWEN2_MINI_CONFIG = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 9,  # more than the recipes' lora_layers (8): the adapters go on the last 8 of them
    "num_attention_heads": 2,  # fewer key/value heads than query heads, as Qwen2.5's
    "num_key_value_heads": 1,
    "intermediate_size": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",  # not Qwen2.5's bfloat16: MLX's CPU kernels for half-precision scales are slow
}
QUANT_BITS, QUANT_GROUP_SIZE = 4, 64  # mlx-community's Qwen2.5-Coder-*-Instruct-4bit

# Qwen2.5's added tokens in their order; the flag is whether the tokenizer treats the token as special
QWEN_SPECIALS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Pieces of Python and of the recipes' prompts that the BPE merges into single tokens: the tokenizer has merges to
# apply, as Qwen's has, and the prompts are fewer tokens than bytes
MERGED_WORDS = ("    ", "        ", "def", " return", " in", " for", " if", " self", "()", "):", "```", "python",
                " the", " a", " of", " to", " and", " is", " are", " with", " this", " one", " only", "You", " You",
                " Python", " function", " code", " block", " assistant", " helpful", "Complete", " Reply", " list",
                " int", " str", " number", " string", " given", " Return", " returns", " created")


def _merges(words):
    """(vocab extension, merges): each word, in byte-level characters, merged left to right into one token."""
    to_char = bytes_to_unicode()
    tokens, merges = [], []
    for word in words:
        chars = [to_char[b] for b in word.encode()]
        left = chars[0]
        for right in chars[1:]:
            if left + right not in tokens:
                merges.append((left, right))
                tokens.append(left + right)
            left += right
    return tokens, merges


def qwen2_mini_tokenizer():
    """(tokenizers.Tokenizer, ids of the special tokens by name): 256 byte tokens, the merged words, then
    Qwen's added tokens."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    merged, merges = _merges(MERGED_WORDS)
    for token in merged:
        vocab[token] = len(vocab)
    ids = {name: len(vocab) + i for i, (name, _) in enumerate(QWEN_SPECIALS)}
    specials = [(name, ids[name], special) for name, special in QWEN_SPECIALS]
    return byte_level_tokenizer(vocab, merges, specials=specials, pre="qwen2"), ids


def save_builtin_qwen2(folder, seed=0) -> Path:
    """Write the unquantized miniature (seeded float32 weights, Qwen2.5's tokenizer format) to `folder`."""
    from mlx_lm.models import qwen2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok, ids = qwen2_mini_tokenizer()
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    config = dict(QWEN2_MINI_CONFIG, vocab_size=-(-n_tokens // 64) * 64 + 64)  # spare rows, as Qwen's embedding
    config.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    model = init_weights(qwen2.Model(qwen2.ModelArgs.from_dict(config)), seed)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                    "pad_token_id": ids["<|endoftext|>"]}, indent=2))
    _write_tokenizer(folder, tok, bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="Qwen2Tokenizer", add_bos_token=False, bos_token=None, errors="replace",
                      split_special_tokens=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return folder


def builtin_qwen2_path(seed=0, *, bits=None, cache_dir=None) -> Path:
    """The HF-layout folder of `builtin:qwen2-mini@seed` (bits None) or `builtin:qwen2-mini-4bit@seed` (bits 4),
    created on first use."""
    root = Path(cache_dir or CACHE_ROOT).expanduser()
    target = root / f"builtin-qwen2-mini-seed{seed}"
    if not (target / "config.json").exists():
        with _atomic_folder(target) as tmp:
            save_builtin_qwen2(tmp, seed)
    if bits is None:
        return target
    quantized = root / f"builtin-qwen2-mini-{bits}bit-seed{seed}"
    if not (quantized / "config.json").exists():
        with _atomic_folder(quantized) as tmp:
            quantize_folder(target, tmp, bits=bits, group_size=QUANT_GROUP_SIZE)
    return quantized
