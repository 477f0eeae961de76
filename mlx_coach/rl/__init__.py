"""The RL loop: the trainer, the step's batch, the objective, the update, dynamic sampling, state.

`trainer` (the loop and `train()`), `objective` (advantages, KL estimators and control, the policy
loss), `update` (one optimizer update from micro-batches), `dynamic_sampling` (informative groups,
difficulty tracking). May import every floor below; nothing but `commands` and `cli` imports it.
"""
