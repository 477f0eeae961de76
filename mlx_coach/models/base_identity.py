"""Which base model an adapter was trained on, recorded in its adapter_config.json and checked
before the adapter is applied (`eval --adapter`, `train --resume`).

mlx-lm's own `model` key names a folder (for builtin models, the run's copy `RUN/base_model`), which
says nothing about `builtin:tiny` against `builtin:tiny@7`: both have the same shapes, so their
adapters load into each other without an error and silently mean nothing. The identity adds the
spec the user gave (`source`), the builtin seed, and a fingerprint of the base folder's files
(config.json and the weight files), so the same weights reached by another path (a hub id and its
downloaded folder, a run's base_model copy) still match, and other weights never do.
"""

import hashlib
import json
import re
from pathlib import Path

from mlx_coach.core.errors import UserError

KEY = "mlx_coach_base"
_WHOLE = 64 << 20  # files up to this size are hashed whole; bigger ones by size, head and tail
_PART = 4 << 20


def _file_digest(path, h):
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        if size <= _WHOLE:
            h.update(f.read())
        else:
            h.update(f.read(_PART))
            f.seek(size - _PART)
            h.update(f.read(_PART))


def fingerprint(folder) -> str:
    """sha256 over config.json and every *.safetensors file of an HF-layout model folder."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        if path.is_file():
            _file_digest(path, h)
    return h.hexdigest()[:16]


def identity(info) -> dict:
    """The base model's identity from load_policy's info: source spec, builtin seed, fingerprint."""
    source = str(info.get("source") or info.get("path"))
    out = {"source": source, "fingerprint": fingerprint(info["path"])}
    m = re.fullmatch(r"builtin:tiny(?:@(\d+))?", source)
    if m:
        out["seed"] = int(m.group(1) or 0)
    return out


def recorded(adapter_dir):
    """The identity stored in adapter_dir/adapter_config.json, or None (an mlx-lm adapter, or one
    written before identities were recorded)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a damaged checkpoint: its manifest check reports it (and resume
        return None                # falls back to an intact one); mlx-lm's loader refuses it in eval
    value = config.get(KEY) if isinstance(config, dict) else None
    return value if isinstance(value, dict) and "fingerprint" in value else None


def check(adapter_dir, info, flag):
    """UserError naming both models when the adapter in adapter_dir was trained on another base."""
    want = recorded(adapter_dir)
    if want is None:
        return
    have = identity(info)
    if want["fingerprint"] != have["fingerprint"]:
        raise UserError(f"{flag}: {adapter_dir} was trained on {want.get('source')} "
                        f"(base fingerprint {want['fingerprint']}), not on {have['source']} "
                        f"(fingerprint {have['fingerprint']}); give the model it was trained on")
