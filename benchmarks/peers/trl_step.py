"""TRL's GRPOTrainer on the peer job (README.md): each step's wall time and generation time, then a
`PEER {json}` line with the medians over steps 2.. and the peak resident memory.

    $PEERS_HOME/trl/bin/python benchmarks/peers/trl_step.py --steps 5 --model $PEERS_HOME/smollm2

Run it in the peers' TRL environment (torch, trl, peft, datasets; no mlx-coach).
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_tasks  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StepClock(TrainerCallback):
    """Wall time of each optimizer step (generation, reward, reference and policy log-probs, backward, update)."""

    def __init__(self):
        self.steps, self._t0 = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append({"step_s": time.perf_counter() - self._t0, "generate_s": 0.0})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps (the first is not in the medians)")
    ap.add_argument("--model", default=str(Path(os.environ.get("PEERS_HOME", "~/.cache/mlx-coach-peers")).expanduser()
                                           / "smollm2"), help="the HF folder export_smollm2.py wrote")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the cores mlx-coach uses)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tasks = peer_tasks.load_tasks()
    data = Dataset.from_list([{"prompt": peer_tasks.chat(t), "task": i} for i, t in enumerate(tasks)])

    def reward(completions, task, **_):
        return [peer_tasks.reward(c[-1]["content"], tasks[i]) for c, i in zip(completions, task)]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="peer-trl-"), max_steps=args.steps, use_cpu=True, seed=0,
        per_device_train_batch_size=16, num_generations=4, gradient_accumulation_steps=1,  # 4 prompts x 4 samples
        max_completion_length=64, temperature=1.0, top_p=0.95, top_k=20,
        learning_rate=1e-5, beta=0.04, loss_type="grpo", bf16=False, fp16=False,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                          args=config, reward_funcs=reward, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=lora)
    clock = StepClock()
    trainer.add_callback(clock)
    generation = []
    sample = trainer._generate  # TRL's generation phase (a private method: the one place to time it)

    def timed_sample(*a, **k):
        t0 = time.perf_counter()
        out = sample(*a, **k)
        generation.append(time.perf_counter() - t0)
        return out

    trainer._generate = timed_sample
    trainer.train()
    for i, (step, gen_s) in enumerate(zip(clock.steps, generation), start=1):
        step["generate_s"] = gen_s
        print(f"step {i}: {step['step_s']:.2f} s (generate {gen_s:.2f} s)", flush=True)
    print(peer_tasks.summary("trl", clock.steps, peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                             torch=torch.__version__, threads=torch.get_num_threads()))


if __name__ == "__main__":
    main()
