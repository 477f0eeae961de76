"""Batched, KV-cached sampling of G completions per prompt, with behaviour log-probs.

Each prompt is prefilled once (prompts of a decode batch together, left-padded, in an
mlx-lm `BatchKVCache`); its cache rows are then repeated G times and all prompts x G
sequences decode together. Host-side bookkeeping (EOS, stop strings) for step t overlaps
the device computing step t + 1; finished rows are dropped from the batch as they pile up.

What a Rollout holds:
- token_ids: the sampled ids (never re-tokenized). A finishing EOS token is included.
  On a stop string, every token that starts before the stop string is kept, including one
  that straddles its start (Llama-3 and Qwen2 tokenizers have pieces like `")\n"`): it was
  sampled, so it is trained on. Tokens that start at or after the stop string are dropped.
- text: the completion's bytes cut exactly where the stop string starts (EOS excluded), so it
  never contains the stop string and never loses a byte before it: this is what gets scored.
- logprobs / entropies: per kept token, under softmax(logits / temperature) before top-p (see
  `sample`): the numbers `models.sequence_logprobs` computes at the same temperature, so they
  serve as old_logp in PPO ratios. Top-p samples from the renormalised nucleus, so a token's
  actual sampling probability is the reported one divided by the nucleus mass; like TRL and
  verl, the ratio ignores that factor.
"""

import bisect
import re
import time
import weakref
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import mlx.core as mx

from mlx_coach.errors import UserError
from mlx_coach.settings import check_fields, setting

DEFAULT_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


@dataclass
class RolloutConfig:
    """The `rollout:` config section: what each training step samples and how."""

    group_size: int = setting(4, lo=1, help="samples per prompt")
    prompts_per_step: int = setting(4, lo=1, help="prompts the trainer draws per step (the engine samples what it is given)")
    max_new_tokens: int = setting(64, lo=1)
    temperature: float = setting(1.0, lo=0.0, help="0: greedy (argmax)")
    top_p: float = setting(1.0, lo=0.0, hi=1.0, lo_open=True)
    max_batch_tokens: int = setting(16384, lo=1, help="bound on rows in flight x (padded prompt + max_new_tokens)")
    stop: Optional[list] = setting(None, help="stop strings; null = HumanEval-style defaults (none with the chat template)")
    chat_template: bool = setting(False, help="wrap the prompt in the tokenizer's chat template")
    extract_code: bool = setting(False, help="score the code of the first fenced block of the answer")
    stop_after_code: bool = setting(False, help="end an answer once its first fenced code block is closed (the text "
                                                "keeps the closing fence); with extract_code nothing after it is scored")
    system_prompt: Optional[str] = setting(None)
    user_template: str = setting("{prompt}", help="the chat user message (or the plain prompt): {prompt} is replaced by the "
                                                  "task's prompt; what the sandbox runs is still the task's prompt + the completion")
    prefill_step: int = setting(512, lo=1, help="prompt tokens per prefill forward (bounds activation memory)")
    bucket: int = setting(0, lo=0, help="pad prompt (and, in the update, sequence) lengths to a multiple of this, and "
                                          "shrink a decode batch only to powers of two, so freed buffers fit later requests; 0 = exact shapes")

    def __post_init__(self):
        check_fields(self, "rollout")
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise UserError("config key 'rollout.stop' must be a list of non-empty strings")
        if not isinstance(self.user_template, str) or "{prompt}" not in self.user_template:
            raise UserError("config key 'rollout.user_template' must be a string containing {prompt}")

    def stops(self):
        if self.stop is None:
            return () if self.chat_template else DEFAULT_STOPS
        return tuple(self.stop)


@dataclass
class Rollout:
    prompt_index: int
    sample_index: int
    prompt_ids: List[int]
    token_ids: List[int]
    logprobs: List[float]
    entropies: List[float]
    text: str
    completion: str  # what gets scored: text, or the code in its fenced block (extract_code)
    finish_reason: str  # "stop" | "eos" | "length"


@dataclass
class RolloutBatch:
    rollouts: List[Rollout]
    prefill_tokens: int = 0  # prompt tokens prefilled (each prompt once, padding excluded)
    prefill_s: float = 0.0
    decode_tokens: int = 0  # tokens sampled, including any later trimmed at a stop string
    decode_s: float = 0.0
    tokens_per_sec: float = 0.0  # decode_tokens / decode_s
    peak_batch: int = 0  # most sequences decoding together
    num_batches: int = 0
    shapes: set = field(default_factory=set)  # (rows, tokens) of the forwards: prefill chunks, decode steps
    # positions computed for no sequence: prompt padding (left padding to the longest prompt, and to the
    # bucket) and finished rows kept in the batch; compare with prefill_tokens + decode_tokens
    padding_tokens: int = 0


