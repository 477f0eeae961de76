"""`mlx-coach ab`: one config, any settings varied, each combination over several seeds, compared.

`--vary KEY=V1,V2` (repeatable) names a config key and its values, read like `--set` values; the
arms are the full product of the values, in the order given. Each arm runs `--seeds N` times with
train.seed = the config's seed + i, so arm A's seed i and arm B's seed i sample from the same seed
and can be compared pair by pair. Every run is a `mlx-coach train` process (its own MLX state, its
own teacher_server if the config has one) writing `OUT/ARM/seedS/`; up to `--parallel P` at once.
SIGINT, SIGTERM or SIGHUP to ab is passed on to its runs, which checkpoint and stop; a run stops the
same way when ab is gone, even SIGKILLed (runtime/watchdog.py), so no run outlives it.

Resumable: `OUT/ab.json` records what the A/B is (the resolved config, the varied keys, seeds,
steps). Re-running the same command does only what is missing: a run whose last checkpoint is at
the final step is kept, one with an earlier checkpoint continues with `train --resume`, one without
starts again (the trainer moves its partial files aside). Another config or grammar into the same
OUT is refused in one line. The report (ab_report.py) is written when every run is done.
"""

import fcntl
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlx_coach.runtime.checkpoint import list_checkpoints
from mlx_coach.config.tree import _parse_scalar, load_config, to_dict
from mlx_coach.commands.ab_report import arm_label, write_report
from mlx_coach.core.errors import UserError
from mlx_coach.runtime.stops import raise_signal_stop
from mlx_coach.runtime.watchdog import env_for_child

MANIFEST = "ab.json"


def add_arguments(p):
    p.add_argument("-c", "--config", help="YAML config; defaults when omitted")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2[,...]",
                   help="a config key and the values to try (read like --set values); repeat for more keys: "
                        "the arms are the product of all values (default: cache.policy=lru+ttl,epoch-clear)")
    p.add_argument("--policies", nargs=2, metavar=("A", "B"), help="shorthand for --vary cache.policy=A,B")
    p.add_argument("--seeds", type=int, default=1, help="runs per arm, train.seed = the config's seed + 0..N-1")
    p.add_argument("--steps", type=int, help="steps per run (overrides train.steps)")
    p.add_argument("--output", default="runs/ab", help="folder for the runs, summary.json, report.md and plots")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (each a train process)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key in every arm")


# ---------------------------------------------------------------------------------------------
# The grammar


def split_values(text):
    """`V1,V2,...` split at the commas outside brackets and quotes, so [a, b] is one value."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def parse_vary(items):
    """[(key, [value text, ...]), ...] from `--vary KEY=V1,V2` strings; UserError on bad grammar."""
    out, seen = [], set()
    for item in items:
        if "=" not in item:
            raise UserError(f"--vary expects KEY=V1,V2,...; got {item!r}")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or not all(key.split(".")):
            raise UserError(f"--vary has an empty key in {item!r}")
        values = split_values(text)
        if not text.strip() or any(v == "" for v in values):
            raise UserError(f"--vary {key}: empty value in {item!r}")
        if len({json.dumps(_parse_scalar(v)) for v in values}) != len(values):
            raise UserError(f"--vary {key}: a value is given twice in {item!r}")
        if key in seen:
            raise UserError(f"--vary {key} is given twice; list all its values in one --vary")
        if key == "train.seed":
            raise UserError("--vary train.seed: use --seeds N (every arm runs seeds base..base+N-1)")
        seen.add(key)
        out.append((key, values))
    return out


def grammar(args):
    """(vary pairs, seeds, parallel) checked; --policies folded into --vary."""
    vary = parse_vary(args.vary)
    if args.policies:
        if any(k == "cache.policy" for k, _ in vary):
            raise UserError("--policies and --vary cache.policy both given; use one")
        vary = [("cache.policy", list(args.policies)), *vary]
    if not vary:
        vary = [("cache.policy", ["lru+ttl", "epoch-clear"])]
    set_keys = {s.partition("=")[0].strip() for s in args.set}
    for key, _ in vary:
        if key in set_keys:
            raise UserError(f"--vary {key} is also given with --set; give it in one place")
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1; got {args.seeds}")
    if args.parallel < 1:
        raise UserError(f"--parallel must be >= 1; got {args.parallel}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1; got {args.steps}")
    return vary, args.seeds, args.parallel


def arms(vary):
    """Every combination of the values: [[(key, value text), ...], ...], first key slowest."""
    return [list(zip([k for k, _ in vary], combo)) for combo in itertools.product(*[vs for _, vs in vary])]


def arm_dir(index, arm):
    slug = "_".join(f"{k.rpartition('.')[2]}-{v}" for k, v in arm)
    return f"a{index}-" + re.sub(r"[^A-Za-z0-9.+-]+", "_", slug)[:60]


# ---------------------------------------------------------------------------------------------
# Runs


class Run:
    def __init__(self, out, index, arm, seed_index, seed):
        self.arm_index, self.arm, self.seed_index, self.seed = index, arm, seed_index, seed
        self.dir = Path(out) / arm_dir(index, arm) / f"seed{seed}"
        self.log = Path(out) / "logs" / f"{arm_dir(index, arm)}-seed{seed}.log"
        self.name = f"{arm_label(arm)} seed {seed}"

    def checkpoint_step(self):
        found = list_checkpoints(self.dir)
        return int(found[-1].name.rpartition("-")[2]) if found else 0

    def command(self, config, sets, steps):
        """The train command for what is there: resume from a checkpoint, or start (again)."""
        base = [sys.executable, "-m", "mlx_coach", "train"]
        if self.checkpoint_step():
            return [*base, "--resume", str(self.dir), "--steps", str(steps)]
        overrides = [*sets, *(f"{k}={v}" for k, v in self.arm), f"train.seed={self.seed}"]
        return [*base, *(["-c", config] if config else []), *[a for s in overrides for a in ("--set", s)],
                "--steps", str(steps), "--output", str(self.dir)]


def plan(args, vary, seeds):
    """(runs, steps, manifest); every arm's config is loaded once here, so a bad value is one line
    before any run starts."""
    base = load_config(args.config, args.set)
    steps = args.steps or base.train.steps
    for arm in arms(vary):
        try:
            load_config(args.config, [*args.set, *(f"{k}={v}" for k, v in arm)])
        except UserError as e:
            raise UserError(f"--vary {arm_label(arm)}: {e}") from None
    manifest = {"format": 1, "config": json.loads(json.dumps(to_dict(base))), "vary": [[k, vs] for k, vs in vary],
                "seeds": seeds, "steps": steps}
    runs = [Run(args.output, i, arm, s, base.train.seed + s) for i, arm in enumerate(arms(vary)) for s in range(seeds)]
    return runs, steps, manifest


def claim_output(out, manifest):
    """Lock OUT (one ab at a time) and check it holds this A/B or nothing; write the manifest."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".ab.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"--output: cannot write {out} ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"--output: {out} is in use by another mlx-coach ab") from None
    path = out / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != manifest:
            os.close(fd)
            raise UserError(f"--output: {out} holds an A/B of another config, --vary, --seeds or --steps; "
                            f"choose a new --output (or repeat that A/B's command to finish it)")
    elif any(p.name != ".ab.lock" for p in out.iterdir()):
        os.close(fd)
        raise UserError(f"--output: {out} is not empty and holds no mlx-coach A/B; choose an empty or new folder")
    else:
        tmp = out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)
    return fd


