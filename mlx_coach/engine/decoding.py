"""Batched, KV-cached decoding of G samples per prompt, with continuous batching.

Each prompt is prefilled once (prompts admitted together, left-padded, in an mlx-lm
`BatchKVCache`); its cache rows are then repeated G times and all admitted prompts x G
sequences decode together. Host-side bookkeeping (EOS, stop strings) for step t overlaps
the device computing step t + 1; finished rows are dropped from the batch as they pile up, and
with rollout.continuous (the default) waiting prompts take their place at once: prefilled
together, their cache rows are appended to the running batch (`BatchKVCache.extend`).

A sampled sequence's draws are its own (`sampling.SampleKeys`): each admitted row brings the table of its
max_new_tokens uniforms, which follows the row through filters and refills, and its i-th token takes
the table's column i. So no sample depends on the rows beside it, how many there are, or when it started.
"""

import time

import mlx.core as mx

from mlx_coach.core.errors import UserError
from mlx_coach.engine.buckets import round_up, rows_bucket
from mlx_coach.engine.sampling import sample
from mlx_coach.engine.text import closed_block_end


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
    """Host-side state of one sampled sequence: its tokens, their bytes, and where it finishes (EOS, a stop
    string, the closed code block of rollout.stop_after_code, or max_new_tokens)."""

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
        """Stop with the scored text ending at byte `cut`. Every sampled token is kept, through the one
        that completed the stop string (or the closing fence): the model is trained to end its answer
        the way it did, as an answer ended by EOS trains its EOS token."""
        self.cut, self.reason = cut, "stop"
        self.keep = len(self.tokens)

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

    def __init__(self, model, prompt_ids, indices, cfg, stats, keys):
        G = cfg.group_size
        tic = time.perf_counter()
        ids = [prompt_ids[i] for i in indices]
        self.caches, logits = _prefill(model, ids, 0, cfg.prefill_step, cfg.bucket, stats["shapes"])
        rows = [i for i in range(len(ids)) for _ in range(G)]
        for c in self.caches:
            c.filter(rows)  # repeat each prompt's cache rows G times
        # [rows, max_new_tokens] draws of the rows (None when greedy: nothing is drawn)
        self.draws = keys.uniforms([(i, g) for i in indices for g in range(G)], cfg.max_new_tokens) if keys else None
        self.pending = sample(mx.repeat(logits, G, axis=0), cfg.temperature, cfg.top_p,
                              None if self.draws is None else self.draws[:, :1], top_k=cfg.top_k, min_p=cfg.min_p)
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


def _draws_at(draws, active, max_new):
    """[rows, 1]: each row's draw for the token after its pending one (len(tokens) + 1; finished rows, whose
    tokens are ignored, and a last token's successor read the table's last column)."""
    if draws is None:
        return None
    at = mx.array([[min(len(s.tokens) + 1, max_new - 1)] for s in active])
    return mx.take_along_axis(draws, at, axis=1)


def decode_groups(model, prompt_ids, cfg, table, eos, stops, stats, keys=None, on_prompts=None):
    """Decode G samples of every prompt; returns the finished sequences (`_Seq`), and adds to `stats` (the
    counters of a RolloutBatch). keys (`SampleKeys`) gives each sequence its draws; None only when greedy.
    Prompts are admitted shortest first, as many as max_batch_tokens allows; with rollout.continuous, rows
    freed by finished sequences are refilled at once by waiting prompts (prefilled together, their cache rows
    appended to the running batch), otherwise the next prompts start only when the whole batch has finished.
    `on_prompts(n)` is called whenever n more prompts have all their G sequences finished."""
    G = cfg.group_size
    waiting = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    max_stop = max((len(s) for s in stops), default=1)
    unfinished = {i: G for i in waiting}
    seqs = []

    def admit(live_rows, longest):
        taken = _take(waiting, prompt_ids, cfg, live_rows, longest)
        del waiting[: len(taken)]
        adm = _Admitted(model, prompt_ids, taken, cfg, stats, keys) if taken else None
        seqs.extend(adm.seqs if adm else ())
        return taken, adm

    _, adm = admit(0, 0)
    # active[r]: the sequence in row r; draws[r]: its draws
    caches, (y, lp, ent), active, draws = adm.caches, adm.pending, list(adm.seqs), adm.draws
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
            nxt = sample(logits, cfg.temperature, cfg.top_p, _draws_at(draws, active, cfg.max_new_tokens),
                         top_k=cfg.top_k, min_p=cfg.min_p)
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
            caches, (y, lp, ent), active, draws = adm.caches, adm.pending, list(adm.seqs), adm.draws
            tic = time.perf_counter()
            continue
        y, lp, ent = nxt
        adm = None
        if cfg.continuous and waiting and len(live) < len(active):  # rows are free: refill them
            # rows are what the budget counts, not the width of the refilled cache, which may grow up to
            # max_new_tokens positions wider (joined rows sit behind left padding until the older rows leave)
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
        draws = None if draws is None else draws[keep_arr]
        active = [active[r] for r in keep]
        if adm is not None:  # append the admitted prompts' rows
            for c, new in zip(caches, adm.caches):
                c.extend(new)
            y, lp, ent = (mx.concatenate([a, b]) for a, b in zip((y, lp, ent), adm.pending))
            draws = None if draws is None else mx.concatenate([draws, adm.draws])
            mx.eval(y, lp, ent, draws, [c.state for c in caches])
            active += adm.seqs
            stats["refills"] += 1
            stats["prefill_s"] += time.perf_counter() - tic
            tic = time.perf_counter()
    stats["decode_s"] += time.perf_counter() - tic
    return seqs
