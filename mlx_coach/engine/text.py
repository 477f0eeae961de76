"""Completion and prompt text: the bytes each token stands for (incremental decoding), the closing fence of
an answer's first code block (rollout.stop_after_code), the code of a fenced block (rollout.extract_code),
and prompt encoding (user template, system prompt, chat template)."""

import re
import weakref
from typing import List

_FENCED = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """Code of the first ```python (or ```py) fenced block, else of the first fenced block,
    else the text itself. An unterminated block (cut by max_new_tokens) runs to the end."""
    blocks = _FENCED.findall(text)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return body
    return blocks[0][1] if blocks else text


def has_fenced_block(text: str) -> bool:
    """Whether the answer opens a fenced code block (closed or cut off)."""
    return _FENCED.search(text) is not None


def closed_block_end(buf: bytes):
    """Byte offset just past the closing fence of the first fenced block in `buf`, or None while no
    block is closed. A fence is three backticks at the start of a line (the opening one may follow text
    on the answer's first line only when it starts the answer)."""
    open_at = 0 if buf.startswith(b"```") else buf.find(b"\n```")
    if open_at < 0:
        return None
    body = buf.find(b"\n", open_at + 1)  # the opening fence's line ends; the body starts after it
    if body < 0:
        return None
    close = buf.find(b"\n```", body)
    return None if close < 0 else close + 4


def _gpt2_byte_decoder():
    from mlx_coach.models.bpe import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


_TOKEN_BYTES = weakref.WeakKeyDictionary()


def token_bytes(tokenizer) -> List[bytes]:
    """The bytes each token id stands for, so completions decode incrementally in O(1).

    Byte-level BPE: the GPT-2 byte map; SentencePiece: "▁" is a space, <0xNN> a byte;
    added/special tokens: their content. Anything else: the tokenizer's own decode.
    """
    try:
        return _TOKEN_BYTES[tokenizer]
    except (KeyError, TypeError):
        pass
    import json

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    n = len(hf)
    pieces = hf.convert_ids_to_tokens(list(range(n)))
    decoder = {}
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    added = {i: t.content for i, t in getattr(hf, "added_tokens_decoder", {}).items()}
    table = []
    if "ByteLevel" in kinds:
        bd = _gpt2_byte_decoder()
        for i, p in enumerate(pieces):
            if i in added or p is None:
                table.append((added.get(i) or "").encode())
            else:
                table.append(bytes(bd[c] for c in p) if all(c in bd for c in p) else p.encode())
    elif kinds & {"Metaspace", "ByteFallback", "Replace"}:
        for i, p in enumerate(pieces):
            if i in added or p is None:
                table.append((added.get(i) or "").encode())
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", p):
                table.append(bytes([int(p[3:5], 16)]))
            else:
                table.append(p.replace("\u2581", " ").encode())
    else:
        table = [hf.decode([i]).encode() for i in range(n)]
    try:
        _TOKEN_BYTES[tokenizer] = table
    except TypeError:
        pass
    return table


def encode_prompt(tokenizer, prompt: str, cfg) -> List[int]:
    """Prompt token ids under `cfg` (a RolloutConfig): chat template with a generation prompt, or plain
    encoding (the system prompt, if any, is then prepended to the text). `user_template` wraps the task's
    prompt (a literal replacement of {prompt}, so braces in the code need no escaping)."""
    prompt = cfg.user_template.replace("{prompt}", prompt)
    if cfg.chat_template:
        messages = [{"role": "user", "content": prompt}]
        if cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        return list(ids)
    if cfg.system_prompt:
        prompt = cfg.system_prompt + prompt
    return list(tokenizer.encode(prompt))
