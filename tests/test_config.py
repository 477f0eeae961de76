import pytest

from mlx_coach.config import Config, from_dict, load_config, to_dict
from mlx_coach.errors import UserError


def test_defaults_round_trip():
    cfg = load_config()
    assert from_dict(to_dict(cfg)) == cfg
    assert cfg.rewards[0].type == "tests"


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algo:\n  beta: 0.1\nrewards:\n  - type: tests\n  - type: function\n    function: m:f\n    weight: 0.5\n")
    cfg = load_config(p, ["algo.beta=0.2", "optim.lr=3e-4", "rewards.1.weight=2", "rollout.stop=[a, b]",
                          "algo.epsilon_high=null"])
    assert cfg.algo.beta == 0.2 and cfg.optim.lr == pytest.approx(3e-4)
    assert [r.type for r in cfg.rewards] == ["tests", "function"] and cfg.rewards[1].weight == 2.0
    assert cfg.rollout.stop == ["a", "b"] and cfg.algo.epsilon_high is None


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config), path


@pytest.mark.parametrize("override, key", [
    (["algo.betta=1"], "algo.betta"),
    (["nosection.x=1"], "nosection"),
    (["algo.beta=-1"], "algo.beta"),
    (["algo.advantage=ppo"], "algo.advantage"),
    (["train.steps=1.5"], "train.steps"),
    (["train.steps=abc"], "train.steps"),
    (["model.chat_template=3"], "model.chat_template"),
    (["rollout.top_p=0"], "rollout.top_p"),
    (["rollout.group_size=1"], "rollout.group_size"),
    (["rewards.0.type=function"], "rewards[0].function"),
    (["telemetry.phase_bounds=[0.7, 0.2]"], "telemetry.phase_bounds"),
    (["rewards.5.weight=1"], "rewards.5"),
    (["algo"], "algo"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError) as e:
        load_config(None, override)
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("algo:\n  beta: 0.1\n  x: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+"):
        load_config(p)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
