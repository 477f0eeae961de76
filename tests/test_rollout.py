import mlx.core as mx
import numpy as np
import pytest

from mlx_coach.core.errors import UserError
from mlx_coach.models.gguf import find_smollm2_gguf
from mlx_coach.models.loader import load_policy
from mlx_coach.models.builtin_tiny import save_builtin_tiny
from mlx_coach.engine.logprobs import sequence_logprobs
from mlx_coach.engine.decoding import _Seq
from mlx_coach.engine.rollout import DEFAULT_STOPS, Rollout, RolloutBatch, RolloutConfig, generate_rollouts
from mlx_coach.engine.sampling import sample
from mlx_coach.engine.text import closed_block_end, encode_prompt, extract_code, token_bytes

PROMPTS = [
    "def add(a, b):\n",
    "x",
    'import os\nimport sys\n\n\ndef main(argv):\n    """Parse the arguments and run."""\n',
    "class Stack:\n    def push(self, item):\n",
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = save_builtin_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)
    model, tok, _ = load_policy(str(folder))
    return model, tok


def reference_greedy(model, prompt_ids, n, eos=()):
    """Per-sequence decode without a cache: the full sequence through the model each step."""
    seq = list(prompt_ids)
    for _ in range(n):
        tok = mx.argmax(model(mx.array([seq]))[0, -1]).item()
        seq.append(tok)
        if tok in eos:
            break
    return seq[len(prompt_ids):]


def greedy(**kw):
    return RolloutConfig(**{"temperature": 0.0, "stop": [], **kw})


def test_greedy_batched_matches_uncached_reference(policy):
    model, tok = policy
    cfg = greedy(group_size=2, max_new_tokens=16)
    lengths = [len(encode_prompt(tok, p, cfg)) for p in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS)  # left padding really is exercised
    batch = generate_rollouts(model, tok, PROMPTS, cfg)
    assert isinstance(batch, RolloutBatch) and len(batch.rollouts) == 8
    assert batch.num_batches == 1 and batch.peak_batch == 8
    for r in batch.rollouts:
        assert isinstance(r, Rollout)
        ref = reference_greedy(model, r.prompt_ids, 16)
        assert r.token_ids == ref, (r.prompt_index, r.sample_index)
        assert r.finish_reason == "length" and len(r.logprobs) == len(r.entropies) == 16
    assert batch.prefill_tokens == sum(lengths)  # each prompt once, not once per sample
    assert batch.decode_tokens == 8 * 16 and batch.tokens_per_sec > 0


def test_eos_and_batch_splitting_match_reference(policy):
    model, tok = policy
    cfg = greedy(group_size=1, max_new_tokens=12)
    refs = [reference_greedy(model, encode_prompt(tok, p, cfg), 12) for p in PROMPTS]
    # a token that some reference completions emit early and others never: their EOS
    counts = {}
    for ref in refs:
        for t in set(ref[:6]):
            counts[t] = counts.get(t, 0) + 1
    eos = min(counts, key=lambda t: (counts[t], t))
    old = tok.eos_token_ids
    tok.eos_token_ids = {eos}
    try:
        # a tiny budget forces one prompt per decode batch
        one_each = greedy(group_size=1, max_new_tokens=12, max_batch_tokens=1)
        batch = generate_rollouts(model, tok, PROMPTS, one_each)
        many = generate_rollouts(model, tok, PROMPTS * 3, greedy(group_size=2, max_new_tokens=12))
    finally:
        tok.eos_token_ids = old
    assert batch.num_batches == len(PROMPTS) and batch.peak_batch == 1
    assert {r.finish_reason for r in batch.rollouts} == {"eos", "length"}
    for r, ref in zip(batch.rollouts, refs):
        want = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert r.token_ids == want
        assert r.finish_reason == ("eos" if eos in ref else "length")
        assert chr(eos) not in r.text  # the EOS token is kept in token_ids, not in the text
    # rows finishing early are dropped mid-decode; the others still match
    for r in many.rollouts:
        ref = refs[r.prompt_index % len(PROMPTS)]
        assert r.token_ids == (ref[: ref.index(eos) + 1] if eos in ref else ref)