def _last_line(path):
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def execute(runs, config, sets, steps, parallel, say=print):
    """Run what is missing, up to `parallel` at once. Returns the runs that failed. A stop signal
    to this process (Ctrl-C, SIGTERM, SIGHUP) is passed on to the runs, which checkpoint and stop."""
    todo = [r for r in runs if r.checkpoint_step() < steps]
    for r in runs:
        if r not in todo:
            say(f"kept  {r.name}: finished ({r.dir})")
    running, failed = {}, []
    try:
        while todo or running:
            while todo and len(running) < parallel and not failed:
                r = todo.pop(0)
                r.log.parent.mkdir(parents=True, exist_ok=True)
                at = r.checkpoint_step()
                cmd = r.command(config, sets, steps)
                say(f"start {r.name}: " + (f"resumes from step {at}" if at else "from step 0") + f" (log {r.log})")
                with open(r.log, "a") as log:
                    log.write(f"\n$ {' '.join(cmd)}\n")
                    log.flush()
                    # own session: a Ctrl-C at the terminal reaches this process alone, which passes
                    # exactly one signal on (a second one would stop a run before its checkpoint);
                    # the run's watchdog stops it if this process is gone
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=env_for_child())
                    running[r] = (proc, time.monotonic())
            if failed and not running:
                break
            time.sleep(0.2)
            for r, (proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[r]
                if proc.returncode == 0:
                    say(f"done  {r.name} in {time.monotonic() - t0:.0f} s")
                else:
                    failed.append((r, proc.returncode))
                    say(f"FAILED {r.name} (exit {proc.returncode}): {_last_line(r.log)}")
    except KeyboardInterrupt as e:
        for proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(getattr(e, "signum", signal.SIGINT))
        for proc, _ in running.values():
            proc.wait()
        raise
    return failed


def run(args):
    vary, seeds, parallel = grammar(args)
    runs, steps, manifest = plan(args, vary, seeds)
    lock = claim_output(args.output, manifest)
    # a stop signal stops the A/B at the runs' checkpoints; SIGINT even when ignored, as a process
    # started in the background by a shell inherits it so; SIGHUP not when ignored (nohup)
    signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    previous = {sig: signal.signal(sig, raise_signal_stop) for sig in signals}
    try:
        print(f"A/B: {len(arms(vary))} arms x {seeds} seeds, {steps} steps each, {parallel} at a time -> {args.output}")
        failed = execute(runs, args.config, args.set, steps, parallel)
        if failed:
            r, code = failed[0]
            msg = f"{r.name} failed (exit {code}): {_last_line(r.log)}; see {r.log}"
            if code == 2:
                raise UserError(msg)
            print(f"mlx-coach: error: {msg}", file=sys.stderr)
            return 1
        summary = write_report(args.output, runs, manifest)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(lock)
    print(summary["table"])
    print(f"report: {Path(args.output) / 'report.md'}; dashboards: tensorboard --logdir {args.output}")
    return 0
