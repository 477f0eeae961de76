"""The local-teacher scorer: a completion's mean per-token log-probability under a second MLX model."""

from __future__ import annotations

import time

from mlx_coach.core.errors import UserError
from mlx_coach.rewards.scoring.base import Score, is_number


class LocalTeacher:
    """Scores a completion by its mean per-token log-probability under a teacher model given
    the prompt, mapped to [0, 1] by clip((mean_logp - low) / (high - low), 0, 1).

    The teacher tokenizes prompt and prompt + completion with its own tokenizer; the completion's
    tokens are those after the two token sequences' common prefix. Items are sorted by length and
    scored `batch_size` at a time, one padded forward pass per batch.
    """

    name = "local-teacher"

    def __init__(self, model, tokenizer, *, model_id: str = "model", low: float = -6.0, high: float = 0.0,
                 batch_size: int = 8, max_tokens: int = 4096):
        if not (is_number(low) and is_number(high) and low < high):
            raise UserError(f"config key 'teacher.low' must be < 'teacher.high'; got low={low!r}, high={high!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"config key 'teacher.batch_size' must be an integer >= 1; got {batch_size!r}")
        self.model, self.tokenizer = model, tokenizer
        self.low, self.high, self.batch_size, self.max_tokens = float(low), float(high), batch_size, max_tokens
        self.version = f"logp-v1:{model_id}:{self.low:g}:{self.high:g}"

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> "LocalTeacher":
        from mlx_coach.models.loader import load_policy

        model, tokenizer, _ = load_policy(spec)
        model.eval()
        return cls(model, tokenizer, model_id=spec, **kwargs)

    def split(self, task, completion) -> tuple[list, list]:
        """(prompt ids, completion ids) from the teacher's tokenization of prompt + completion."""
        p = list(self.tokenizer.encode(task.prompt))
        full = list(self.tokenizer.encode(task.prompt + completion))[: self.max_tokens]
        n = 0
        while n < min(len(p), len(full)) and p[n] == full[n]:
            n += 1
        n = max(n, 1)  # the first token has no prediction
        return full[:n], full[n:]

    def mean_logprobs(self, items) -> list:
        """Mean log-prob per completion token for each (task, completion); None when empty."""
        import mlx.core as mx

        from mlx_coach.engine.logprobs import sequence_logprobs

        pairs = [self.split(t, c) for t, c in items]
        out = [None] * len(pairs)
        order = sorted((i for i, (_, c) in enumerate(pairs) if c), key=lambda i: sum(map(len, pairs[i])))
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            logp, mask, _ = sequence_logprobs(self.model, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
            mean = logp.sum(axis=1) / mask.sum(axis=1)
            mx.eval(mean)
            for i, v in zip(idx, mean.tolist()):
                out[i] = v
        return out

    def score_batch(self, items) -> list[Score]:
        items = list(items)
        t0 = time.perf_counter()
        means = self.mean_logprobs(items)
        per_item = (time.perf_counter() - t0) / max(1, len(items))
        out = []
        for m in means:
            if m is None:
                out.append(Score(0.0, "ok", per_item, "empty completion"))
            else:
                out.append(Score(min(1.0, max(0.0, (m - self.low) / (self.high - self.low))), "ok", per_item))
        return out
