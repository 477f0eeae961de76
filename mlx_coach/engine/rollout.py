"""Rollouts: the `rollout:` config, the records of sampled completions, and `generate_rollouts`, which samples
G completions per prompt (batched decoding in `decoding`) and turns them into what is trained on and scored.

What a Rollout holds:
- token_ids: the sampled ids (never re-tokenized). A finishing EOS token is included, and so are
  the tokens that spell a stop string (through the one that completes it) or close the code block
  of rollout.stop_after_code: they were sampled and end the answer, so they are trained on.
- text: the completion's bytes cut exactly where the stop string starts (EOS excluded), so it
  never contains the stop string and never loses a byte before it: this is what gets scored.
- logprobs / entropies: per kept token, under softmax(logits / temperature) before top-k, min-p and
  top-p (see `sampling.sample`): the numbers `logprobs.sequence_logprobs` computes at the same
  temperature, so they serve as old_logp in PPO ratios. Those filters sample from the renormalised kept
  tokens, so a token's actual sampling probability is the reported one divided by the kept mass; the
  ratio ignores that factor.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import mlx.core as mx

from mlx_coach.core.errors import UserError
from mlx_coach.core.settings import check_fields, setting
from mlx_coach.engine.decoding import decode_groups
from mlx_coach.engine.sampling import SampleKeys
from mlx_coach.engine.text import encode_prompt, extract_code, token_bytes

DEFAULT_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


@dataclass
class RolloutConfig:
    """The `rollout:` config section: what each training step samples and how."""

    group_size: int = setting(4, lo=1, help="samples per prompt")
    prompts_per_step: int = setting(4, lo=1, help="prompts the trainer draws per step (the engine samples what it is given)")
    max_new_tokens: int = setting(64, lo=1)
    temperature: float = setting(1.0, lo=0.0, help="0: greedy (argmax)")
    top_p: float = setting(1.0, lo=0.0, hi=1.0, lo_open=True)
    top_k: int = setting(0, lo=0, help="sample from the k most likely tokens only; 0 = off")
    min_p: float = setting(0.0, lo=0.0, hi=1.0, help="sample only tokens at least min_p x the most likely one's "
                                                     "probability; 0 = off")
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


def _rollout(s, prompt_ids, cfg):
    """A finished sequence (a `decoding._Seq`) as the Rollout that is trained on and scored."""
    k = s.keep
    text_end = s.cut if s.cut is not None else (s.ends[k - 1] if k else 0)
    text = bytes(s.buf[:text_end]).decode("utf-8", errors="replace")
    return Rollout(prompt_index=s.prompt, sample_index=s.sample, prompt_ids=prompt_ids, token_ids=s.tokens[:k],
                   logprobs=s.logprobs[:k], entropies=s.entropies[:k], text=text,
                   completion=extract_code(text) if cfg.extract_code else text, finish_reason=s.reason)


def generate_rollouts(model, tokenizer, prompts: Sequence[str], cfg: Optional[RolloutConfig] = None,
                      on_batch=None, keys: Optional[SampleKeys] = None):
    """Sample cfg.group_size completions for each prompt. Returns a RolloutBatch whose
    rollouts are ordered by (prompt_index, sample_index). Each sample draws from its own key
    (`SampleKeys`: prompt index, sample index), so batching changes no sample; without `keys`, their
    seed is drawn once from MLX's global generator (mx.random.seed makes that reproducible).
    `on_batch(n)` is called whenever n more prompts have all their G samples finished (progress bars)."""
    cfg = cfg or RolloutConfig()
    if keys is None and cfg.temperature > 0:
        keys = SampleKeys(seed=mx.random.randint(0, 2**31 - 1).item())
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
        seqs = decode_groups(model, prompt_ids, cfg, table, eos, stops, stats,
                             keys=keys if cfg.temperature > 0 else None, on_prompts=on_batch)
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
