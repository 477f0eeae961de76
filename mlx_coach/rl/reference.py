"""The reference pass and the KL a step observes: `ReferencePass`, mixed into `Trainer`.

The reference log-probs are taken at the sampling temperature, as the behaviour log-probs are, so that
KL(behaviour || reference) compares two distributions over the same sampled tokens."""

import mlx.core as mx
import numpy as np

from mlx_coach.engine.logprobs import logprobs_from_inputs
from mlx_coach.models.lora import adapters_disabled
from mlx_coach.rl import objective
from mlx_coach.rl.batch import fit_width, judged_rows, pad_rows, token_mask
from mlx_coach.rl.update import on_cadence


class ReferencePass:
    """Mixed into `Trainer`: reads its model, reference copy, updater, config, state and world."""

    def reference_logprobs(self, prompt_ids, completion_ids, forwards=None):
        """Reference log-probs [B, T] at the sampling temperature, one micro-batch at a time
        (optim.grad_accum), so the pass needs no more memory than one micro-batch's forward. With
        optim.share_prompts each group's prompt is computed once for its G samples. LoRA: the base
        layers alone (the adapters are taken out, not computed at scale 0)."""
        width = max(1, max(len(c) for c in completion_ids))
        parts = []
        for _, x in forwards or self.updater.forwards(prompt_ids, completion_ids):
            if self.ref_model is not None:
                logp, _, _ = logprobs_from_inputs(self.ref_model, x, temperature=self.temperature)
            else:
                with adapters_disabled(self.model):
                    logp, _, _ = logprobs_from_inputs(self.model, x, temperature=self.temperature)
            logp = fit_width(logp, width)
            mx.eval(logp)
            parts.append(logp)
        return mx.stop_gradient(mx.concatenate(parts, axis=0))

    def reference_needed(self, step):
        """Whether step (1-based) runs the reference pass: always while the loss, the reward or the KL
        controller reads it (beta > 0, or a kl_target); otherwise only to show drift on the dashboard, at
        step 1 and every algo.kl_observe_every-th step."""
        algo = self.cfg.algo
        if self.state.kl_controller.beta > 0 or algo.kl_target is not None:
            return True
        return on_cadence(step, algo.kl_observe_every)

    def observe_kl(self, batch):
        """Behaviour log-probs, the loss mask, and KL(behaviour || reference) over every sampled token
        (None, None on a step without the reference pass).

        A sample the scorers could not judge (`rl.batch.UNJUDGED` provenances) has no trained token."""
        algo = self.cfg.algo
        width = max(1, max(len(c) for c in batch.completion_ids))
        batch.behaviour_logp = pad_rows([r.logprobs for r in batch.rollouts], width)
        batch.truncated = [r.finish_reason == "length" for r in batch.rollouts]
        batch.token_mask = token_mask(batch.completion_ids, width)
        judged = judged_rows(batch.scores)
        dropped = np.array(batch.truncated, dtype=np.float32) if algo.mask_truncated else 0.0
        batch.loss_mask = batch.token_mask * (judged * (1.0 - dropped))[:, None]
        batch.beta = self.state.kl_controller.beta
        if batch.reference_logp is None:
            batch.kl_observed = batch.kl_max = None
            return
        batch.kl_observed, batch.kl_max = objective.observed_kl(
            batch.behaviour_logp, batch.reference_logp, mx.array(batch.token_mask), algo.kl_estimator,
            world=self.world if self.world.size > 1 else None)
