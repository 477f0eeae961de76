"""Atomic, resumable checkpoints: `RUN/checkpoints/step-N/`.

A checkpoint folder holds mlx-lm-compatible `adapters.safetensors` + `adapter_config.json`
(for full fine-tuning: all trainable weights, `fine_tune_type: full`), `optimizer.safetensors`,
`state.json` (step, epoch, data position, RNG, controllers) and `cache.json` (the score cache).
It is written into a hidden temporary folder and renamed into place, so a crash leaves either
the previous checkpoint or the new one, never half of one. A write that fails (disk full,
read-only, no permission) removes the temporary folder and raises WriteFailed naming the step and
the folder: the previous checkpoint stays the newest. `manifest.json`, written last, holds
each file's size and sha256: loading verifies them (and that the weights fit the model) before
anything is applied, so a damaged checkpoint is refused whole and `load_latest_intact` falls back
to the newest intact one.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_coach.runtime.stops import WriteFailed

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


class CheckpointError(Exception):
    """A checkpoint folder that cannot be loaded as written (truncated, corrupt, mismatched)."""


def _digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def write_safetensors(path, arrays):
    """`arrays` as a safetensors file, fsynced. Written through a Python file, so that a failed write
    is an OSError with its errno (a path gives MLX's RuntimeError with neither); the bytes are the same."""
    with open(path, "wb") as f:
        mx.save_safetensors(f, arrays)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir, step, model, optimizer, state, adapter_config, cache_snapshot=None):
    """Write `RUN/checkpoints/step-N/` whole, or raise WriteFailed and leave the folder as it was."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*-step-*"):  # left by a run killed while writing (one writer per run dir)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        write_safetensors(tmp / "adapters.safetensors", dict(tree_flatten(model.trainable_parameters())))
        _write_json(tmp / "adapter_config.json", adapter_config)
        write_safetensors(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
        _write_json(tmp / "state.json", state)
        if cache_snapshot is not None:
            _write_json(tmp / "cache.json", cache_snapshot)
        _write_json(tmp / MANIFEST, {p.name: _digest(p) for p in sorted(tmp.iterdir())})
        _put_in_place(tmp, final)
    except BaseException as e:  # a failed write, or a second Ctrl-C mid-save: no half folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise WriteFailed(f"cannot save checkpoint {final.name} in {root} ({e.strerror or e})") from None
        raise
    _fsync_dir(root)
    return final


def _put_in_place(tmp, final):
    if not final.exists():
        os.replace(tmp, final)
        return
    # re-saving a step after a resume: swap, then drop the old one
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)  # what is left is swept by the next save


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


def read_checkpoint(path, model=None):
    """Read and verify a checkpoint without applying it: (weights, optimizer state, state dict,
    cache snapshot or None). Raises CheckpointError naming what is wrong."""
    path = Path(path)
    try:
        manifest = path / MANIFEST
        if manifest.is_file():  # checkpoints written before the manifest existed have none
            for name, want in json.loads(manifest.read_text()).items():
                if not (path / name).is_file():
                    raise CheckpointError(f"{name} is missing")
                if _digest(path / name) != want:
                    raise CheckpointError(f"{name} does not match its manifest (truncated or changed)")
        weights = mx.load(str(path / "adapters.safetensors"))
        opt = mx.load(str(path / "optimizer.safetensors"))
        state = json.loads((path / "state.json").read_text())
        cache_file = path / "cache.json"
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else None
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # mx.load raises RuntimeError/ValueError on bad files
        raise CheckpointError(f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError("state.json holds no step")
    if model is not None:
        want = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
        got = {k: v.shape for k, v in weights.items()}
        if want != got:
            raise CheckpointError("adapters.safetensors does not fit the model (other keys or shapes)")
    return weights, opt, state, cache


def load_checkpoint(path, model, optimizer):
    """Verify, then load weights and optimizer state into place; return (state dict, cache snapshot or None)."""
    weights, opt, state, cache = read_checkpoint(path, model)
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(opt.items()))
    mx.eval(model.parameters(), optimizer.state)
    return state, cache


def load_latest_intact(run_dir, model, optimizer, warn):
    """Load the newest checkpoint that verifies. The damaged newer ones are then renamed to
    `damaged-step-N` (kept for inspection, never tried again), each reported through `warn`.
    Returns (path, state, cache snapshot); when none is intact, nothing is renamed and
    CheckpointError says what is wrong with the newest."""
    damaged = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            weights, opt, state, cache = read_checkpoint(path, model)
        except CheckpointError as e:
            damaged.append((path, e))
            continue
        for bad, why in damaged:
            target = bad.with_name(f"damaged-{bad.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(bad, target)
            warn(f"checkpoint {bad} is damaged ({why}); moved to {target.name}, using {path.name}")
        model.load_weights(list(weights.items()), strict=False)
        optimizer.state = tree_unflatten(list(opt.items()))
        mx.eval(model.parameters(), optimizer.state)
        return path, state, cache
    if damaged:
        raise CheckpointError(f"{damaged[0][0].name}: {damaged[0][1]}" +
                              (f" (and {len(damaged) - 1} older)" if len(damaged) > 1 else ""))
    raise CheckpointError("none found")
