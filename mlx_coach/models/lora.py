"""LoRA adapters (mlx-lm's layers) and their adapter_config.json, full fine-tuning, and the KL
reference: the same weights with adapters switched off, or a frozen copy."""

import contextlib
import copy
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_coach.core.errors import UserError
from mlx_coach.core.keys import draw_key


def _lora_layer_types():
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    return (LoRALinear, LoRAEmbedding, LoRASwitchLinear)


def apply_lora(model, *, rank=8, alpha=16, dropout=0.0, num_layers=-1, keys=None, seed=0) -> dict:
    """Freeze the model and put LoRA adapters on the last `num_layers` blocks (-1: all).

    The adapter output is scaled by alpha / rank (mlx-lm's `scale`). keys: module names
    inside a block (e.g. ["self_attn.q_proj", "self_attn.v_proj"]); None: every linear layer.
    The adapters' starting weights are drawn from `seed` (see `init_lora_weights`).
    Returns the LoRA part of the adapter config (see `adapter_config`).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n = len(model.layers)
    if num_layers == 0 or num_layers < -1:
        # mlx-lm reads 0 as "all layers"; refuse it rather than surprise
        raise UserError(f"lora.num_layers: must be >= 1, or -1 for all, got {num_layers}")
    if num_layers < 0 or num_layers > n:
        num_layers = n
    if rank < 1:
        raise UserError(f"lora.rank: must be >= 1, got {rank}")
    params = {
        "rank": int(rank),
        "scale": float(alpha) / float(rank),
        "dropout": float(dropout),
        "keys": list(keys) if keys is not None else None,
    }
    model.freeze()
    linear_to_lora_layers(model, num_layers, params)
    init_lora_weights(model, seed)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}


def init_lora_weights(model, seed):
    """Redraw every adapter's A matrix from the key (seed, "lora_init", its parameter name); B stays zero.

    mlx-lm draws A from MLX's global generator, whose position depends on everything drawn before
    (building a model, converting a GGUF): keyed by name, the starting adapters depend on the seed and
    the layer alone. The distribution is mlx-lm's: uniform in +-1/sqrt(fan_in), fan_in being the input
    width A multiplies (the rows of a linear or embedding adapter's A, the last axis of a switch layer's).
    """
    switch = _lora_layer_types()[2]
    drawn = []
    for name, module in model.named_modules():
        if "lora_a" not in module:
            continue
        for param, a in tree_flatten(module["lora_a"], prefix=f".{name}.lora_a" if name else ".lora_a"):
            bound = (a.shape[-1] if isinstance(module, switch) else a.shape[0]) ** -0.5
            key = draw_key(seed, "lora_init", param)
            drawn.append((param, mx.random.uniform(-bound, bound, a.shape, a.dtype, key=key)))
    model.load_weights(drawn, strict=False)
    mx.eval([a for _, a in drawn])


def adapter_config(base_model, lora=None) -> dict:
    """adapter_config.json content in mlx-lm's format.

    base_model: path (or hub id) of the base model (info["path"] from load_policy).
    lora: what `apply_lora` returned; None for full fine-tuning.
    """
    if lora is None:
        return {"model": str(base_model), "fine_tune_type": "full", "num_layers": -1}
    return {"model": str(base_model), **copy.deepcopy(lora)}


def save_adapters(model, folder, config=None) -> Path:
    """Write the model's trainable parameters to folder/adapters.safetensors (mlx-lm names).

    With `config` (from adapter_config), also writes folder/adapter_config.json.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def unfreeze_all(model):
    """Full fine-tuning: every parameter trainable."""
    model.unfreeze()
    return model


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the base model: inside the block every LoRA layer is replaced by the base layer it wraps
    (its `linear` or `embedding`), so the adapters are not computed at all; restored after. A LoRA
    layer without one falls back to scale 0.

    Only Python attributes change, so do not call this inside an `mx.compile`d function (compiled
    graphs bake in the modules); compute reference log-probs outside of it.
    """
    swapped, scaled = [], []
    lora_types = _lora_layer_types()
    for _, parent in model.named_modules():  # the model itself included
        for key, child in list(_children(parent)):
            if not isinstance(child, lora_types):
                continue
            base = getattr(child, "linear", None) or getattr(child, "embedding", None)
            if base is None:
                scaled.append((child, child.scale))
                child.scale = 0.0
            else:
                swapped.append((parent, key, child))
                _set_child(parent, key, base)
    try:
        yield model
    finally:
        for parent, key, child in swapped:
            _set_child(parent, key, child)
        for child, scale in scaled:
            child.scale = scale


def _children(module):
    """(key, child module) of a module's direct children; a list's items as ((name, index), child)."""
    for name, value in module.items():
        if isinstance(value, nn.Module):
            yield name, value
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, nn.Module):
                    yield (name, i), item


def _set_child(parent, key, child):
    if isinstance(key, tuple):
        parent[key[0]][key[1]] = child
    else:
        setattr(parent, key, child)


def frozen_copy(model):
    """A frozen deep copy of the model: the KL reference for full fine-tuning."""
    ref = copy.deepcopy(model)
    ref.freeze()
    ref.eval()
    return ref
