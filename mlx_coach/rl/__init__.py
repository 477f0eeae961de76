"""The RL loop: the trainer and its step, the step's batch, the objective, the update, the state.

`trainer` (`Trainer`, `run_step`: one call per phase), `batch` (`StepBatch`), `objective` (advantages,
KL estimators, the policy loss, aggregation and its normaliser), `kl_control` (fixed or adaptive beta),
`update` (optimizer steps from weighted micro-batches), `step_metrics` (a step's metrics, a pure
function), `after_step` (run metrics, alerts, logging, the epoch's end), `state` (`TrainerState`, what
state.json holds), `dynamic_sampling` (informative groups, difficulty tracking), `setup` (tasks,
optimizer, seeded orders), `loop` (`train()` and `mlx-coach train`). May import every floor below;
nothing but `commands` and `cli` imports it.
"""
