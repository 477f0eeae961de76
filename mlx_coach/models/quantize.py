"""Quantized bases: `quantize_folder` writes an HF-layout folder quantized the way mlx-lm's `convert -q` does
(its own `quantize_model` and `save`), and `builtin_quantized_path` caches the builtin tiny model so quantized.

The folder's config.json carries mlx-lm's "quantization" entry, so `mlx_lm.load`, `mlx_lm generate` and
`mlx_lm fuse` read it as they read an mlx-community model. Group size 64 and affine mode are mlx-community's.
"""

import contextlib
import io
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from mlx_coach.core.errors import UserError
from mlx_coach.models.builtin_tiny import builtin_tiny_path
from mlx_coach.models.folder import CACHE_ROOT, DTYPES, _atomic_folder, _one_line

QUANT_BITS = (4, 8)
GROUP_SIZE = 64


def quantize_folder(src: Path, dst: Path, *, bits: int, group_size: int = GROUP_SIZE, dtype=None) -> Path:
    """Quantize the HF-layout folder `src` into `dst` (absent or empty) and return `dst`.

    As `mlx_lm convert -q`: float parameters are first cast to `dtype` (None: config.json's `torch_dtype` when
    it names a float dtype, else kept as stored), then every Linear/Embedding whose input width is a multiple of
    `group_size` becomes packed weights plus scales and biases in that dtype. The scales' dtype is the compute
    dtype of the quantized layers (MLX promotes a product of mixed half dtypes to float32), so it is recorded
    as `torch_dtype`.
    """
    from mlx_lm.utils import load, quantize_model, save

    src, dst = Path(src), Path(dst)
    if bits not in QUANT_BITS:
        raise UserError(f"bits: expected one of {', '.join(map(str, QUANT_BITS))}, got {bits!r}")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst}: quantized folder target exists and is not empty")
    try:
        model, tokenizer, config = load(str(src), return_config=True, lazy=True)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UserError(f"{src}: cannot load model ({_one_line(e)})") from None
    if "quantization" in config:
        raise UserError(f"{src}: model is already quantized")
    if dtype is None and config.get("torch_dtype") in DTYPES:
        dtype = config["torch_dtype"]
    if dtype is not None:
        target = DTYPES[dtype]
        model.update(
            tree_map_with_path(lambda _, v: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v,
                               model.parameters())
        )
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints its bits per weight
        model, config = quantize_model(model, config, group_size, bits)
    if dtype is None:
        dtype = next(str(v.dtype).split(".")[-1] for k, v in tree_flatten(model.parameters())
                     if k.endswith(".scales"))
    config["torch_dtype"] = dtype
    save(dst, src, model, tokenizer, config, donate_model=False)
    return dst


def builtin_quantized_path(bits: int, seed: int = 0, dtype=None, cache_dir=None) -> Path:
    """The folder of `builtin:tiny-{bits}bit@seed`: builtin:tiny@seed quantized with scales in `dtype` (None:
    the tiny folder's float32), created on first use. One folder per dtype, since a quantized model computes
    in its scales' dtype."""
    dtype = dtype or "float32"
    root = Path(cache_dir or CACHE_ROOT).expanduser()
    target = root / f"builtin-tiny-{bits}bit-{dtype}-seed{seed}"
    if not (target / "config.json").exists():
        src = builtin_tiny_path(seed, cache_dir)
        with _atomic_folder(target) as tmp:
            quantize_folder(src, tmp, bits=bits, dtype=dtype)
    return target

