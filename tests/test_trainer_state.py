"""TrainerState: one field list decides what state.json holds and what a resume restores."""

import dataclasses
import json
from dataclasses import dataclass, field

from test_trainer import tiny_cfg

from mlx_coach.rl import trainer as trainer_module
from mlx_coach.rl.kl_control import AdaptiveKLController, FixedKLController
from mlx_coach.rl.state import TrainerState
from mlx_coach.rl.trainer import Trainer


def test_every_field_round_trips_through_json_objects_included():
    state = TrainerState(kl_controller=AdaptiveKLController(beta=0.05, target=0.1, horizon=64))
    state.step, state.epoch, state.pos, state.baseline = 7, 1, 12, 0.25
    state.first_epoch_fresh, state.lr_scale, state.toks_first = [0.5, 1.0], 0.5, [100.0]
    state.reward_ema.update(0.3)
    state.loss_ema.update(-1.0)
    state.difficulty.observe(["a", "a", "b"], [True, False, True], ["fresh"] * 3)
    state.phases.add("early", {"tokens_per_sec": 5.0, "hits": 1, "misses": 2, "cache_share": 0.1,
                               "fresh_reward_mean": 0.2, "fresh_count": 3})
    saved = json.loads(json.dumps(state.state_dict()))
    assert set(saved) == {f.name for f in dataclasses.fields(TrainerState)}

    restored = TrainerState(kl_controller=FixedKLController(0.0))
    restored.load(saved)
    assert restored.state_dict() == state.state_dict()
    assert isinstance(restored.kl_controller, AdaptiveKLController)  # the saved state decides the class


def test_a_field_absent_from_an_older_checkpoint_keeps_its_default():
    saved = TrainerState(kl_controller=FixedKLController(0.1)).state_dict()
    saved["step"] = 3
    del saved["difficulty"]
    restored = TrainerState(kl_controller=FixedKLController(0.1))
    restored.load(saved)
    assert restored.step == 3 and restored.difficulty.state_dict() == TrainerState().difficulty.state_dict()


def test_a_field_added_to_trainer_state_round_trips_through_a_checkpoint(tmp_path, monkeypatch):
    @dataclass
    class Extended(TrainerState):
        visits: list = field(default_factory=list)

    monkeypatch.setattr(trainer_module, "TrainerState", Extended)
    cfg = tiny_cfg(tmp_path, train={"steps": 1})
    run = tmp_path / "run"
    trainer = Trainer(cfg, run)
    try:
        trainer.run_step()
        trainer.state.visits = [3, 1, 4]
        trainer.save()
    finally:
        trainer.close()
    assert json.loads((run / "checkpoints/step-1/state.json").read_text())["visits"] == [3, 1, 4]
    resumed = Trainer(cfg, run, resume=True)
    try:
        assert resumed.state.visits == [3, 1, 4] and resumed.state.step == 1
    finally:
        resumed.close()
