"""LoRA adapters (mlx-lm's layers) and their adapter_config.json, full fine-tuning, and the KL
reference: the same weights with adapters switched off, or a frozen copy."""

import contextlib
import copy
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_coach.core.errors import UserError


def _lora_layer_types():
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    return (LoRALinear, LoRAEmbedding, LoRASwitchLinear)


def apply_lora(model, *, rank=8, alpha=16, dropout=0.0, num_layers=-1, keys=None) -> dict:
    """Freeze the model and put LoRA adapters on the last `num_layers` blocks (-1: all).

    The adapter output is scaled by alpha / rank (mlx-lm's `scale`). keys: module names
    inside a block (e.g. ["self_attn.q_proj", "self_attn.v_proj"]); None: every linear layer.
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
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}


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
    """Run the base model: every LoRA layer's scale is 0 inside the block, restored after.

    Only Python attributes change, so do not call this inside an `mx.compile`d function
    (compiled graphs bake in the scale); compute reference log-probs outside of it.
    """
    layers = [m for _, m in model.named_modules() if isinstance(m, _lora_layer_types())]
    saved = [m.scale for m in layers]
    try:
        for m in layers:
            m.scale = 0.0
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.scale = s


def frozen_copy(model):
    """A frozen deep copy of the model: the KL reference for full fine-tuning."""
    ref = copy.deepcopy(model)
    ref.freeze()
    ref.eval()
    return ref
