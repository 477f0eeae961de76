"""The benchmarks a user runs through `mlx-coach bench`: a short default that says what it measures on
stderr, `--full` for the long version, and bad flags refused in one line with exit code 2."""

import json
import sys

import pytest

from mlx_coach.cli import main
from mlx_coach.commands.learn_bench import SHORT, parse_args


@pytest.fixture(autouse=True)
def keep_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `bench` hands its arguments to the script in sys.argv


@pytest.mark.parametrize("argv", [["cache", "--entries", "0"], ["cache", "--group", "x"],
                                  ["distributed", "--steps", "0"], ["distributed", "--repeats", "-1"],
                                  ["sandbox", "--samples", "0"], ["step", "--steps", "0"]])
def test_bad_bench_flags_are_refused_in_one_line(capsys, argv):
    try:
        code = main(["bench", *argv])
    except SystemExit as stop:  # bench step's parser exits itself, so that it also works as a plain script
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and argv[1] in err, err


def test_bench_cache_reports_each_phase_on_stderr_and_its_rows_on_stdout(capsys):
    assert main(["bench", "cache", "--entries", "40", "--ops", "10", "--tasks", "4", "--steps", "6",
                 "--prompts-per-step", "2", "--group", "2"]) == 0
    out, err = capsys.readouterr()
    progress = [line for line in err.splitlines() if line.startswith("[bench cache]")]
    assert [line.split("]")[1].strip() for line in progress] == ["[1/2"] * 6 + ["[2/2"] * 6
    assert "40 entries" in progress[0] and "[bench cache]" not in out
    assert out.count("lru ") >= 2 and "Replay: 4 tasks" in out


def test_bench_learn_defaults_to_the_short_version_and_full_lifts_its_caps():
    short = parse_args(["-c", "configs/tiny.yaml"])
    assert (short.heldout_limit, short.humaneval_limit) == (SHORT["heldout_limit"], SHORT["humaneval_limit"]) != (0, 0)
    assert short.steps is None and not short.full  # run() caps training at SHORT["steps"]
    full = parse_args(["-c", "configs/tiny.yaml", "--full"])
    assert (full.heldout_limit, full.humaneval_limit) == (0, 0)
    explicit = parse_args(["-c", "configs/tiny.yaml", "--full", "--heldout-limit", "3", "--steps", "2"])
    assert (explicit.heldout_limit, explicit.humaneval_limit, explicit.steps) == (3, 0, 2)


def test_bench_rollout_mismatch_compares_the_sampler_with_the_training_forward(tmp_path, capsys):
    # float32 on one backend: the sampler's log-probs and the training forward's agree to float rounding, at
    # the sampling temperature; a log-prob taken at another temperature would be off by far more than 1e-3
    out = tmp_path / "mismatch.json"
    assert main(["bench", "rollout", "--mismatch", "--model", "builtin:tiny", "--dtype", "float32", "--prompts", "2",
                 "--group-size", "3", "--max-tokens", "12", "--prompt-len", "16", "--temperature", "0.7",
                 "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["mismatch"]
    assert row["dtype"] == "float32" and row["temperature"] == 0.7 and 6 <= row["tokens"] <= 6 * 12
    assert 0.0 <= row["sampler_mismatch"] <= row["max"] < 1e-3
    assert "builtin:tiny" in capsys.readouterr().out
