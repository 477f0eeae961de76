"""Every random draw of a run comes from a key of (seed, purpose, ids) (issue 28 item 6): the same key in
every process, other keys for other purposes and ids, LoRA starting weights and samples that depend on
nothing drawn before them or beside them, and a run that is the same with an empty or a filled model cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from mlx.utils import tree_flatten

from mlx_coach.core.keys import draw_key, draw_seed
from mlx_coach.engine.rollout import RolloutConfig, generate_rollouts
from mlx_coach.engine.sampling import SampleKeys
from mlx_coach.models.builtin_tiny import init_weights
from mlx_coach.models.loader import load_policy
from mlx_coach.models.lora import apply_lora

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 300  # a failure bound: only a hung run reaches it

CASES = [(0, "lora_init", "model.layers.0.self_attn.q_proj.lora_a"), (0, "sample", 3, 1, 2), (7, "dropout", 1, 0)]


def keys_in_a_new_process(hash_seed):
    code = ("import json, sys; from mlx_coach.core.keys import draw_key, draw_seed; cases = json.loads(sys.argv[1]); "
            "print(json.dumps([[draw_seed(*c), draw_key(*c).tolist()] for c in cases]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(CASES)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONHASHSEED": str(hash_seed)}, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_key_is_the_same_in_every_process():
    here = [[draw_seed(*c), draw_key(*c).tolist()] for c in CASES]
    # string hashing is salted per process: two other salts, the same keys
    assert keys_in_a_new_process(1) == here
    assert keys_in_a_new_process(2) == here


def test_other_purposes_and_ids_give_other_keys():
    variants = [(0, "sample", 1, 2), (0, "sample", 2, 1), (0, "sample", 12), (0, "sample", 1, 2, 0),
                (0, "sample", "1", 2), (0, "dropout", 1, 2), (1, "sample", 1, 2), (0, "sample"), (0, "sample", "12")]
    assert len({draw_seed(*v) for v in variants}) == len(variants)
    assert len({tuple(draw_key(*v).tolist()) for v in variants}) == len(variants)
    assert draw_seed(0, "sample", 1, 2) == draw_seed(0, "sample", 1, 2)


def test_a_key_refuses_parts_that_have_no_canonical_encoding():
    for bad in [(0, "sample", 1.0), (0, "sample", True), (0, "sample", None), (0, "")]:
        with pytest.raises(TypeError):
            draw_seed(*bad)


def lora_start(seed, global_draws):
    """The starting adapters of the builtin tiny model after `global_draws` draws from MLX's global generator."""
    model, _, _ = load_policy("builtin:tiny")
    mx.random.seed(1234)
    mx.random.uniform(shape=(global_draws,))
    apply_lora(model, rank=4, seed=seed)
    return dict(tree_flatten(model.trainable_parameters()))


def test_lora_starting_weights_depend_on_the_seed_alone():
    a, b, c = lora_start(0, 1), lora_start(0, 1000), lora_start(1, 1)
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    drawn = [k for k in a if k.endswith("lora_a")]
    assert drawn and not any(mx.array_equal(a[k], c[k]).item() for k in drawn)
    assert len({a[k].sum().item() for k in drawn}) == len(drawn)  # each layer its own draw


def test_the_builtin_init_leaves_the_global_generator_alone():
    model, _, _ = load_policy("builtin:tiny")
    mx.random.seed(5)
    expected = mx.random.uniform(shape=(4,))
    mx.random.seed(5)
    init_weights(model, seed=3)
    assert mx.array_equal(mx.random.uniform(shape=(4,)), expected).item()


PROMPTS = ["def add(a, b):\n", "def f(x):\n    return", "# sort a list\ndef s(xs):\n", "class A:\n", "x = 1\n",
           "import os\n"]


def sampled(model, tok, prompts, first_place=0, **rollout):
    cfg = RolloutConfig(**{"group_size": 3, "max_new_tokens": 16, "temperature": 1.0, "stop": [], **rollout})
    batch = generate_rollouts(model, tok, prompts, cfg, keys=SampleKeys(11, (4,), first_place))
    return [r.token_ids for r in batch.rollouts]


def test_a_sample_does_not_depend_on_its_batch_or_split():
    model, tok, _ = load_policy("builtin:tiny")
    whole = sampled(model, tok, PROMPTS)
    mx.random.seed(99)  # the global generator's position is no input
    assert sampled(model, tok, PROMPTS, continuous=False, max_batch_tokens=150) == whole
    assert sampled(model, tok, PROMPTS, max_batch_tokens=100) == whole  # fewer rows at once, refilled
    # two ranks' shares, each handed the place of its first task in the step
    assert sampled(model, tok, PROMPTS[:2]) + sampled(model, tok, PROMPTS[2:], first_place=2) == whole
    assert sampled(model, tok, PROMPTS[2:]) != whole[6:]  # the place is part of the key
    assert len({tuple(t) for t in whole[:3]}) > 1  # a prompt's samples draw differently


def train(cache, run):
    """`mlx-coach train` for two steps of the builtin tiny model with its model cache at `cache`: the bytes of
    the starting adapters and of the final ones."""
    run.parent.mkdir(parents=True)
    tasks = run.parent / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"task_id": f"s/{i}", "prompt": f"def f{i}(x):\n", "entry_point": f"f{i}",
                                         "test": "def check(c):\n    assert c(1) == 1\n"}) + "\n" for i in range(8)))
    config = run.parent / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": "builtin:tiny", "lora_rank": 4, "lora_dropout": 0.1},
        "data": {"tasks": str(tasks), "val_fraction": 0.25},
        "rollout": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8, "temperature": 1.0},
        "train": {"steps": 2, "checkpoint_every": 0, "epochs_val": False, "seed": 3},
        "telemetry": {"progress": False, "tensorboard": False, "report": False},
        "rewards": [{"type": "function", "function": "mlx_coach.rewards.shaping:code_charset"}],
    }))
    proc = subprocess.run([sys.executable, "-m", "mlx_coach", "train", "-c", str(config), "--output", str(run)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MLX_COACH_CACHE": str(cache)},
                          timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: (run / name).read_bytes()
            for name in ("initial_trainable.safetensors", "checkpoints/step-2/adapters.safetensors")}


def test_an_empty_and_a_filled_model_cache_give_the_same_adapters(tmp_path):
    cache = tmp_path / "cache"
    first = train(cache, tmp_path / "empty-cache" / "run")  # builds builtin:tiny into the empty cache
    assert any(cache.iterdir())
    second = train(cache, tmp_path / "filled-cache" / "run")  # loads it from there
    assert first == second  # byte for byte: the starting adapters and those after two steps
