"""HF-layout model folders: where converted models are cached, parameter dtypes, creating a folder
atomically, and loading one with `mlx_lm.load` (the one loading path every model spec ends in)."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_coach.core.errors import UserError

CACHE_ROOT = Path(os.environ.get("MLX_COACH_CACHE", "~/.cache/mlx-coach")).expanduser()

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@contextlib.contextmanager
def _atomic_folder(target: Path):
    """Yield a temporary folder that replaces `target` when the block succeeds.

    Concurrent writers of the same target are fine: the first rename wins and the
    others' (identical) folders are discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _one_line(e, limit=300):
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quantized_layers(model) -> dict:
    """{name: module} of the model's quantized layers (QuantizedLinear, QuantizedEmbedding, mlx-lm's switch
    layers): modules holding packed weights with their scales and biases."""
    return {name: m for name, m in model.named_modules() if "scales" in m and hasattr(m, "bits")}


def stored_dtype(config, model) -> str:
    """What the model folder says its compute dtype is: config.json's `torch_dtype` when it names one of
    DTYPES, else the dtype holding most of the float parameters (a quantized model's scales included)."""
    named = config.get("torch_dtype")
    if named in DTYPES:
        return named
    sizes = {}
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            sizes[v.dtype] = sizes.get(v.dtype, 0) + v.size
    best = max(sizes, key=sizes.get, default=mx.float32)
    return next((name for name, d in DTYPES.items() if d == best), "float32")


def cast_floats(model, dtype: str):
    """Cast the float parameters to `dtype`, except a quantized layer's packed weights, scales and biases
    (left exactly as the quantization made them) and LoRA adapters (kept float32, mlx-lm's convention: the
    optimizer's small steps survive, and mlx-lm's LoRA layers cast their output to the input's dtype)."""
    target = DTYPES[dtype]
    frozen = {f"{layer}.{k}" if layer else k
              for layer in quantized_layers(model) for k in ("weight", "scales", "biases")}
    cast = [(k, v.astype(target)) for k, v in tree_flatten(model.parameters())
            if mx.issubdtype(v.dtype, mx.floating) and v.dtype != target and k not in frozen
            and ".lora_" not in f".{k}"]
    if cast:
        model.load_weights(cast, strict=False)
        mx.eval([v for _, v in cast])


def quantized_scales_dtype(model):
    """The dtype of the quantized layers' scales (None when the model has none, or they differ)."""
    kinds = {m.scales.dtype for m in quantized_layers(model).values()}
    return next(iter(kinds)) if len(kinds) == 1 else None


def _load_folder(path, dtype, adapter_path=None):
    """(model, tokenizer, info) of an HF-layout folder, its float parameters in `dtype` (None: the folder's).

    A quantized layer computes in its scales' dtype, and MLX promotes a product of float16 and bfloat16 to
    float32: a half dtype other than the scales' is refused rather than silently computed in float32.
    """
    import mlx_lm

    try:
        model, tokenizer, config = mlx_lm.load(
            str(path), adapter_path=adapter_path, return_config=True
        )
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UserError(f"{path}: cannot load model ({_one_line(e)})") from None
    dtype = dtype or stored_dtype(config, model)
    scales = quantized_scales_dtype(model)
    if scales is not None and dtype != "float32" and DTYPES[dtype] != scales:
        have = next(n for n, d in DTYPES.items() if d == scales)
        raise UserError(f"model.dtype: {path} is quantized with {have} scales, so its quantized layers compute "
                        f"in {have}; use dtype {have}, float32 or null (not {dtype})")
    cast_floats(model, dtype)
    info = {
        "path": str(Path(path).resolve()),
        "config": config,
        "dtype": dtype,
        "quantization": config.get("quantization"),
        "num_params": sum(v.size for _, v in tree_flatten(model.parameters())),
    }
    return model, tokenizer, info