# ---------------------------------------------------------------------------- text helpers

_FENCED = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """Code of the first ```python (or ```py) fenced block, else of the first fenced block,
    else the text itself. An unterminated block (cut by max_new_tokens) runs to the end."""
    blocks = _FENCED.findall(text)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return body
    return blocks[0][1] if blocks else text


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
    from mlx_coach.models import bytes_to_unicode

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


def encode_prompt(tokenizer, prompt: str, cfg: RolloutConfig) -> List[int]:
    """Prompt token ids: chat template with a generation prompt, or plain encoding (the
    system prompt, if any, is then prepended to the text). `user_template` wraps the task's prompt
    (a literal replacement of {prompt}, so braces in the code need no escaping)."""
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


# ---------------------------------------------------------------------------- sampling


TOP_P_CANDIDATES = 1024


def sample(logits, temperature, top_p):
    """Sample one token per row. Returns (tokens, log-probs of them, entropies).

    Log-probs and entropies are those of softmax(logits / temperature) before top-p, the
    distribution `models.sequence_logprobs` computes at the same temperature, so they serve as
    the behaviour log-probs of PPO ratios (as in TRL and verl). Greedy decoding (temperature 0)
    reports them at temperature 1. Top-p then samples from the renormalised nucleus, so a sampled
    token's true sampling probability is higher than reported by 1 / (nucleus mass).
    One exp over the vocabulary serves the log-probs, the entropy and the sampling, which draws
    by inverse CDF: on CPU, exp dominates and the Gumbel trick would cost two more logs per entry.
    """
    logits = logits.astype(mx.float32)
    if temperature not in (0, 1):
        logits = logits * (1.0 / temperature)
    top = logits.max(axis=-1, keepdims=True)
    e = mx.exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    lse = top + mx.log(total)
    if temperature == 0:
        tokens = mx.argmax(logits, axis=-1)
    else:
        tokens = _inverse_cdf(_top_p_filter(e, top_p) if top_p < 1.0 else e)
    token_lp = mx.take_along_axis(logits, tokens[:, None], axis=-1).squeeze(-1) - lse.squeeze(-1)
    # -sum p log p with log p = logits - lse: no cancellation between large terms; a -inf
    # logit has p == 0 and contributes 0, not NaN
    plogp = mx.where(e > 0, e * (logits - lse), 0.0)
    entropy = -(plogp.sum(axis=-1, keepdims=True) / total).squeeze(-1)
    return tokens, token_lp, entropy


def _inverse_cdf(w):
    """One index per row with probability w / w.sum() (w >= 0, unnormalised)."""
    cdf = mx.cumsum(w, axis=-1)
    u = mx.random.uniform(shape=(w.shape[0], 1)) * cdf[:, -1:]
    return mx.minimum((cdf <= u).sum(axis=-1), w.shape[-1] - 1)