def test_logprobs_are_taken_at_the_sampling_temperature(policy):
    """Behaviour log-probs are those of softmax(logits / T), the distribution the tokens came from,
    and sequence_logprobs at the same T (the policy and reference passes) gives the same numbers."""
    model, tok = policy
    mx.random.seed(7)
    T = 0.8
    cfg = RolloutConfig(group_size=3, max_new_tokens=20, temperature=T, top_p=0.9, stop=[])
    batch = generate_rollouts(model, tok, PROMPTS, cfg)
    assert [(r.prompt_index, r.sample_index) for r in batch.rollouts] == [
        (p, g) for p in range(4) for g in range(3)
    ]
    assert len({tuple(r.token_ids) for r in batch.rollouts}) > 4  # sampling, not greedy
    # by hand, from the model's logits: log softmax(logits / T) of each sampled token
    r = batch.rollouts[0]
    logits = model(mx.array([r.prompt_ids + r.token_ids]))[0].astype(mx.float32) / T
    n, p = len(r.token_ids), len(r.prompt_ids)
    by_hand = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[p - 1: p - 1 + n]
    by_hand = np.array(mx.take_along_axis(by_hand, mx.array(r.token_ids)[:, None], axis=-1)[:, 0])
    np.testing.assert_allclose(r.logprobs, by_hand, rtol=1e-4, atol=1e-4)
    at_one = sequence_logprobs(model, [r.prompt_ids], [r.token_ids])[0]
    assert np.abs(np.array(at_one[0, :n]) - by_hand).max() > 1e-2  # T = 1 would be another distribution

    logp, mask, ent = sequence_logprobs(
        model, [r.prompt_ids for r in batch.rollouts], [r.token_ids for r in batch.rollouts],
        with_entropy=True, temperature=T,
    )
    for b, r in enumerate(batch.rollouts):
        n = len(r.token_ids)
        assert mask[b].sum().item() == n
        np.testing.assert_allclose(r.logprobs, np.array(logp[b, :n]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r.entropies, np.array(ent[b, :n]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_sampled_frequencies_match_the_reported_logprobs(temperature):
    """Property: each token is drawn with probability exp(reported log-prob). 20,000 draws from one
    row; each frequency must lie within 5 binomial standard errors (+ 1e-3) of exp(logp)."""
    mx.random.seed(5)
    row = mx.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20_000
    tokens, lp, _ = sample(mx.broadcast_to(row, (n, row.size)), temperature, 1.0)
    freq = np.bincount(np.array(tokens), minlength=row.size) / n
    lp = np.array(lp)
    prob = np.zeros(row.size)
    prob[np.array(tokens)] = np.exp(lp)
    expected = np.exp(np.array(row) / temperature) / np.exp(np.array(row) / temperature).sum()
    np.testing.assert_allclose(prob[freq > 0], expected[freq > 0], rtol=1e-5)
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * se + 1e-3), (freq, expected)


def test_sampling_is_reproducible_with_seed(policy):
    model, tok = policy
    cfg = RolloutConfig(group_size=4, max_new_tokens=10, stop=[])
    mx.random.seed(3)
    a = generate_rollouts(model, tok, PROMPTS[:2], cfg)
    mx.random.seed(3)
    b = generate_rollouts(model, tok, PROMPTS[:2], cfg)
    assert [r.token_ids for r in a.rollouts] == [r.token_ids for r in b.rollouts]
    # the G samples of one prompt differ (they share the prefill, not the randomness)
    assert len({tuple(r.token_ids) for r in a.rollouts[:4]}) > 1


def test_tiny_top_p_is_greedy(policy):
    model, tok = policy
    mx.random.seed(0)
    nucleus = generate_rollouts(
        model, tok, PROMPTS, RolloutConfig(group_size=2, max_new_tokens=10, top_p=1e-6, stop=[])
    )
    argmax = generate_rollouts(model, tok, PROMPTS, greedy(group_size=2, max_new_tokens=10))
    assert [r.token_ids for r in nucleus.rollouts] == [r.token_ids for r in argmax.rollouts]


def test_stop_string_trims_text_tokens_and_logprobs(policy):
    model, tok = policy
    cfg = RolloutConfig(group_size=1, max_new_tokens=40, stop=[])
    mx.random.seed(11)
    full = generate_rollouts(model, tok, PROMPTS[:1], cfg).rollouts[0]
    # stop at the first ASCII byte (after the first two tokens) that has not occurred before
    cut = next(k for k, t in enumerate(full.token_ids)
               if k >= 2 and 32 <= t < 127 and t not in full.token_ids[:k])
    stop = chr(full.token_ids[cut])
    mx.random.seed(11)  # same draws up to the stop
    cfg.stop = [stop, "\x00never"]
    r = generate_rollouts(model, tok, PROMPTS[:1], cfg).rollouts[0]
    assert r.finish_reason == "stop"
    # byte-level tokenizer: one token per byte, so the tokens before the stop and the stop's own remain
    assert r.token_ids == full.token_ids[:cut + 1]
    assert r.logprobs == pytest.approx(full.logprobs[:cut + 1], abs=1e-5) and len(r.entropies) == cut + 1
    assert stop not in r.text and r.text == tok.decode(full.token_ids[:cut])


def _run_seq(pieces, stops, max_new=100):
    table = list(pieces)
    seq = _Seq(0, 0)
    for t in range(len(pieces)):
        seq.add(t, -1.0, 2.0, table, eos=set(), stops=stops, max_stop=max(map(len, stops)), max_new=max_new)
        if seq.reason:
            break
    text = bytes(seq.buf[: seq.cut]) if seq.cut is not None else bytes(seq.buf)
    return seq, text


def test_a_completion_that_compiles_before_a_stop_still_compiles_after_trimming():
    """Llama-3 / Qwen2 style pieces: ")\n" straddles the start of "\ndef ". The scored text keeps
    every byte before the stop; the trained sequence keeps every sampled token through " g", the one
    that completes the stop (it was sampled, and it ends the answer)."""
    pieces = [b"    return", b" sorted", b"(x", b")\n", b"def", b" g", b"():"]
    seq, text = _run_seq(pieces, [b"\ndef "])
    assert seq.reason == "stop" and text == b"    return sorted(x)"
    compile("def f(x):\n" + text.decode(), "<t>", "exec")
    assert seq.keep == 6
    stop_at_start = _Seq(0, 0)  # a stop at byte 0 still leaves the token that spelled it to train
    stop_at_start.add(1, -1.0, 2.0, [b"", b"\ndef f"], set(), [b"\ndef "], 5, 10)
    assert stop_at_start.reason == "stop" and stop_at_start.keep == 1 and stop_at_start.cut == 0


def test_stop_trimming_property_over_random_tokenizations():
    """Property: however a text is cut into tokens, the scored text is exactly the bytes before the
    first stop string (it never contains the stop), the trained tokens run through the one that
    completes the stop (they decode to a text that contains it, and none follows that token), and a
    program that compiles before the stop compiles after trimming."""
    rng = np.random.default_rng(0)
    bodies = [b"    return sorted(x)", b"    y = [i * 2 for i in x]\n    return y", b"    return {'a': (1, 2)}"]
    stops = [b"\ndef ", b"\nclass ", b"\n#"]
    for trial in range(300):
        body = bodies[trial % len(bodies)]
        stop = stops[trial % len(stops)]
        full = body + stop + b"junk(): pass\n"
        cuts = sorted(set(rng.integers(1, len(full), size=rng.integers(1, 12)).tolist()))
        pieces = [full[i:j] for i, j in zip([0] + cuts, cuts + [len(full)])]
        seq, text = _run_seq(pieces, stops)
        assert seq.reason == "stop" and text == body, (pieces, text)
        compile("def f(x):\n" + text.decode(), "<t>", "exec")
        trained = b"".join(pieces[: seq.keep])
        assert stop in trained and stop not in text, (pieces, seq.keep)
        assert stop not in b"".join(pieces[: seq.keep - 1])  # the last kept token completes it


def test_stop_after_code_ends_at_the_closing_fence_over_random_tokenizations():
    """Property: with rollout.stop_after_code, however the answer is cut into tokens, the scored text
    ends exactly after the first block's closing fence, the code extracted from it is the code of the
    answer's first block, and the kept tokens run through the one where the closed block is seen."""
    rng = np.random.default_rng(1)
    blocks = [b"```python\ndef f(x):\n    return x\n```", b"```\nprint(1)\n```", b"```py\n```"]
    bodies = ["def f(x):\n    return x\n", "print(1)\n", ""]
    heads = [b"", b"Here it is:\n", b"Use `x` here:\n"]
    tails = [b"\n\nThis sorts the list.", b"\n```python\nf(2)\n```\n", b"\nDone."]
    for trial in range(300):
        answer = heads[trial % 3] + blocks[(trial // 3) % 3]
        full = answer + tails[(trial // 9) % 3]
        assert closed_block_end(full) == len(answer)
        cuts = sorted(set(rng.integers(1, len(full), size=rng.integers(1, 15)).tolist()))
        pieces = [full[i:j] for i, j in zip([0] + cuts, cuts + [len(full)])]
        seq = _Seq(0, 0)
        seq.fence = True
        for t in range(len(pieces)):
            seq.add(t, -1.0, 2.0, pieces, eos=set(), stops=[], max_stop=1, max_new=100)
            if seq.reason:
                break
        assert seq.reason == "stop" and bytes(seq.buf[: seq.cut]) == answer, pieces
        assert extract_code(answer.decode()) == bodies[(trial // 3) % 3]  # the first block, whatever follows
        trained = b"".join(pieces[: seq.keep])
        assert trained.startswith(answer) and closed_block_end(trained) == len(answer)
        assert closed_block_end(b"".join(pieces[: seq.keep - 1])) is None
    assert closed_block_end(b"```python\ndef f():") is None and closed_block_end(b"no code") is None
    assert closed_block_end(b"x = '```'\n") is None  # an open fence alone closes nothing


def test_default_stops_and_length(policy):
    model, tok = policy
    assert RolloutConfig().stops() == DEFAULT_STOPS
    assert RolloutConfig(chat_template=True).stops() == ()
    batch = generate_rollouts(model, tok, PROMPTS[:2], RolloutConfig(group_size=3, max_new_tokens=5))
    for r in batch.rollouts:
        assert r.finish_reason in ("stop", "eos", "length")
        if r.finish_reason == "length":
            assert len(r.token_ids) == 5
        assert not any(s in r.text for s in DEFAULT_STOPS)


def test_chat_template_and_extract_code(policy):
    model, tok = policy
    cfg = RolloutConfig(group_size=2, max_new_tokens=6, chat_template=True, system_prompt="Be brief.",
                        extract_code=True)
    ids = encode_prompt(tok, "Write f.", cfg)
    assert tok.decode(ids) == "<|system|>\nBe brief.<|eos|>\n<|user|>\nWrite f.<|eos|>\n<|assistant|>\n"
    batch = generate_rollouts(model, tok, ["Write f."], cfg)
    assert all(r.prompt_ids == ids for r in batch.rollouts)
    assert all(r.completion == extract_code(r.text) for r in batch.rollouts)


def test_user_template_wraps_the_prompt_literally(policy):
    _, tok = policy
    stub = "def f(d):\n    return {1: '{prompt}'}\n"
    cfg = RolloutConfig(chat_template=True, user_template="Complete this Python function:\n```python\n{prompt}```")
    text = tok.decode(encode_prompt(tok, stub, cfg))
    assert "<|user|>\nComplete this Python function:\n```python\n" + stub + "```<|eos|>" in text
    plain = RolloutConfig(user_template="# task\n{prompt}")
    assert tok.decode(encode_prompt(tok, stub, plain)).endswith("# task\n" + stub)
    with pytest.raises(UserError, match="rollout.user_template"):
        RolloutConfig(user_template="no placeholder")


def test_extract_code():
    text = "Sure!\n```python\ndef f(x):\n    return x\n```\nMore:\n```\nprint(1)\n```"
    assert extract_code(text) == "def f(x):\n    return x\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 1\n") == "x = 1\n"  # cut off by max_new_tokens
    assert extract_code("    return a + b\n") == "    return a + b\n"


def test_token_bytes_agree_with_tokenizer_decode(policy):
    _, tok = policy
    table = token_bytes(tok)
    s = "déjà vu\n\t{x: 1}"
    ids = tok.encode(s, add_special_tokens=False)
    assert b"".join(table[i] for i in ids).decode() == tok.decode(ids) == s


def test_sampler_frequencies_top_p_and_masked_logits():
    probs = mx.array([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = mx.broadcast_to(mx.log(probs), (20000, 5))
    mx.random.seed(0)
    tokens, lp, ent = sample(logits, 1.0, 1.0)
    freq = np.bincount(np.array(tokens), minlength=5) / 20000
    np.testing.assert_allclose(freq, np.array(probs), atol=0.015)
    assert np.isfinite(np.array(ent)).all()
    np.testing.assert_allclose(np.array(lp), np.log(np.array(probs)[np.array(tokens)]), atol=1e-5)
    # top_p 0.7: only the two most likely tokens (mass 0.5 < 0.7 <= 0.75)
    tokens, _, _ = sample(logits, 1.0, 0.7)
    assert set(np.array(tokens).tolist()) == {0, 1}
    # large vocabularies search the nucleus among the top candidates: a tiny nucleus is argmax
    big = mx.random.normal((6, 5000))
    tokens, _, _ = sample(big, 1.0, 1e-6)
    assert mx.array_equal(tokens, mx.argmax(big, axis=-1))
    tokens, _, _ = sample(big, 0.7, 0.95)
    assert tokens.shape == (6,) and (tokens < 5000).all().item()


def test_bad_config_is_user_error(policy):
    model, tok = policy
    for bad in (dict(group_size=0), dict(top_p=0.0), dict(temperature=-1), dict(max_new_tokens=0)):
        with pytest.raises(UserError, match="rollout."):
            generate_rollouts(model, tok, ["x"], RolloutConfig(**bad))


def test_training_mode_restored(policy):
    model, tok = policy
    model.train()
    generate_rollouts(model, tok, ["x"], greedy(group_size=1, max_new_tokens=2))
    assert model.training
    model.eval()


SMOLLM2 = find_smollm2_gguf()


@pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 GGUF not found (set MLX_COACH_SMOLLM2_GGUF)")
def test_smollm2_chat_rollouts_write_code_and_logprobs_agree(tmp_path):
    model, tok, _ = load_policy(str(SMOLLM2), cache_dir=tmp_path)
    mx.random.seed(0)
    cfg = RolloutConfig(group_size=2, max_new_tokens=48, temperature=0.7, top_p=0.95,
                        chat_template=True, extract_code=True)
    batch = generate_rollouts(model, tok, ["Write a Python function add(a, b) that returns a + b."], cfg)
    assert batch.prefill_tokens == len(batch.rollouts[0].prompt_ids)
    assert any("a + b" in r.completion for r in batch.rollouts)
    for r in batch.rollouts:
        assert r.finish_reason in ("eos", "length")
        assert r.completion == extract_code(r.text) and "```" not in r.completion
        if r.finish_reason == "eos":
            assert r.token_ids[-1] == 2 and "<|im_end|>" not in r.text
    logp, mask, ent = sequence_logprobs(
        model, [r.prompt_ids for r in batch.rollouts], [r.token_ids for r in batch.rollouts],
        with_entropy=True, temperature=0.7,
    )
    for b, r in enumerate(batch.rollouts):
        n = len(r.token_ids)
        np.testing.assert_allclose(r.logprobs, np.array(logp[b, :n]), atol=2e-4)
        np.testing.assert_allclose(r.entropies, np.array(ent[b, :n]), atol=2e-3)


def test_bucketing_changes_shapes_not_results(policy):
    """Prompt lengths padded to multiples of 32 and a decode batch that shrinks only to powers of two: greedy samples,
    their log-probs and the scored text are those of exact shapes; fewer distinct shapes are asked for."""
    model, tok = policy
    free = generate_rollouts(model, tok, PROMPTS, greedy(group_size=1, max_new_tokens=24)).rollouts
    # EOS tokens that all but the last completion emit early and the last never: most rows finish within
    # a few steps, the rest run to the length limit, so the batch shrinks
    eos = {t for r in free[:-1] for t in r.token_ids[:3]} - set(free[-1].token_ids)
    old, tok.eos_token_ids = tok.eos_token_ids, eos
    runs = {}
    try:
        for bucket in (0, 32):
            runs[bucket] = generate_rollouts(model, tok, PROMPTS * 2, greedy(group_size=3, max_new_tokens=24,
                                                                             bucket=bucket))
    finally:
        tok.eos_token_ids = old
    exact, bucketed = runs[0], runs[32]
    assert len({r.finish_reason for r in exact.rollouts}) > 1  # rows finish at different steps
    assert [r.token_ids for r in bucketed.rollouts] == [r.token_ids for r in exact.rollouts]
    assert [r.text for r in bucketed.rollouts] == [r.text for r in exact.rollouts]
    for a, b in zip(exact.rollouts, bucketed.rollouts):
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=1e-4, atol=1e-4)
    start_rows = len(bucketed.rollouts)
    shrunk = {rows for rows, tokens in bucketed.shapes if tokens == 1} - {start_rows}
    assert shrunk and all(rows & (rows - 1) == 0 for rows in shrunk), shrunk  # shrinks to powers of two
    assert len(bucketed.shapes) <= len(exact.shapes)
    assert bucketed.padding_tokens > exact.padding_tokens > 0  # the cost: more padded positions computed
    one = generate_rollouts(model, tok, PROMPTS[:1], greedy(group_size=2, max_new_tokens=4, bucket=0))
    assert one.padding_tokens == 0  # one prompt, nothing finished early: no padding at all


def test_sequence_logprobs_padding_is_masked_exactly(policy):
    model, tok = policy
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 17, 40)]
    comps = [rng.integers(0, 256, n).tolist() for n in (9, 3, 20)]
    exact = sequence_logprobs(model, prompts, comps, with_entropy=True, temperature=0.7)
    padded = sequence_logprobs(model, prompts, comps, with_entropy=True, temperature=0.7, bucket=32)
    for a, b in zip(exact, padded):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-5)


def test_continuous_batching_refills_rows_and_keeps_every_sample(policy):
    """With more prompts than max_batch_tokens lets decode together, rollout.continuous admits waiting prompts
    into the rows that finished sequences free (their cache rows appended to the running batch): every
    greedy sample still equals the uncached reference decode, the batch never holds more rows than the
    budget allows, and the same tokens take fewer decode forwards than batch-after-batch decoding."""
    model, tok = policy
    M = 16
    prompts = [f"def f{i:02d}(a, b):\n" for i in range(12)]
    cfg0 = greedy(group_size=2, max_new_tokens=M)
    refs = {p: reference_greedy(model, encode_prompt(tok, p, cfg0), M) for p in prompts}
    # EOS tokens that every other prompt's completion may emit early and the rest never: those rows finish
    # while the others run on to the length limit
    early = {t for p in prompts[::2] for t in refs[p][:4]} - {t for p in prompts[1::2] for t in refs[p]}
    assert early
    longest = max(len(encode_prompt(tok, p, cfg0)) for p in prompts)
    budget = 6 * (longest + 2 * M)  # room for 6 rows at the start: 3 prompts x 2 samples
    runs = {}
    old, tok.eos_token_ids = tok.eos_token_ids, early
    try:
        for continuous in (False, True):
            runs[continuous] = generate_rollouts(model, tok, prompts, greedy(
                group_size=2, max_new_tokens=M, max_batch_tokens=budget, continuous=continuous))
        # finished rows kept as padding up to a power of two (rollout.bucket) stay within the budget too: room for
        # 7 rows, where 6 live rows would pad to 8
        bucketed = generate_rollouts(model, tok, prompts, greedy(
            group_size=2, max_new_tokens=M, max_batch_tokens=7 * (longest + M), bucket=32))
    finally:
        tok.eos_token_ids = old

    def want(prompt):
        ref = refs[prompt]
        hit = [k for k, t in enumerate(ref) if t in early]
        return ref[: hit[0] + 1] if hit else ref

    for run in runs.values():
        assert [(r.prompt_index, r.sample_index) for r in run.rollouts] == [(p, g) for p in range(12) for g in range(2)]
        for r in run.rollouts:
            assert r.token_ids == want(prompts[r.prompt_index]), (r.prompt_index, r.sample_index)
        assert run.peak_batch * (longest + M) <= budget
        # the cache a forward attends over: rows x positions, at most max_new_tokens wider when refilled
        assert run.peak_cache_tokens <= run.peak_batch * (longest + (2 if run.refills else 1) * M)
    assert bucketed.refills > 0 and bucketed.peak_batch * (longest + M) <= 7 * (longest + M)
    assert [r.token_ids for r in bucketed.rollouts] == [r.token_ids for r in runs[True].rollouts]
    off, on = runs[False], runs[True]
    assert off.refills == 0 and on.refills > 0
    assert on.num_batches < off.num_batches
    assert on.decode_tokens == off.decode_tokens
    assert on.decode_steps < off.decode_steps  # fuller batches: the same tokens in fewer forwards


def test_continuous_batching_logprobs_match_the_sequence_pass(policy):
    """Rows that join a running batch sit behind the cache's left padding; their sampled log-probs and
    entropies must still be those of the plain forward pass over prompt + completion."""
    model, tok = policy
    mx.random.seed(3)
    T = 0.9
    prompts = [f"def g{i:02d}(x):\n" for i in range(8)]
    longest = max(len(encode_prompt(tok, p, RolloutConfig())) for p in prompts)
    cfg = RolloutConfig(group_size=2, max_new_tokens=12, temperature=T, stop=[],
                        max_batch_tokens=4 * (longest + 24))
    old, tok.eos_token_ids = tok.eos_token_ids, set(range(0, 262, 4))  # rows end after a few tokens, at random
    try:
        batch = generate_rollouts(model, tok, prompts, cfg)
    finally:
        tok.eos_token_ids = old
    assert batch.refills > 0 and len(batch.rollouts) == 16
    assert len({len(r.token_ids) for r in batch.rollouts}) > 2
    logp, mask, ent = sequence_logprobs(model, [r.prompt_ids for r in batch.rollouts],
                                        [r.token_ids for r in batch.rollouts], with_entropy=True, temperature=T)
    for b, r in enumerate(batch.rollouts):
        n = len(r.token_ids)
        np.testing.assert_allclose(r.logprobs, np.array(logp[b, :n]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r.entropies, np.array(ent[b, :n]), rtol=1e-4, atol=1e-4)

