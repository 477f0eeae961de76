"""Generation and log-probabilities: what the policy does with tokens.

`rollout` (`RolloutConfig`, the Rollout records, `generate_rollouts`), `decoding` (batched KV-cached decoding
with a shared prefill per prompt and continuous batching), `sampling` (temperature, top-p, behaviour log-probs),
`text` (token bytes, code fences, code extraction, prompt encoding and chat template), `buckets` (shape
rounding for rollout.bucket), `logprobs` (`sequence_logprobs`, the shared-prompt layout), `generate` (sample a
task set and score it: validation and `mlx-coach eval`). May import: core, runtime, telemetry, models.
"""
