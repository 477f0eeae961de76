"""Every command's flags and inputs are checked: a bad value is one line naming the flag, field or
file:line on stderr, exit code 2, no traceback, and nothing written."""

import json
import subprocess
import sys

import pytest

from mlx_coach.cli import main
from tests.test_trainer import tiny_cfg


def _refused(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["train", "--steps", "-5"], "--steps"),
    (["train", "--steps", "0"], "--steps"),
    (["eval", "--model", "builtin:tiny", "--timeout", "0"], "--timeout"),
    (["eval", "--model", "builtin:tiny", "--timeout", "nan"], "--timeout"),
    (["eval", "--model", "builtin:tiny", "--timeout", "inf"], "--timeout"),
    (["eval", "--model", "builtin:tiny", "--limit", "-1"], "--limit"),
    (["eval", "--model", "builtin:tiny", "--samples", "0"], "--samples"),
    (["eval", "--model", "builtin:tiny", "--workers", "-1"], "--workers"),
    (["eval", "--model", "builtin:tiny", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "--model", "builtin:tiny", "--temperature", "-0.5"], "--temperature"),
    (["score", "--tasks", "builtin", "--completions", "x.jsonl", "--timeout", "-1"], "--timeout"),
    (["score", "--tasks", "builtin", "--completions", "x.jsonl", "--workers", "-3"], "--workers"),
    (["score", "--tasks", "builtin", "--completions", "x.jsonl", "--memory-mb", "8"], "--memory-mb"),
    (["ab", "--steps", "0"], "--steps"),
    (["bench", "no-such-benchmark"], "no-such-benchmark"),
])
def test_out_of_range_flags_are_refused_before_any_work(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, argv, needle)
    assert list(tmp_path.iterdir()) == []  # no run directory, no checkpoints/step-0


def test_a_tasks_file_that_is_not_utf8_names_its_line(capsys, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    row = {"task_id": "a", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c): pass"}
    tasks.write_bytes((json.dumps(row) + "\n").encode() + b'{"task_id": "caf\xe9"}\n')
    _refused(capsys, ["score", "--tasks", str(tasks), "--completions", str(tasks)], "tasks.jsonl:2")
    _refused(capsys, ["eval", "--model", "builtin:tiny", "--tasks", f"mbpp:{tasks}"], "tasks.jsonl:2")
    _refused(capsys, ["train", "--set", f"data.tasks={tasks}", "--output", str(tmp_path / "run")], "tasks.jsonl:2")


def test_a_completions_file_that_is_not_utf8_names_its_line(capsys, tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_bytes(b'{"task_id": "x", "completion": "  return 1"}\n\n{"task_id": "\xff"}\n')
    _refused(capsys, ["score", "--tasks", "builtin", "--completions", str(samples)], "samples.jsonl:3")


def test_a_config_that_is_not_utf8_names_its_line(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"train:\n  steps: 2\nmodel:\n  path: caf\xe9\n")
    _refused(capsys, ["train", "-c", str(cfg), "--output", str(tmp_path / "run")], "c.yaml:4")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real 2-step LoRA run on builtin:tiny (seed 0), checkpointed at step 2."""
    from mlx_coach.rl.loop import train

    tmp = tmp_path_factory.mktemp("adapter")
    cfg = tiny_cfg(tmp, train={"steps": 2, "checkpoint_every": 2})
    train(cfg, tmp / "run")
    return tmp / "run"


def test_the_adapter_records_its_base_model(trained_run):
    config = json.loads((trained_run / "checkpoints" / "step-2" / "adapter_config.json").read_text())
    base = config["mlx_coach_base"]
    assert base["source"] == "builtin:tiny" and base["seed"] == 0 and len(base["fingerprint"]) == 16
    assert config["model"] == str((trained_run / "base_model").resolve())  # mlx-lm's own key is kept


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_coach", *args], capture_output=True, text=True, timeout=180)


def test_an_adapter_is_refused_on_another_base(trained_run, tmp_path):
    adapter = trained_run / "checkpoints" / "step-2"
    proc = _cli("eval", "--model", "builtin:tiny@7", "--adapter", str(adapter), "--limit", "1")
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "--adapter" in line and "builtin:tiny@7" in line and "trained on builtin:tiny " in line
    # the base it was trained on, reached through the run's own copy of it, is accepted
    ok = _cli("eval", "--model", str(trained_run / "base_model"), "--adapter", str(adapter), "--limit", "1",
              "--max-new-tokens", "4")
    assert ok.returncode == 0, ok.stderr
    assert "pass@1=" in ok.stdout


def test_resume_on_another_base_is_refused_and_leaves_the_checkpoint(trained_run, capsys):
    before = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    _refused(capsys, ["train", "--resume", str(trained_run), "--steps", "3", "--set", "model.path=builtin:tiny@7"],
             "builtin:tiny@7")
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == before


def test_resume_to_a_step_the_run_has_passed_is_refused(trained_run, capsys):
    _refused(capsys, ["train", "--resume", str(trained_run), "--steps", "1"], "--steps")


def test_resume_refuses_flags_it_would_ignore(trained_run, capsys, tmp_path):
    _refused(capsys, ["train", "--resume", str(trained_run), "-c", "configs/tiny.yaml"], "-c/--config")
    _refused(capsys, ["train", "--resume", str(trained_run), "--output", str(tmp_path / "x")], "--output")
    assert not (tmp_path / "x").exists()
