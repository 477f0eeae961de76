"""KL control: the coefficient beta of the KL penalty, fixed or steered to a target KL."""

from dataclasses import asdict, dataclass


@dataclass
class FixedKLController:
    beta: float

    def update(self, observed_kl, n_steps=1):
        return self.beta

    def state_dict(self):
        return {"kind": "fixed", "beta": self.beta}

    @classmethod
    def from_state(cls, d):
        return cls(beta=float(d["beta"]))


@dataclass
class AdaptiveKLController:
    """Proportional controller of Ziegler et al. (2019) that steers the observed KL to ``target``.

    beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * min(n_steps / horizon, 1). Call it once per training step
    with n_steps = the samples in that step (as TRL and OpenRLHF do), so ``horizon`` is in samples: at
    the default 256 and 16 samples a step, a KL far above target raises beta by 1.25% a step (x1.28
    in 20 steps)."""

    beta: float
    target: float
    horizon: int = 256

    def __post_init__(self):
        if self.beta < 0 or self.target <= 0 or self.horizon <= 0:
            raise ValueError(
                f"adaptive KL needs beta >= 0, target > 0, horizon > 0; got {self.beta}, "
                f"{self.target}, {self.horizon}"
            )

    def update(self, observed_kl, n_steps=1):
        kl = float(observed_kl)
        if kl != kl or kl in (float("inf"), float("-inf")):
            return self.beta  # a non-finite KL must not poison beta; the trainer skips that step
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * min(n_steps / self.horizon, 1.0)  # at most +-20% a call: beta stays > 0
        return self.beta

    def state_dict(self):
        return {"kind": "adaptive", **asdict(self)}

    @classmethod
    def from_state(cls, d):
        return cls(beta=float(d["beta"]), target=float(d["target"]), horizon=d["horizon"])


def make_kl_controller(beta, target=None, horizon=256):
    """Adaptive controller when a KL target is given, else a fixed beta."""
    if target is None:
        return FixedKLController(beta)
    return AdaptiveKLController(beta, target, horizon)


def kl_controller_from_state(d):
    """Rebuild whichever controller wrote ``d`` (its state_dict)."""
    cls = AdaptiveKLController if d.get("kind") == "adaptive" else FixedKLController
    return cls.from_state(d)
