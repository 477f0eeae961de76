"""`hf:NAME[:SPLIT]` task sources: HumanEval- and MBPP-shaped datasets saved locally (no network), a hub id only
where the hub answers."""

import json
import os
import socket
import subprocess
import sys

import pytest

from mlx_coach.cli import main
from mlx_coach.core.errors import UserError
from mlx_coach.data.tasks import answer_key_paths, load_tasks

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The local cases must never reach for the network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


HUMANEVAL_ROWS = [
    {"task_id": "HE/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
     "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"},
    {"task_id": "HE/1", "prompt": "def neg(a):\n    \"\"\"Minus a.\"\"\"\n", "entry_point": "neg",
     "canonical_solution": "    return -a\n", "test": "def check(candidate):\n    assert candidate(2) == -2\n"},
]
MBPP_ROWS = [
    {"task_id": 11, "text": "Write a function to double a number.", "code": "def double(x):\n    return 2 * x",
     "test_list": ["assert double(2) == 4", "assert double(0) == 0"], "test_setup_code": ""},
    {"task_id": 12, "text": "Write a function to square root a number.",
     "code": "def root(x):\n    return math.sqrt(x)", "test_list": ["assert root(4) == 2"], "test_setup_code": "import math"},
]


def _columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_a_saved_humaneval_dataset_dict_loads_by_split(tmp_path):
    folder = tmp_path / "he"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(_columns(HUMANEVAL_ROWS)),
                          "train": datasets.Dataset.from_dict(_columns(HUMANEVAL_ROWS[:1]))}).save_to_disk(str(folder))
    tasks = load_tasks(f"hf:{folder}")  # the test split when none is named
    assert [(t.task_id, t.entry_point, t.canonical_solution) for t in tasks] == [
        (r["task_id"], r["entry_point"], r["canonical_solution"]) for r in HUMANEVAL_ROWS]
    assert [t.task_id for t in load_tasks(f"hf:{folder}:train")] == ["HE/0"]
    assert any(p.startswith(str(folder.resolve())) for p in answer_key_paths())  # hidden from samples
    with pytest.raises(UserError, match="no split 'valid'; it has test, train"):
        load_tasks(f"hf:{folder}:valid")


def test_a_saved_mbpp_dataset_becomes_humaneval_shaped_tasks(tmp_path):
    folder = tmp_path / "mbpp"
    datasets.Dataset.from_dict(_columns(MBPP_ROWS)).save_to_disk(str(folder))
    tasks = load_tasks(f"hf:{folder}")
    assert [(t.task_id, t.entry_point) for t in tasks] == [("mbpp/11", "double"), ("mbpp/12", "root")]
    assert "import math" in tasks[1].test and "def check(candidate)" in tasks[1].test
    # the sanitized config's names: prompt for text, test_imports for the setup code, no task_id
    sanitized = [{"prompt": r["text"], "code": r["code"], "test_list": r["test_list"],
                  "test_imports": [r["test_setup_code"]] if r["test_setup_code"] else []} for r in MBPP_ROWS]
    datasets.Dataset.from_dict(_columns(sanitized)).save_to_disk(str(tmp_path / "sanitized"))
    tasks = load_tasks(f"hf:{tmp_path / 'sanitized'}")
    assert [t.task_id for t in tasks] == ["mbpp/0", "mbpp/1"] and "import math" in tasks[1].test


def test_columns_of_neither_shape_are_refused_naming_what_is_missing(tmp_path):
    folder = tmp_path / "odd"
    datasets.Dataset.from_dict({"prompt": ["def f():\n"], "answer": ["1"]}).save_to_disk(str(folder))
    with pytest.raises(UserError) as e:
        load_tasks(f"hf:{folder}")
    msg = str(e.value)
    assert "\n" not in msg and "missing test, entry_point" in msg and "missing test_list, code" in msg


def test_eval_and_train_configs_take_hf_tasks(tmp_path, capsys):
    folder = tmp_path / "he"
    datasets.Dataset.from_dict(_columns(HUMANEVAL_ROWS)).save_to_disk(str(folder))
    out = tmp_path / "eval"
    assert main(["eval", "--model", "builtin:tiny", "--tasks", f"hf:{folder}", "--max-new-tokens", "4",
                 "--workers", "1", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HE/0", "HE/1"]
    from mlx_coach.config.tree import load_config
    from mlx_coach.rl.setup import select_tasks

    train, val = select_tasks(load_config(None, [f"data.tasks=hf:{folder}", "data.val_fraction=0.5"]).data)
    assert len(train) + len(val) == 2
    capsys.readouterr()
    assert main(["eval", "--model", "builtin:tiny", "--tasks", f"hf:{tmp_path / 'absent'}"]) == 2
    assert "absent" in capsys.readouterr().err


def _hub_reachable():
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


def test_a_hub_id_loads_where_the_hub_answers():
    if not _hub_reachable():
        pytest.skip("no network to huggingface.co")
    code = ("from mlx_coach.data.tasks import load_tasks; t = load_tasks('hf:openai/openai_humaneval'); "
            "print(len(t), t[0].task_id)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["164", "HumanEval/0"]
