"""Generation and log-probabilities: what the policy does with tokens.

`rollout` (batched KV-cached sampling with shared prefill, continuous batching, stop strings, code
extraction; `RolloutConfig`), `logprobs` (`sequence_logprobs`, the shared-prompt layout), `generate`
(sample a task set and score it: validation and `mlx-coach eval`). May import: core, runtime,
telemetry, models.
"""
