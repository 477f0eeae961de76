"""Atomic, resumable checkpoints: `RUN/checkpoints/step-N/`.

A checkpoint folder holds mlx-lm-compatible `adapters.safetensors` + `adapter_config.json`
(for full fine-tuning: all trainable weights, `fine_tune_type: full`), `optimizer.safetensors`,
`state.json` (step, epoch, data position, RNG, controllers) and `cache.json` (the score cache).
It is written into a hidden temporary folder and renamed into place, so a crash leaves either
the previous checkpoint or the new one, never half of one.
"""

import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir, step, model, optimizer, state, adapter_config, cache_snapshot=None):
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    for stale in root.glob(".*-step-*"):  # left by a run killed while writing (one writer per run dir)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    tmp.mkdir()
    trainable = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(tmp / "adapters.safetensors"), trainable)
    _write_json(tmp / "adapter_config.json", adapter_config)
    opt_state = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
    _write_json(tmp / "state.json", state)
    if cache_snapshot is not None:
        _write_json(tmp / "cache.json", cache_snapshot)
    if final.exists():  # re-saving a step after a resume: swap, then drop the old one
        old = root / f".old-step-{step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    return final


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(run_dir):
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir):
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path, model, optimizer):
    """Load weights and optimizer state into place; return (state dict, cache snapshot or None)."""
    path = Path(path)
    weights = mx.load(str(path / "adapters.safetensors"))
    model.load_weights(list(weights.items()), strict=False)
    opt = mx.load(str(path / "optimizer.safetensors"))
    optimizer.state = tree_unflatten(list(opt.items()))
    state = json.loads((path / "state.json").read_text())
    cache_file = path / "cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else None
    mx.eval(model.parameters(), optimizer.state)
    return state, cache
