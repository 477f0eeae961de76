"""Bad input through the CLI: exit code 2, one line on stderr naming what is wrong, no traceback, before any model
loads (each case runs in this process through cli.main; a case that got as far as loading a model or starting a
run would take seconds, not milliseconds). Sizes that cannot fit the machine are tests/test_memory_plan's."""

import sys

import pytest

from mlx_coach.cli import main

# (case, YAML text of the config or None for the defaults, extra arguments, what the line must name)
CONFIG_CASES = [
    ("nan temperature", "rollout:\n  temperature: .nan\n", [], "rollout.temperature"),
    ("inf learning rate", "optim:\n  lr: .inf\n", [], "optim.lr"),
    ("nan of an optional number", "algo:\n  epsilon_high: .nan\n", [], "algo.epsilon_high"),
    ("inf in a list", "train:\n  debug_nan_steps: [1, .inf]\n", [], "train.debug_nan_steps[1]"),
    ("-inf in a reward item", "rewards:\n  - type: tests\n    weight: -.inf\n", [], "rewards[0].weight"),
    ("nan by --set", None, ["--set", "rollout.temperature=nan"], "rollout.temperature"),
    ("inf by --set", None, ["--set", "optim.lr=.inf"], "optim.lr"),
    ("duplicate key", "rollout:\n  temperature: 1.0\n  group_size: 2\n  temperature: 0.5\n", [],
     "duplicate key 'temperature' (first at line 2)"),
    ("duplicate section", "algo:\n  beta: 0.1\noptim:\n  lr: 0.001\nalgo:\n  beta: 0.2\n", [], ":5: duplicate key 'algo'"),
    ("empty file", "", [], "holds no settings"),
    ("comments only", "# nothing yet\n", [], "holds no settings"),
    ("template field", "rollout:\n  user_template: \"{task_id}: {prompt}\"\n", [],
     "'rollout.user_template' names an unknown field {task_id}; known: {prompt}"),
    ("teacher server with no judge", "teacher_server:\n  model: builtin:tiny\n", [], "teacher_server.model"),
    ("server setting without a server", "teacher_server:\n  decode_concurrency: 4\n", [],
     "teacher_server.decode_concurrency"),
    ("judge setting on a tests reward", "rewards:\n  - type: tests\n    timeout_s: 5\n", [], "rewards[0].timeout_s"),
    ("teacher setting on a function reward", "rewards:\n  - type: function\n    function: m:f\n    batch_size: 2\n",
     [], "rewards[0].batch_size"),
    ("function of a tests reward", "rewards:\n  - type: tests\n  - type: tests\n    function: m:f\n", [],
     "rewards[1].function"),
    ("store in a missing folder", None, ["--set", "cache.sqlite_path={tmp}/absent/scores.sqlite"],
     "cache.sqlite_path"),
    ("store where nobody may write", None, ["--set", "cache.sqlite_path=/proc/self/scores.sqlite"],
     "cache.sqlite_path"),
    ("store that is a folder", None, ["--set", "cache.sqlite_path={tmp}"], "cache.sqlite_path"),
]

COMMAND_CASES = [
    ("bench sandbox without workers", ["bench", "sandbox", "--workers", "0"], "--workers"),
    ("bench levels of no tasks", ["bench", "levels", "--tasks", "-1"], "--tasks"),
    ("eval of a config with a nan", ["eval", "-c", "{nan_config}"], "rollout.temperature"),
    ("eval with neither model nor config", ["eval"], "--model"),
    ("eval with --set and no config", ["eval", "--model", "builtin:tiny", "--set", "rollout.temperature=0"], "-c"),
]


def _refused(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def keep_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `bench` hands its arguments to the script in sys.argv


@pytest.mark.parametrize("command", ["train", "eval"])
def test_bad_configs_are_refused_in_one_line(tmp_path, capsys, command):
    failures = []
    for case, text, extra, named in CONFIG_CASES:
        argv = [command]
        if text is not None:
            path = tmp_path / "cfg.yaml"
            path.write_text(text)
            argv += ["-c", str(path)]
        elif command == "eval":
            argv += ["-c", str(tmp_path / "defaults.yaml")]
            (tmp_path / "defaults.yaml").write_text("{}\n")
        argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
        argv += ["--output", str(tmp_path / "out")]
        code, err = _refused(capsys, argv)
        if code != 2 or err.count("\n") != 1 or named not in err or "Traceback" in err:
            failures.append((case, code, err))
    assert not failures
    assert not (tmp_path / "out").exists()  # refused before the run (or the eval) began


def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys, keep_argv):
    nan_config = tmp_path / "nan.yaml"
    nan_config.write_text("rollout:\n  temperature: .nan\n")
    failures = []
    for case, argv, named in COMMAND_CASES:
        code, err = _refused(capsys, [a.replace("{nan_config}", str(nan_config)) for a in argv])
        if code != 2 or err.count("\n") != 1 or named not in err or "Traceback" in err:
            failures.append((case, code, err))
    assert not failures


def test_a_config_asking_for_the_defaults_is_accepted(tmp_path):
    from mlx_coach.config.tree import load_config

    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    assert load_config(path) == load_config(None)


def test_a_tuning_setting_stays_accepted_in_an_arm_that_turns_its_setting_off():
    """`ab --policies lru,ttl` on a config with ttl_s: the lru arm is a valid run."""
    from mlx_coach.config.tree import load_config

    cfg = load_config(None, ["cache.ttl_s=60", "cache.policy=lru", "algo.tis_cap=2.0", "optim.min_lr_ratio=0.1"])
    assert cfg.cache.ttl_s == 60 and cfg.cache.policy == "lru"
