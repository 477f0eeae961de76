"""Byte-level BPE tokenizers (GPT-2 style) built from a vocabulary and merges, written as an HF
folder's tokenizer files: the builtin tiny model's and those read from GGUF metadata."""

import json
import logging


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
