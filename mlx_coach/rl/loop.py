"""Driving a run: `train()` (steps or a time budget, stop signals, checkpoints) and `mlx-coach train`."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

from mlx_coach.config.tree import Config, load_config, load_run_config
from mlx_coach.core.errors import RunStopped, UserError
from mlx_coach.rewards.scoring.http_judge import JudgeOutage
from mlx_coach.rewards.teacher_server import serve as serve_teacher
from mlx_coach.rl.setup import schedule_steps
from mlx_coach.rl.trainer import Trainer
from mlx_coach.runtime.checkpoint import latest_checkpoint
from mlx_coach.runtime.distributed import world
from mlx_coach.runtime.stops import DISK_ERRNOS, SignalStop, WriteFailed, signal_name
from mlx_coach.runtime.watchdog import parent_from_env, watch_parent
from mlx_coach.telemetry.progress import StepClock, format_eta, progress_line

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _DeferredStop:
    """While active, the first SIGINT (Ctrl-C), SIGTERM or SIGHUP only sets `signum`: the step in
    progress finishes and train() checkpoints it before stopping. A second one stops at once. SIGTERM
    and SIGHUP are left alone when ignored at entry (nohup); SIGINT is taken even then, as a process
    started in the background by a shell inherits it ignored. Only the main thread can handle
    signals; elsewhere this does nothing."""

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if sig == signal.SIGINT or signal.getsignal(sig) != signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal_name(signum)
        if self.signum is not None:
            raise SignalStop(signum, f"{name} again: stopped at once, without the step's checkpoint")
        self.signum = signum
        ctrl_c = signum == signal.SIGINT  # after the terminal's "^C", on a line of its own
        print(("\n" if ctrl_c else "") + f"{name}: finishing this step, then saving a checkpoint "
              f"({'Ctrl-C' if ctrl_c else name} again to stop now)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


def train(cfg: Config, run_dir, *, resume=False, steps=None, deadline=None):
    """Run (or continue) training until `steps` (default cfg.train.steps), or until the first step that
    ends after `deadline` (a time.monotonic() value; `mlx-coach bench learn --minutes`). Returns the
    last metrics. SIGINT, SIGTERM or SIGHUP checkpoint the last finished step, then raise SignalStop
    (a KeyboardInterrupt); a write that fails raises WriteFailed. A `teacher_server` (the judge's own
    mlx_lm.server) runs for exactly as long as this call."""
    with serve_teacher(cfg):
        return _train(cfg, run_dir, resume=resume, steps=steps, deadline=deadline)


def _train(cfg, run_dir, *, resume, steps, deadline):
    trainer = _start(cfg, run_dir, resume)
    stopping = None
    try:
        with _DeferredStop() as stop:
            try:
                last = _steps(trainer, cfg, steps or cfg.train.steps, deadline, stop)
            except WriteFailed as e:
                raise _with_resume_hint(e, trainer) from None
            except OSError as e:  # a write no writer of the run guards (the report's charts)
                raise _with_resume_hint(_disk_failure(e), trainer) from None
    except BaseException as e:
        stopping = e
        raise
    finally:
        try:
            trainer.close()
        except WriteFailed:
            if stopping is None:  # else the first failure is the one to report
                raise
    return last


def _start(cfg, run_dir, resume):
    """The run's Trainer. A start-up write that fails (the run directory's lock and marker, config.yaml,
    the starting weights, the base model's copy) raises WriteFailed saying how to go on."""
    try:
        return Trainer(cfg, run_dir, resume=resume)
    except WriteFailed as e:
        failure = e
    except OSError as e:  # a start-up write no writer of the run guards
        failure = _disk_failure(e)
    then = f"continue with --resume {run_dir}" if resume else f"start again with --output {run_dir}"
    raise WriteFailed(f"{failure}; the run did not start; once {run_dir} can be written, {then}") from None


def _disk_failure(error):
    """WriteFailed for an OSError the disk raised (DISK_ERRNOS); any other OSError is raised again."""
    if error.errno not in DISK_ERRNOS:
        raise error
    where = f" {error.filename}" if error.filename else ""
    return WriteFailed(f"cannot write{where} ({error.strerror})")