def _top_p_filter(w, top_p):
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p.

    The nucleus is searched among the TOP_P_CANDIDATES most likely tokens (a full sort of a
    large vocabulary costs more than the model step on CPU), so it is capped at that many.
    """
    p = w / w.sum(axis=-1, keepdims=True)
    k = min(TOP_P_CANDIDATES, p.shape[-1])
    cand = p if k == p.shape[-1] else mx.topk(p, k, axis=-1)
    ordered = mx.sort(cand, axis=-1)[..., ::-1]
    mass_before = mx.cumsum(ordered, axis=-1) - ordered
    n_keep = mx.maximum((mass_before < top_p).sum(axis=-1, keepdims=True), 1)
    threshold = mx.take_along_axis(ordered, n_keep - 1, axis=-1)
    return mx.where(p >= threshold, w, 0.0)


# ---------------------------------------------------------------------------- engine


def _batch_caches(model, left_padding):
    from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

    caches = []
    for c in make_prompt_cache(model):
        if type(c) is not KVCache:
            raise UserError(
                f"rollout: models with {type(c).__name__} layers are not supported by the batched sampler"
            )
        caches.append(BatchKVCache(left_padding))
    return caches


class _Seq:
    """Host-side state of one sampled sequence."""

    __slots__ = ("prompt", "sample", "tokens", "logprobs", "entropies", "buf", "ends", "keep", "cut", "reason",
                 "fence")

    def __init__(self, prompt, sample_index):
        self.prompt, self.sample = prompt, sample_index
        self.tokens, self.logprobs, self.entropies = [], [], []
        self.buf = bytearray()
        self.ends = []  # byte offset where each token's text ends
        self.keep = None  # number of tokens kept once finished
        self.cut = None  # byte offset where the scored text ends (a stop string's start)
        self.reason = None
        self.fence = False  # rollout.stop_after_code

    def _finish_at(self, cut):
        """Stop with the scored text ending at byte `cut`; keep every token that starts before it
        (token k starts at ends[k-1]), so a token straddling the cut stays: it was sampled."""
        self.cut, self.reason = cut, "stop"
        self.keep = bisect.bisect_left(self.ends, cut) + 1 if cut > 0 else 0

    def add(self, token, lp, ent, table, eos, stops, max_stop, max_new):
        self.tokens.append(token)
        self.logprobs.append(lp)
        self.entropies.append(ent)
        if token in eos:
            self.ends.append(len(self.buf))
            self.reason, self.keep = "eos", len(self.tokens)
            return
        start = max(0, len(self.buf) - max_stop + 1)
        self.buf += table[token] if token < len(table) else b""
        self.ends.append(len(self.buf))
        if stops:
            hits = [p for p in (self.buf.find(s, start) for s in stops) if p >= 0]
            if hits:
                self._finish_at(min(hits))
                return
        if self.fence:
            end = closed_block_end(self.buf)
            if end is not None:
                self._finish_at(end)
                return
        if len(self.tokens) >= max_new:
            self.reason, self.keep = "length", len(self.tokens)


def _plan_batches(lengths, cfg):
    """Group prompt indices (similar lengths together) under the max_batch_tokens budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current, longest = [], [], 0
    for i in order:
        longest_if = max(longest, lengths[i])
        rows = (len(current) + 1) * cfg.group_size
        if current and rows * (longest_if + cfg.max_new_tokens) > cfg.max_batch_tokens:
            batches.append(current)
            current, longest_if = [], lengths[i]
        current.append(i)
        longest = longest_if
    if current:
        batches.append(current)
    return batches


