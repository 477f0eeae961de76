"""mlx-lm-lora's GRPO trainer on the peer job (README.md): each step's wall time and generation time, then a
`PEER {json}` line with the medians over steps 2.., MLX's peak memory and the peak resident memory.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 OPENBLAS_NUM_THREADS=2 \\
        $PEERS_HOME/mlxlora/bin/python benchmarks/peers/mlx_lm_lora_step.py --steps 5 --model $PEERS_HOME/smollm2-f32

Run it in the peers' mlx-lm-lora environment (no mlx-coach). It writes the tasks as mlx-lm-lora's chat
dataset in a temporary folder and runs `mlx_lm_lora.train` on it, with mlx_lm_lora.yaml; mlx-lm-lora reports
steps per second to three decimals only, so a training callback and a wrapper around its generation phase
take the times instead.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import mlx_lm_lora.train as lora_train
import mlx_lm_lora.trainer.grpo_trainer as grpo
from mlx_lm.tuner.callbacks import TrainingCallback

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peer_tasks  # noqa: E402

GROUP = 4


class StepReport(TrainingCallback):
    """Each reported step (steps_per_report: 1): its wall time, completion tokens and MLX's peak (GB)."""

    def __init__(self):
        self.steps = []

    def on_train_loss_report(self, info):
        self.steps.append({"step_s": 1.0 / info["iterations_per_second"], "generate_s": 0.0,
                           "completion_tokens": info["train_average_generated_tokens"] * 4 * GROUP,
                           "mlx_peak_gb": info["peak_memory"]})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps (the first is not in the medians)")
    ap.add_argument("--model", default=str(Path(os.environ.get("PEERS_HOME", "~/.cache/mlx-coach-peers")).expanduser()
                                           / "smollm2-f32"), help="the float32 MLX copy (README.md)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="peer-mlxlora-"))
    with open(work / "train.jsonl", "w") as f:
        for i, task in enumerate(peer_tasks.load_tasks()):
            system, user = peer_tasks.chat(task)
            f.write(json.dumps({"system": system["content"], "prompt": user["content"], "answer": str(i)}) + "\n")

    generation = []
    sample = grpo.generate_grpo

    def timed_sample(*a, **k):
        t0 = time.perf_counter()
        out = sample(*a, **k)
        generation.append(time.perf_counter() - t0)
        return out

    grpo.generate_grpo = timed_sample
    report = StepReport()
    run = lora_train.run
    lora_train.run = lambda run_args, training_callback=None: run(run_args, report)
    sys.argv = [sys.argv[0], "-c", str(HERE / "mlx_lm_lora.yaml"), "--model", args.model, "--data", str(work),
                "--iters", str(args.steps), "--group-size", str(GROUP), "--max-completion-length", "64",
                "--adapter-path", str(work / "adapters"),
                "--reward-functions-file", str(HERE / "mlx_lm_lora_reward.py")]
    lora_train.main()
    for i, (step, gen_s) in enumerate(zip(report.steps, generation), start=1):
        step["generate_s"] = gen_s
        print(f"step {i}: {step['step_s']:.2f} s (generate {gen_s:.2f} s)", flush=True)
    print(peer_tasks.summary("mlx-lm-lora", report.steps,
                             mlx_peak_gb=max((s["mlx_peak_gb"] for s in report.steps), default=float("nan")),
                             peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                             openblas=bool(os.environ.get("LD_PRELOAD"))))


if __name__ == "__main__":
    main()
