"""What the alert rules (alert_rules.py) are configured with, what they emit and what they carry.

`AlertConfig` is the `alerts:` config section; an `Alert` is one finding with the action to take;
`AlertState` is everything the rules remember between steps and epochs (saved in checkpoints through
`state_dict` / `load`, so a resumed run keeps its EMAs, best values and cooldowns).
"""

from dataclasses import asdict, dataclass, field

from mlx_coach.core.settings import check_fields, setting

LEVELS = ("info", "warning", "critical")


@dataclass
class Alert:
    level: str
    code: str
    message: str
    action: str


@dataclass
class AlertConfig:
    """The `alerts:` config section. Epoch phases come from the trainer (telemetry.phase_bounds)."""

    enabled: bool = setting(True, help="evaluate the rules and write alerts (console, alerts.jsonl, TensorBoard)")
    kl_max: float = setting(1.0, lo=0.0, lo_open=True, help="kl/mean above this fires kl_high")
    reward_collapse_drop: float = setting(0.5, lo=0.0, hi=1.0, lo_open=True, help="fraction of the best reward EMA lost")
    noise_k: float = setting(5.0, lo=0.0, help="reward_collapse needs a drop beyond this many standard errors (from "
                                               "the sample counts); 0 = judge the reward as exact")
    val_noise_k: float = setting(3.0, lo=0.0, help="val_regression needs a fall beyond this many standard errors "
                                                   "(from eval/count); 0 = judge the values as exact")
    plateau_epochs: int = setting(3, lo=1, help="K epochs without a new best validation value")
    zero_std_max: float = setting(0.8, lo=0.0, hi=1.0, lo_open=True, help="recent mean share of zero-std groups")
    memory_growth_frac: float = setting(0.2, lo=0.0, lo_open=True, help="epoch-mean active memory above the lowest epoch by this, still rising")
    toks_drop_frac: float = setting(0.3, lo=0.0, hi=1.0, lo_open=True, help="recent tok/s below the epoch's early-phase mean by this")
    lr_adjust: bool = setting(False, help="lower the learning rate when the loss is volatile")
    lr_adjust_factor: float = setting(0.5, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    cooldown_steps: int = setting(50, lo=0, help="steps before the same alert code may fire again")
    warmup_steps: int = setting(10, lo=0, help="steps before the reward and volatility rules may fire")
    window: int = setting(5, lo=1, help="recent steps averaged by the tok/s and zero-std rules")
    ema_alpha: float = setting(0.1, lo=0.0, hi=1.0, lo_open=True, help="for the reward EMA and the loss-volatility EMAs")
    volatility_max: float = setting(0.5, lo=0.0, lo_open=True, help="EMA|loss - EMA(loss)| / EMA|loss| above this lowers the LR")
    trend_min_delta: float = setting(0.0, lo=0.0, help="validation changes smaller than this count as flat")
    val_metric: str = setting("eval/pass@1", help="the epoch metric whose trend is tracked")
    val_higher_is_better: bool = setting(True)

    def __post_init__(self):
        check_fields(self, "alerts")


@dataclass
class AlertState:
    steps_seen: int = 0
    last_fired: dict = field(default_factory=dict)  # code -> step
    nonfinite_count: int = 0
    last_skipped: int = 0
    reward_ema: float | None = None
    best_reward_ema: float | None = None
    # the reward EMA's variance is (variance of one sample) x reward_ema_inv_n, the EMA's weights squared
    # over each step's count (0 while no count was logged); the same factor of the best EMA when it was set
    reward_ema_inv_n: float = 0.0
    best_reward_ema_inv_n: float = 0.0
    reward_spread_ema: float = 0.0  # EMA of reward/std^2: the per-sample variance of rewards beyond [0, 1]
    zero_std_recent: list = field(default_factory=list)
    # tok/s within the current epoch
    early_toks_sum: float = 0.0
    early_toks_n: int = 0
    recent_toks: list = field(default_factory=list)
    past_early: bool = False
    # what toks_drop can blame: memory held (footprint, else MLX active + cache) and the scorer's time,
    # early in the epoch (first value) and over the recent window
    early_memory: float | None = None
    recent_memory: list = field(default_factory=list)
    early_score_s: float | None = None
    recent_score_s: list = field(default_factory=list)
    # memory across epochs
    epoch_active_sum: float = 0.0
    epoch_active_n: int = 0
    epoch_active: list = field(default_factory=list)
    val_trend: dict | None = None  # TrendTracker.state_dict()
    # loss volatility for lr_adjustment
    loss_ema: float | None = None
    dev_ema: float | None = None
    abs_ema: float | None = None
    vol_steps: int = 0
    last_lr_adjust: int | None = None

    def state_dict(self):
        return asdict(self)

    def load(self, state):
        for k, v in state.items():
            setattr(self, k, v)
