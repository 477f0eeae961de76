"""Progress for long work: a tqdm bar with ETA on a terminal, nothing when stderr is a file or a
pipe (logs and CI stay clean); and `train`'s per-step line (`progress_line`) with its ETA.

tqdm is a dependency for this: its ETA, rate smoothing and terminal handling are well kept, and a
bar that is silent off a terminal is one flag.
"""

import math
import sys
from collections import deque

from tqdm import tqdm

from mlx_coach.telemetry.scalar_charts import TOKS


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def bar(total, desc, *, unit="it", stream=None):
    """A progress bar on `stream` (default stderr), disabled unless that stream is a terminal."""
    stream = stream or sys.stderr
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not is_terminal(stream),
                leave=False, mininterval=0.5)


class StepClock:
    """Recent step durations; the ETA is the steps left times their mean (the first steps, which
    compile and warm caches, leave the window after `window` steps)."""

    def __init__(self, window=10):
        self.times = deque(maxlen=window)

    def add(self, seconds):
        self.times.append(float(seconds))

    def eta(self, steps_left):
        """Seconds until the last step, or None before any step was timed."""
        if not self.times:
            return None
        return max(0, steps_left) * sum(self.times) / len(self.times)


def bench_note(name):
    """note(text) for `mlx-coach bench NAME`: "[bench NAME] text" on stderr, flushed, whatever stderr is (a
    file or a pipe included), saying what the benchmark measures now and how far it is; results go to stdout."""
    def note(text):
        print(f"[bench {name}] {text}", file=sys.stderr, flush=True)
    return note


def format_eta(seconds) -> str:
    """'42s', '3m05s', '1h02m'; 'n/a' when unknown."""
    if seconds is None:
        return "n/a"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_line(step, total, metrics):
    """One console line: step/total, reward, tok/s, loss (and KL when logged)."""

    def fmt(key, spec):
        v = metrics.get(key)
        return "n/a" if v is None else f"{v:{spec}}" if math.isfinite(v) else str(v)

    loss_key = "loss/total" if "loss/total" in metrics else "loss/policy"
    width = len(str(total))
    parts = [
        f"step {step:>{width}}/{total}",
        f"reward {fmt('reward/mean', '.3f')}",
        f"tok/s {fmt(TOKS, '.1f')}",
        f"loss {fmt(loss_key, '.4f')}",
    ]
    if "loss/kl" in metrics:
        parts.append(f"kl {fmt('loss/kl', '.4f')}")
    return " | ".join(parts)