def _steps(trainer, cfg, total, deadline, stop):
    every = cfg.train.checkpoint_every
    clock = StepClock()  # the step line's ETA: steps left x the mean of recent step times
    last = {}
    while trainer.state.step < total and stop.signum is None and (deadline is None or time.monotonic() < deadline):
        try:
            last = trainer.run_step()
        except JudgeOutage as e:  # on_outage: stop; keep every finished step
            path = trainer.save() if trainer.state.step else None
            raise RunStopped(f"{e}; stopped at step {trainer.state.step}"
                             + (f", saved {path}; continue with --resume {trainer.run_dir}" if path else "")) from None
        clock.add(last.get("time/step_s", 0.0))
        if cfg.telemetry.progress and trainer.world.is_main:
            if deadline is None:
                eta = format_eta(clock.eta(total - trainer.state.step))
                line = progress_line(trainer.state.step, total, last)
            else:  # a time budget (bench learn --minutes): the steps are not known in advance
                eta = format_eta(max(0.0, deadline - time.monotonic()))
                line = progress_line(trainer.state.step, "budget", last)
            print(f"{line} | ETA {eta}", file=sys.stderr, flush=True)
        val_every = cfg.train.val_every
        # at an epoch's end (pos 0) end_epoch has validated, if train.epochs_val asks it to
        if val_every and trainer.state.step % val_every == 0 and (trainer.state.pos or not cfg.train.epochs_val):
            trainer.validate_midway()
        if every and trainer.state.step % every == 0:
            trainer.save()
    path = latest_checkpoint(trainer.run_dir)
    if trainer.state.step and (path is None or not every or trainer.state.step % every):
        path = trainer.save()
    if stop.signum is not None:
        detail = None
        if trainer.world.is_main:
            detail = (f"{signal_name(stop.signum)} at step {trainer.state.step}: saved {path}; "
                      f"continue with --resume {trainer.run_dir}")
        raise SignalStop(stop.signum, detail)
    return last


def _with_resume_hint(failure, trainer):
    run_dir, newest = trainer.run_dir, latest_checkpoint(trainer.run_dir)
    then = f"once {run_dir} can be written, " + (f"start again with --output {run_dir}" if newest is None
                                                  else f"continue with --resume {run_dir}")
    kept = "no checkpoint yet" if newest is None else f"the newest checkpoint is {newest.name}"
    return WriteFailed(f"{failure}; stopped at step {trainer.state.step}, {kept}; {then}")


def _stop_with_parent(parent_pid):
    """A run started by `mlx-coach ab` stops as on SIGTERM once ab is gone, even SIGKILLed: it keeps its
    finished steps, and its run directory's lock is free for the next ab."""

    def stop():
        print(f"the process that started this run (pid {parent_pid}) is gone: stopping as on SIGTERM",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    watch_parent(parent_pid, stop)


def run_from_args(args):
    parent = parent_from_env()
    if parent is not None:
        _stop_with_parent(parent)
    if args.resume:
        for flag, value in (("-c/--config", args.config), ("--output", args.output)):
            if value:  # a resumed run keeps its own config and directory: say so rather than ignore it
                raise UserError(f"{flag}: not used with --resume (the run continues with {args.resume}/config.yaml "
                                f"in {args.resume}); change keys with --set")
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume: {saved} not found (is {run_dir} a run directory?)")
        cfg = load_run_config(saved, args.set)  # the run's resolved config, plus any overrides
        newest = latest_checkpoint(run_dir)
        at = int(newest.name.split("-")[-1]) if newest is not None else 0
        if args.steps and args.steps < at:
            raise UserError(f"--steps: the run in {run_dir} is already at step {at}; "
                            f"give --steps {at} or more")
    else:
        cfg = load_config(args.config, args.set)
        run_dir = Path(args.output or cfg.train.output)
        # the schedule's length is fixed here, at the run's start: `--steps` says where to stop
        # now, so stopping at N and resuming to 2N follows the same rates as a straight 2N run
        if not cfg.optim.schedule_steps:
            cfg.optim.schedule_steps = max(cfg.train.steps, args.steps or 0)
    if args.steps:
        cfg.train.steps = args.steps
    if not args.resume and args.output:
        cfg.train.output = args.output
    if cfg.train.steps > schedule_steps(cfg) and cfg.optim.schedule != "constant":
        print(f"note: --steps {cfg.train.steps} runs past the {schedule_steps(cfg)}-step learning-rate schedule "
              f"(optim.schedule_steps); the rate stays at its end value from then on", file=sys.stderr)
    last = train(cfg, run_dir, resume=bool(args.resume))
    if world().is_main:
        print(f"done: step {cfg.train.steps}, reward/mean {last.get('reward/mean', float('nan')):.3f}, run {run_dir}")
    return 0
