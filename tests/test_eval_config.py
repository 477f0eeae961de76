"""`mlx-coach eval -c CONFIG`: the config's prompts, stops and sampling, so eval answers as the trainer's validation does."""

import json

import yaml

from mlx_coach.cli import main
from mlx_coach.config.tree import load_config
from mlx_coach.rl import after_step
from mlx_coach.rl.trainer import Trainer


def _config(tmp_path):
    """The tiny model with a prompt, stops and answer length of its own: none of them eval's flag defaults."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({
        "task_id": f"t/{i}", "prompt": f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n", "entry_point": f"f{i}",
        "test": f"def check(c):\n    assert c(1) == {1 + i}\n"}) + "\n" for i in range(12)))
    cfg = {
        "model": {"path": "builtin:tiny", "lora_rank": 4},
        "data": {"tasks": str(tasks), "val_fraction": 0.25},
        "rollout": {"group_size": 2, "prompts_per_step": 3, "max_new_tokens": 24, "temperature": 1.0,
                    "user_template": "# Write the body.\n{prompt}", "stop": ["\nde"]},
        "optim": {"lr": 0.01},
        "train": {"steps": 1, "checkpoint_every": 0, "epochs_val": False, "val_max_new_tokens": 10,
                  "output": str(tmp_path / "run")},
        "rewards": [{"type": "tests"}],
        "sandbox": {"workers": 1},
        "telemetry": {"progress": False, "tensorboard": False},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _validation_answers(trainer, monkeypatch):
    """The records of the trainer's own validation (rl.after_step.validate), seen on their way to the summary."""
    seen = []

    def recording(*args, **kwargs):
        records = generate_and_score(*args, **kwargs)
        seen.extend(records)
        return records

    generate_and_score = after_step.generate_and_score
    monkeypatch.setattr(after_step, "generate_and_score", recording)
    assert trainer.validate() is not None
    monkeypatch.setattr(after_step, "generate_and_score", generate_and_score)
    return [(r["task_id"], r["completion"], r["finish_reason"], r["tokens"], r["passed"]) for r in seen]


def _eval_answers(tmp_path, name, *argv):
    out = tmp_path / name
    assert main(["eval", *argv, "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return [(r["task_id"], r["completion"], r["finish_reason"], r["tokens"], r["passed"]) for r in rows]


def test_eval_with_the_config_answers_as_the_trainers_validation(tmp_path, monkeypatch):
    path = _config(tmp_path)
    trainer = Trainer(load_config(path), tmp_path / "run")
    try:
        before = _validation_answers(trainer, monkeypatch)
        trainer.run_step()
        checkpoint = trainer.save()
        after = _validation_answers(trainer, monkeypatch)
    finally:
        trainer.close()
    assert len(before) == 3 and {r[0] for r in before} == {t.task_id for t in trainer.val_tasks}
    assert all(r[3] <= 10 for r in before)  # train.val_max_new_tokens, not rollout.max_new_tokens
    assert _eval_answers(tmp_path, "base", "-c", str(path)) == before
    assert _eval_answers(tmp_path, "trained", "-c", str(path), "--adapter", str(checkpoint)) == after
    # the flag form on the same tasks sees another prompt (no user_template, default stops and length)
    plain = _eval_answers(tmp_path, "plain", "--model", "builtin:tiny", "--tasks", str(tmp_path / "tasks.jsonl"),
                          "--max-new-tokens", "10", "--workers", "1")
    plain = [r for r in plain if r[0] in {b[0] for b in before}]
    assert [r[1] for r in plain] != [r[1] for r in before]


def test_flags_beside_the_config_override_it(tmp_path):
    path = _config(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "-c", str(path), "--set", "train.val_limit=2", "--samples", "2", "--temperature", "0.5",
                 "--max-new-tokens", "4", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert report["tasks"] == 2 and report["samples"] == 4 and report["temperature"] == 0.5
    assert report["config"] == str(path) and all(r["tokens"] <= 4 for r in rows)
