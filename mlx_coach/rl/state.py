"""`TrainerState`: everything a checkpoint restores besides weights, optimizer and score cache.

Its dataclass fields are the one list of what `state.json` holds: `state_dict()` writes each field
(an object through its own `state_dict()`), `load()` reads each back (an object through its `load()`,
or through the field's `restore` metadata when the saved state decides the class). A field added
here round-trips through checkpoints with no other change.
"""

import dataclasses
from dataclasses import dataclass, field

from mlx_coach.rl.dynamic_sampling import DifficultyTracker
from mlx_coach.rl.kl_control import kl_controller_from_state
from mlx_coach.telemetry.alerts import AlertState
from mlx_coach.telemetry.accumulators import Ema, PhaseAccumulator


@dataclass
class TrainerState:
    step: int = 0  # steps done
    epoch: int = 0
    pos: int = 0  # position in the epoch's task order
    baseline: float = None  # REINFORCE's moving reward baseline
    kl_controller: object = field(default=None, metadata={"restore": kl_controller_from_state})
    skipped_steps: int = 0  # steps with a non-finite loss or gradient
    first_epoch_fresh: list = field(default_factory=list)  # fresh rewards of epoch 0
    baseline_reward: float = None  # their mean: reward/gain_from_baseline subtracts it
    reward_ema: Ema = field(default_factory=lambda: Ema(0.1))
    loss_ema: Ema = field(default_factory=lambda: Ema(0.1))
    alerts: AlertState = field(default_factory=AlertState)
    phases: PhaseAccumulator = field(default_factory=PhaseAccumulator)  # this epoch's metrics by phase
    lr_scale: float = 1.0  # health adjustments (alerts.lr_adjust) multiply the learning rate
    toks_first: list = field(default_factory=list)  # tok/s of the first steps: gen/tokens_per_sec_rel's base
    difficulty: DifficultyTracker = field(default_factory=DifficultyTracker)  # pass rate per task

    def state_dict(self):
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.state_dict() if hasattr(value, "state_dict") else value
        return out

    def load(self, saved):
        """Fields absent from `saved` (a checkpoint older than the field) keep their defaults."""
        for f in dataclasses.fields(self):
            if f.name not in saved:
                continue
            current = getattr(self, f.name)
            if "restore" in f.metadata:
                setattr(self, f.name, f.metadata["restore"](saved[f.name]))
            elif hasattr(current, "load"):
                current.load(saved[f.name])
            else:
                setattr(self, f.name, saved[f.name])
