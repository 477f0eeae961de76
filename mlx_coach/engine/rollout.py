"""Batched, KV-cached sampling of G completions per prompt, with behaviour log-probs.

Each prompt is prefilled once (prompts admitted together, left-padded, in an mlx-lm
`BatchKVCache`); its cache rows are then repeated G times and all admitted prompts x G
sequences decode together. Host-side bookkeeping (EOS, stop strings) for step t overlaps
the device computing step t + 1; finished rows are dropped from the batch as they pile up, and
with rollout.continuous (the default) waiting prompts take their place at once: prefilled
together, their cache rows are appended to the running batch (`BatchKVCache.extend`).

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

from mlx_coach.core.errors import UserError
from mlx_coach.core.settings import check_fields, setting

DEFAULT_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


@dataclass
class RolloutConfig:
    """The `rollout:` config section: what each training step samples and how."""

    group_size: int = setting(4, lo=1, help="samples per prompt")
    prompts_per_step: int = setting(4, lo=1, help="prompts the trainer draws per step (the engine samples what it is given)")
    max_new_tokens: int = setting(64, lo=1)
    temperature: float = setting(1.0, lo=0.0, help="0: greedy (argmax)")
    top_p: float = setting(1.0, lo=0.0, hi=1.0, lo_open=True)
    max_batch_tokens: int = setting(16384, lo=1, help="bound on rows in flight x (longest prompt + max_new_tokens); "
                                    "a refilled batch's cache can grow up to max_new_tokens positions wider")
    stop: Optional[list] = setting(None, help="stop strings; null = HumanEval-style defaults (none with the chat template)")
    chat_template: bool = setting(False, help="wrap the prompt in the tokenizer's chat template")
    extract_code: bool = setting(False, help="score the code of the first fenced block of the answer")
    stop_after_code: bool = setting(False, help="end an answer once its first fenced code block is closed (the text "
                                                "keeps the closing fence); with extract_code nothing after it is scored")
    system_prompt: Optional[str] = setting(None)
    user_template: str = setting("{prompt}", help="the chat user message (or the plain prompt): {prompt} is replaced by the "
                                                  "task's prompt; what the sandbox runs is still the task's prompt + the completion")
    prefill_step: int = setting(512, lo=1, help="prompt tokens per prefill forward (bounds activation memory)")
    continuous: bool = setting(True, help="refill the rows of finished sequences with waiting prompts at once "
                                          "(continuous batching), instead of starting them when the whole batch is done")
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
    num_batches: int = 0  # decode batches started from empty
    refills: int = 0  # times waiting prompts joined a running batch (rollout.continuous)
    decode_steps: int = 0  # decode forwards (one token for every row of the batch; the first comes from the prefill)
    peak_cache_tokens: int = 0  # most rows x cache positions (padding included) a decode forward attended over
    shapes: set = field(default_factory=set)  # (rows, tokens) of the forwards: prefill chunks, decode steps
    # positions computed for no sequence: prompt padding (left padding to the longest prompt, and to the
    # bucket) and finished rows kept in the batch; compare with prefill_tokens + decode_tokens
    padding_tokens: int = 0

    @property
    def rows_per_forward(self):
        """Mean rows busy per forward that sampled tokens (decode steps and the admissions' prefills): how
        full decoding kept the batch."""
        return self.decode_tokens / max(self.decode_steps + self.num_batches + self.refills, 1)


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


class _Admitted:
    """Prompts prefilled together and their G-fold rows: caches, first samples, sequences."""

    def __init__(self, model, prompt_ids, indices, cfg, stats):
        G = cfg.group_size
        tic = time.perf_counter()
        ids = [prompt_ids[i] for i in indices]
        self.caches, logits = _prefill(model, ids, 0, cfg.prefill_step, cfg.bucket, stats["shapes"])
        rows = [i for i in range(len(ids)) for _ in range(G)]
        for c in self.caches:
            c.filter(rows)  # repeat each prompt's cache rows G times
        self.pending = sample(mx.repeat(logits, G, axis=0), cfg.temperature, cfg.top_p)
        mx.eval(*self.pending)
        self.seqs = [_Seq(i, g) for i in indices for g in range(G)]
        for s in self.seqs:
            s.fence = cfg.stop_after_code
        stats["prefill_s"] += time.perf_counter() - tic
        stats["prefill_tokens"] += sum(map(len, ids))
        stats["padding_tokens"] += len(ids) * round_up(max(map(len, ids)), cfg.bucket) - sum(map(len, ids))
        stats["admissions"] += 1


def _take(waiting, prompt_ids, cfg, live_rows, longest):
    """Prompts (shortest first) to admit beside `live_rows` rows whose longest prompt has `longest` tokens,
    while rows x (longest prompt + max_new_tokens) stays within max_batch_tokens; an empty batch always
    takes one prompt."""
    taken, new_longest = [], 0
    for i in waiting:
        longest_if = max(new_longest, len(prompt_ids[i]))
        rows = live_rows + (len(taken) + 1) * cfg.group_size
        if (taken or live_rows) and rows * (max(longest, longest_if) + cfg.max_new_tokens) > cfg.max_batch_tokens:
            break
        taken.append(i)
        new_longest = longest_if
    return taken


def _rows_to_keep(active, live, rows):
    """Row indices to keep: the live ones, topped up with finished ones (whose tokens are ignored) to `rows`."""
    idle = [r for r, s in enumerate(active) if s.reason is not None]
    return sorted(live + idle[: max(0, rows - len(live))])


def _decode(model, prompt_ids, cfg, table, eos, stops, stats, on_prompts=None):
    """Decode G samples of every prompt; returns the finished sequences. Prompts are admitted shortest first,
    as many as max_batch_tokens allows; with rollout.continuous, rows freed by finished sequences are
    refilled at once by waiting prompts (prefilled together, their cache rows appended to the running
    batch), otherwise the next prompts start only when the whole batch has finished. `on_prompts(n)` is
    called whenever n more prompts have all their G sequences finished."""
    G = cfg.group_size
    waiting = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    max_stop = max((len(s) for s in stops), default=1)
    unfinished = {i: G for i in waiting}
    seqs = []

    def admit(live_rows, longest):
        taken = _take(waiting, prompt_ids, cfg, live_rows, longest)
        del waiting[: len(taken)]
        adm = _Admitted(model, prompt_ids, taken, cfg, stats) if taken else None
        seqs.extend(adm.seqs if adm else ())
        return taken, adm

    _, adm = admit(0, 0)
    caches, (y, lp, ent), active = adm.caches, adm.pending, list(adm.seqs)  # active[r]: the sequence in row r
    tic = time.perf_counter()
    while True:
        stats["peak_batch"] = max(stats["peak_batch"], len(active))
        # queue step t + 1 before reading step t's tokens, unless every live row ends with them
        more = any(s.reason is None and len(s.tokens) < cfg.max_new_tokens - 1 for s in active)
        if more:
            stats["shapes"].add((len(active), 1))
            stats["decode_steps"] += 1
            stats["peak_cache_tokens"] = max(stats["peak_cache_tokens"], len(active) * (caches[0].size() + 1))
            stats["padding_tokens"] += sum(s.reason is not None for s in active)  # finished rows kept as padding
            logits = model(y[:, None], cache=caches)[:, -1, :]
            nxt = sample(logits, cfg.temperature, cfg.top_p)
            mx.async_eval(*nxt)
        prompts_done = 0
        for s, t, l, e in zip(active, y.tolist(), lp.tolist(), ent.tolist()):
            if s.reason is None:
                s.add(t, l, e, table, eos, stops, max_stop, cfg.max_new_tokens)
                stats["decode_tokens"] += 1
                if s.reason is not None:
                    unfinished[s.prompt] -= 1
                    prompts_done += unfinished[s.prompt] == 0
        if prompts_done and on_prompts is not None:
            on_prompts(prompts_done)
        live = [r for r, s in enumerate(active) if s.reason is None]
        if not more or not live:
            if not waiting:
                break
            stats["decode_s"] += time.perf_counter() - tic
            _, adm = admit(0, 0)
            caches, (y, lp, ent), active = adm.caches, adm.pending, list(adm.seqs)
            tic = time.perf_counter()
            continue
        y, lp, ent = nxt
        adm = None
        if cfg.continuous and waiting and len(live) < len(active):  # rows are free: refill them
            # rows are what the budget counts; the refilled cache itself may grow up to max_new_tokens positions
            # wider (joined rows sit behind left padding until the older rows leave): bounding it by its width
            # too kept half the rows idle (tiny model: 1.43x batch after batch instead of 1.70x)
            longest_live = max(len(prompt_ids[active[r].prompt]) for r in live)
            t_admit = time.perf_counter()
            taken, adm = admit(len(live), longest_live)
        if adm is not None:
            stats["decode_s"] += t_admit - tic
            tic = time.perf_counter()
            rows = len(live) + len(adm.seqs)
            longest = max(longest_live, *(len(prompt_ids[i]) for i in taken))
            if rows_bucket(rows, cfg.bucket) * (longest + cfg.max_new_tokens) <= cfg.max_batch_tokens:
                rows = rows_bucket(rows, cfg.bucket)  # pad with finished rows to the bucket, within the budget
            keep = _rows_to_keep(active, live, rows - len(adm.seqs))
        else:
            done = len(active) - len(live)
            target = rows_bucket(len(live), cfg.bucket)
            if not (done and done * 4 >= len(active) and target < len(active)):
                continue
            keep = _rows_to_keep(active, live, target)  # shrink: drop finished rows as they pile up
        keep_arr = mx.array(keep)
        for c in caches:
            c.filter(keep)
        y, lp, ent = y[keep_arr], lp[keep_arr], ent[keep_arr]
        active = [active[r] for r in keep]
        if adm is not None:  # append the admitted prompts' rows
            for c, new in zip(caches, adm.caches):
                c.extend(new)
            y, lp, ent = (mx.concatenate([a, b]) for a, b in zip((y, lp, ent), adm.pending))
            mx.eval(y, lp, ent, [c.state for c in caches])
            active += adm.seqs
            stats["refills"] += 1
            stats["prefill_s"] += time.perf_counter() - tic
            tic = time.perf_counter()
    stats["decode_s"] += time.perf_counter() - tic
    return seqs


def _rollout(s, prompt_ids, cfg):
    """A finished sequence as the Rollout that is trained on and scored."""
    k = s.keep
    text_end = s.cut if s.cut is not None else (s.ends[k - 1] if k else 0)
    text = bytes(s.buf[:text_end]).decode("utf-8", errors="replace")
    return Rollout(prompt_index=s.prompt, sample_index=s.sample, prompt_ids=prompt_ids, token_ids=s.tokens[:k],
                   logprobs=s.logprobs[:k], entropies=s.entropies[:k], text=text,
                   completion=extract_code(text) if cfg.extract_code else text, finish_reason=s.reason)


def generate_rollouts(model, tokenizer, prompts: Sequence[str], cfg: Optional[RolloutConfig] = None,
                      on_batch=None):
    """Sample cfg.group_size completions for each prompt. Returns a RolloutBatch whose
    rollouts are ordered by (prompt_index, sample_index). Randomness comes from MLX's global
    RNG: seed it with mx.random.seed for reproducible rollouts. `on_batch(n)` is called whenever n
    more prompts have all their G samples finished (progress bars)."""
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
                 padding_tokens=0, admissions=0, refills=0, decode_steps=0, peak_cache_tokens=0)

    was_training = model.training
    model.eval()
    try:
        seqs = _decode(model, prompt_ids, cfg, table, eos, stops, stats, on_prompts=on_batch)
    finally:
        model.train(was_training)
    rollouts = [_rollout(s, prompt_ids[s.prompt], cfg) for s in sorted(seqs, key=lambda s: (s.prompt, s.sample))]
    return RolloutBatch(
        rollouts=rollouts,
        prefill_tokens=stats["prefill_tokens"],
        prefill_s=stats["prefill_s"],
        decode_tokens=stats["decode_tokens"],
        decode_s=stats["decode_s"],
        tokens_per_sec=stats["decode_tokens"] / max(stats["decode_s"], 1e-9),
        peak_batch=stats["peak_batch"],
        num_batches=stats["admissions"] - stats["refills"],
        refills=stats["refills"],
        decode_steps=stats["decode_steps"],
        peak_cache_tokens=stats["peak_cache_tokens"],
        shapes=stats["shapes"],
        padding_tokens=stats["padding_tokens"],
    )
