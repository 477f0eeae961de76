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


def _load_folder(path, dtype, adapter_path=None):
    import mlx_lm

    try:
        model, tokenizer, config = mlx_lm.load(
            str(path), adapter_path=adapter_path, return_config=True
        )
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UserError(f"{path}: cannot load model ({_one_line(e)})") from None
    if dtype is not None:
        model.set_dtype(DTYPES[dtype])
        mx.eval(model.parameters())
    info = {
        "path": str(Path(path).resolve()),
        "config": config,
        "dtype": dtype,
        "num_params": sum(v.size for _, v in tree_flatten(model.parameters())),
    }
    return model, tokenizer, info