def round_up(n, bucket):
    """n rounded up to a multiple of bucket (n itself when bucket is 0)."""
    return -(-n // bucket) * bucket if bucket else n


def rows_bucket(live, bucket):
    """Rows a decode batch keeps for `live` unfinished sequences: the next power of two when bucketing."""
    return 1 << (live - 1).bit_length() if bucket and live > 0 else live


def _prefill(model, prompt_ids, pad_id, step, bucket=0, shapes=None):
    """Prefill left-padded prompts together (lengths padded up to a multiple of `bucket`; the padding is
    masked by the cache); returns (caches, last-position logits)."""
    longest = round_up(max(len(p) for p in prompt_ids), bucket)
    pads = [longest - len(p) for p in prompt_ids]
    tokens = mx.array([[pad_id] * n + p for n, p in zip(pads, prompt_ids)], dtype=mx.int32)
    caches = _batch_caches(model, pads)
    body = tokens[:, :-1]
    while body.shape[1] > 0:
        if shapes is not None:
            shapes.add((body.shape[0], body[:, :step].shape[1]))
        model(body[:, :step], cache=caches)
        mx.eval([c.state for c in caches])
        body = body[:, step:]
    logits = model(tokens[:, -1:], cache=caches)[:, -1, :]
    return caches, logits


def _decode_batch(model, prompt_ids, prompt_indices, cfg, table, eos, stops, stats):
    G = cfg.group_size
    tic = time.perf_counter()
    caches, logits = _prefill(model, prompt_ids, 0, cfg.prefill_step, cfg.bucket, stats["shapes"])
    rows = [i for i in range(len(prompt_ids)) for _ in range(G)]
    for c in caches:
        c.filter(rows)  # repeat each prompt's cache rows G times
    y, lp, ent = sample(mx.repeat(logits, G, axis=0), cfg.temperature, cfg.top_p)
    mx.eval(y, lp, ent)
    stats["prefill_s"] += time.perf_counter() - tic
    stats["prefill_tokens"] += sum(len(p) for p in prompt_ids)
    stats["padding_tokens"] += len(prompt_ids) * round_up(max(map(len, prompt_ids)), cfg.bucket) - sum(map(len, prompt_ids))

    tic = time.perf_counter()
    seqs = [_Seq(prompt_indices[i], g) for i in range(len(prompt_ids)) for g in range(G)]
    for s in seqs:
        s.fence = cfg.stop_after_code
    active = list(seqs)  # active[r] is the sequence in cache row r
    stats["peak_batch"] = max(stats["peak_batch"], len(active))
    max_stop = max((len(s) for s in stops), default=1)
    n_generated = 0
    while True:
        n_generated += 1
        more = n_generated < cfg.max_new_tokens and any(s.reason is None for s in active)
        if more:  # queue step t + 1 before reading step t's tokens
            stats["shapes"].add((len(active), 1))
            stats["padding_tokens"] += sum(s.reason is not None for s in active)  # finished rows kept as padding
            logits = model(y[:, None], cache=caches)[:, -1, :]
            nxt = sample(logits, cfg.temperature, cfg.top_p)
            mx.async_eval(*nxt)
        for s, t, l, e in zip(active, y.tolist(), lp.tolist(), ent.tolist()):
            if s.reason is None:
                s.add(t, l, e, table, eos, stops, max_stop, cfg.max_new_tokens)
                stats["decode_tokens"] += 1
        if not more or all(s.reason is not None for s in active):
            break
        y, lp, ent = nxt
        done = sum(s.reason is not None for s in active)
        target = rows_bucket(len(active) - done, cfg.bucket)
        if done and done * 4 >= len(active) and target < len(active):
            # keep the live rows, topped up with finished ones (whose tokens are ignored) to the bucket
            live = [r for r, s in enumerate(active) if s.reason is None]
            idle = [r for r, s in enumerate(active) if s.reason is not None]
            keep = sorted(live + idle[: target - len(live)])
            for c in caches:
                c.filter(keep)
            keep_arr = mx.array(keep)
            y, lp, ent = y[keep_arr], lp[keep_arr], ent[keep_arr]
            active = [active[r] for r in keep]
    stats["decode_s"] += time.perf_counter() - tic
    for s in seqs:
        if s.reason is None:
            s.reason, s.keep = "length", len(s.tokens)
    return seqs


def generate_rollouts(model, tokenizer, prompts: Sequence[str], cfg: Optional[RolloutConfig] = None,
                      on_batch=None):
    """Sample cfg.group_size completions for each prompt. Returns a RolloutBatch whose
    rollouts are ordered by (prompt_index, sample_index). Randomness comes from MLX's global
    RNG: seed it with mx.random.seed for reproducible rollouts. `on_batch(n)` is called after
    each decode batch with the number of prompts it finished (progress bars)."""
    cfg = cfg or RolloutConfig()
    prompt_ids = [encode_prompt(tokenizer, p, cfg) for p in prompts]
    for i, p in enumerate(prompt_ids):
        if not p:
            raise UserError(f"prompt {i}: encodes to no tokens")
    table = token_bytes(tokenizer)
    eos = getattr(tokenizer, "eos_token_ids", None)
    eos = set(eos) if eos is not None else {tokenizer.eos_token_id} - {None}
    stops = [s.encode() for s in cfg.stops()]
    stats = dict(prefill_tokens=0, prefill_s=0.0, decode_tokens=0, decode_s=0.0, peak_batch=0, shapes=set(),
                 padding_tokens=0)

    was_training = model.training
    model.eval()
    try:
        seqs, batches = [], _plan_batches([len(p) for p in prompt_ids], cfg)
        for batch in batches:
            seqs += _decode_batch(
                model, [prompt_ids[i] for i in batch], batch, cfg, table, eos, stops, stats
            )
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        model.train(was_training)

    rollouts = []
    for s in sorted(seqs, key=lambda s: (s.prompt, s.sample)):
        k = s.keep
        text_end = s.cut if s.cut is not None else (s.ends[k - 1] if k else 0)
        text = bytes(s.buf[:text_end]).decode("utf-8", errors="replace")
        rollouts.append(
            Rollout(
                prompt_index=s.prompt,
                sample_index=s.sample,
                prompt_ids=prompt_ids[s.prompt],
                token_ids=s.tokens[:k],
                logprobs=s.logprobs[:k],
                entropies=s.entropies[:k],
                text=text,
                completion=extract_code(text) if cfg.extract_code else text,
                finish_reason=s.reason,
            )
        )
    return RolloutBatch(
        rollouts=rollouts,
        prefill_tokens=stats["prefill_tokens"],
        prefill_s=stats["prefill_s"],
        decode_tokens=stats["decode_tokens"],
        decode_s=stats["decode_s"],
        tokens_per_sec=stats["decode_tokens"] / max(stats["decode_s"], 1e-9),
        peak_batch=stats["peak_batch"],
        num_batches=len(batches),
        shapes=stats["shapes"],
        padding_tokens=stats["padding_tokens"],
    )
