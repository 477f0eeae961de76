"""The Mac recipes run end to end here on a miniature of their model: `mlx-coach train` with each recipe's
exact settings but sizes (prompts per step, tokens, validation) on builtin:qwen2-mini-4bit, a random qwen2
model with Qwen2.5's tokenizer format and chat template, quantized as the recipes' mlx-community models are."""

import json
import re
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_coach.rl.trainer as trainer_module
from mlx_coach.cli import main
from mlx_coach.config.tree import load_config
from mlx_coach.models.builtin_qwen2 import QUANT_BITS, QUANT_GROUP_SIZE, QWEN_DEFAULT_SYSTEM, builtin_qwen2_path

CONFIGS = Path(__file__).parent.parent / "configs"
RECIPES = ("mac.yaml", "qwen2.5-coder-0.5b.yaml", "qwen2.5-coder-1.5b.yaml")
# the sizes a CI run changes; every other setting is the recipe's
SIZES = ("rollout.prompts_per_step=1", "rollout.max_new_tokens=12", "train.val_limit=2",
         "train.val_max_new_tokens=12")


@pytest.fixture(scope="module")
def mini():
    return builtin_qwen2_path(bits=QUANT_BITS)


@pytest.fixture
def mlx_limits_kept():
    """The recipes set MLX's memory and cache limits in this process: put them back after the run."""
    memory = mx.get_memory_limit()
    cache = mx.set_cache_limit(memory)
    mx.set_cache_limit(cache)
    yield
    mx.set_memory_limit(memory)
    mx.set_cache_limit(cache)


@pytest.fixture
def seen(monkeypatch):
    """What the trainer's rollouts saw: the policy model and every rollout (its prompt_ids are the tokens the
    model was given). Records only: generation runs unchanged."""
    record = {"models": [], "rollouts": []}
    real = trainer_module.generate_rollouts

    def recording(model, tokenizer, prompts, cfg=None, **kw):
        out = real(model, tokenizer, prompts, cfg, **kw)
        record["models"].append(model)
        record["tokenizer"] = tokenizer
        record["rollouts"].extend(out.rollouts)
        return out

    monkeypatch.setattr(trainer_module, "generate_rollouts", recording)
    return record


def _quantized(model):
    return {name: m for name, m in model.named_modules() if "scales" in m and hasattr(m, "bits")}


@pytest.mark.parametrize("recipe", RECIPES)
def test_mac_recipe_runs_end_to_end_on_its_miniature(recipe, mini, seen, mlx_limits_kept, tmp_path):
    cfg = load_config(CONFIGS / recipe)
    assert re.fullmatch(r"mlx-community/Qwen2\.5-Coder-[\d.]+B-Instruct-4bit", cfg.model.path)  # what mini stands for
    base_file = mini / "model.safetensors"
    base_bytes = base_file.read_bytes()
    run = tmp_path / "run"
    sets = [f"model.path={mini}", *SIZES]
    argv = ["train", "-c", str(CONFIGS / recipe), "--steps", "2", "--output", str(run)]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0

    # the run finished: two steps logged and the last one checkpointed
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss/total" in m] == [1, 2]
    ckpt = run / "checkpoints" / "step-2"
    assert (ckpt / "adapters.safetensors").is_file()

    # the prompt the model saw is the recipe's chat prompt in Qwen's ChatML template
    rollouts, tokenizer = seen["rollouts"], seen["tokenizer"]
    assert rollouts
    system = cfg.rollout.system_prompt or QWEN_DEFAULT_SYSTEM  # the template's own system message when none
    before, after = cfg.rollout.user_template.split("{prompt}")
    head = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{before}"
    tail = f"{after}<|im_end|>\n<|im_start|>assistant\n"
    for r in rollouts:
        text = tokenizer.decode(r.prompt_ids)
        assert text.startswith(head) and text.endswith(tail) and "def " in text[len(head):-len(tail)], text

    # LoRA trained on the quantized layers the recipe names, whose packed weights, scales and biases are the
    # folder's, bit for bit, after training; the folder itself is untouched
    model = seen["models"][-1]
    stored = mx.load(str(base_file))
    quantized = _quantized(model)
    assert quantized and all(m.bits == QUANT_BITS and m.group_size == QUANT_GROUP_SIZE for m in quantized.values())
    for name, layer in quantized.items():
        key = name.replace(".linear", "")  # a LoRA layer holds the quantized layer as `linear`
        for part in ("weight", "scales", "biases"):
            assert mx.array_equal(layer[part], stored[f"{key}.{part}"]).item() and \
                layer[part].dtype == stored[f"{key}.{part}"].dtype, f"{name}.{part}"
    assert base_file.read_bytes() == base_bytes
    adapted = {name.rsplit(".", 1)[0] for name, _ in tree_flatten(model.trainable_parameters())}
    n_layers = len(model.layers)
    expected_layers = range(n_layers - min(cfg.model.lora_layers, n_layers), n_layers)
    assert {int(a.split(".")[2]) for a in adapted} == set(expected_layers)
    if cfg.model.lora_keys:
        assert {a.split(".", 3)[3] for a in adapted} == set(cfg.model.lora_keys)
    assert all(f"{a}.linear" in quantized for a in adapted)

    # the adapters load with mlx-lm onto the quantized base they name, as a Mac user loads them
    import mlx_lm

    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert Path(config["model"]).resolve() == mini.resolve()
    loaded, _ = mlx_lm.load(str(mini), adapter_path=str(ckpt))
    saved = mx.load(str(ckpt / "adapters.safetensors"))
    mine = dict(tree_flatten(loaded.parameters()))
    assert all(mx.array_equal(saved[k], mine[k]).item() for k in saved)
    assert {a for a in _quantized(loaded) if a.endswith(".linear")} == {f"{a}.linear" for a in adapted}


def test_qwen2_mini_has_qwen25s_format_and_loads_by_its_spec(mini):
    from mlx_coach.models.loader import load_policy

    model, tokenizer, info = load_policy("builtin:qwen2-mini-4bit", dtype=None)
    assert Path(info["path"]) == mini.resolve() and info["config"]["model_type"] == "qwen2"
    assert info["quantization"]["bits"] == QUANT_BITS and info["quantization"]["group_size"] == QUANT_GROUP_SIZE
    assert info["config"]["tie_word_embeddings"] and "lm_head" not in dict(tree_flatten(model.parameters()))
    assert info["config"]["vocab_size"] > len(tokenizer.get_vocab())  # spare embedding rows, as Qwen2.5's
    # byte-level BPE: any text round-trips, merges apply, Qwen's added tokens are one id each, no BOS
    text = "def f(x):\n        return x.strip() + 'é→'\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and len(ids) < len(text.encode())
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer.encode(special)) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token is None
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == (f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")
