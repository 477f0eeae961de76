import dataclasses

import pytest

from mlx_coach.config.tree import Config, from_dict, load_config, to_dict
from mlx_coach.core.errors import UserError


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
    (["rollout.chat_template=3"], "rollout.chat_template"),
    (["model.chat_template=true"], "rollout.chat_template"),  # moved: the message names the new key
    (["telemetry.kl_max=2"], "alerts.kl_max"),
    (["rollout.prefill_step=0"], "rollout.prefill_step"),
    (["memory.oom_min_batch=0"], "memory.oom_min_batch"),
    (["alerts.cooldown_steps=-1"], "alerts.cooldown_steps"),
    (["rewards.0.temperature=-1"], "rewards[0].temperature"),
    (["algo.kl_estimator=k1", "algo.beta=0.1"], "algo.kl_estimator"),
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


def test_k1_is_refused_in_the_loss_but_allowed_in_the_reward():
    with pytest.raises(UserError, match="zero expected gradient"):
        load_config(None, ["algo.kl_estimator=k1", "algo.kl_in=loss"])
    cfg = load_config(None, ["algo.kl_estimator=k1", "algo.kl_in=reward"])
    assert cfg.algo.kl_estimator == "k1"
    assert load_config(None, ["algo.kl_estimator=k1", "algo.beta=0"]).algo.beta == 0.0  # no KL term at all


def _leaves(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        elif f.name == "rewards":
            for i, item in enumerate(value):
                yield from _leaves(item, f"rewards.{i}.")
        else:
            yield f"{prefix}{f.name}", f


def test_every_field_of_every_section_is_reachable_with_set_and_range_checked():
    """One source of truth: each section is a module's dataclass, so every field (including the ones the
    old copies left out) can be set from --set, and a declared range is enforced under its dotted key."""
    import yaml

    defaults = load_config()
    names = [name for name, _ in _leaves(defaults)]
    for name in ("rollout.prefill_step", "rollout.system_prompt", "memory.clear_min_cache_gb",
                 "memory.oom_min_batch", "alerts.kl_max", "alerts.window", "rewards.0.temperature"):
        assert name in names
    checked = 0
    for name, f in _leaves(defaults):
        value = getattr(defaults, name.split(".")[0])
        for part in name.split(".")[1:]:
            value = value[int(part)] if part.isdigit() else getattr(value, part)
        cfg = load_config(None, [f"{name}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"])
        assert to_dict(cfg) == to_dict(defaults), name
        lo = f.metadata.get("lo")
        if lo is not None and f.name not in ("lora_layers",):
            with pytest.raises(UserError) as e:
                load_config(None, [f"{name}={lo - 1}"])
            assert name.replace(".0.", "[0].").replace("rewards.0", "rewards[0]") in str(e.value), (name, str(e.value))
            checked += 1
    assert checked > 40


def test_module_configs_validate_like_the_loader():
    """Built in code, a section checks the same ranges as from YAML (one validator)."""
    from mlx_coach.rewards.cache import CacheConfig
    from mlx_coach.runtime.memory import MemoryConfig
    from mlx_coach.engine.rollout import RolloutConfig

    for make, key in ((lambda: RolloutConfig(top_p=0), "rollout.top_p"),
                      (lambda: CacheConfig(maxsize=0), "cache.maxsize"),
                      (lambda: MemoryConfig(clear_fraction=2.0), "memory.clear_fraction")):
        with pytest.raises(UserError, match=key):
            make()


def test_dependency_floors_cover_what_the_code_relies_on():
    """mlx arrays are used from two threads (the local teacher scores in a worker thread), safe from
    mlx 0.31.2; the TTL policies use TLRUCache.expire's return value, which cachetools has from 5.5."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    deps = re.findall(r'^\s*"([^"]+)",', text.split("dependencies = [", 1)[1].split("]\n", 1)[0], re.M)

    def floor(name):
        spec = next(d for d in deps if re.match(rf"{re.escape(name)}(\[[^\]]*\])?\s*>=", d))
        return tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))

    assert floor("mlx") >= (0, 31, 2) and floor("mlx[cpu]") >= (0, 31, 2)
    assert floor("cachetools") >= (5, 5)
