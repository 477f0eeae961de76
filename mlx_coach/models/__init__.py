"""Models: loading (`load_policy`), LoRA and the reference policy, GGUF, BPE, the builtin tiny model.

`loader` (every route ends in `mlx_lm.load` on an HF folder), `folder` (cache root, dtypes, atomic
folders), `bpe`, `builtin_tiny`, `gguf`, `lora`, `base_identity` (which base an adapter was trained
on). May import: core, runtime, telemetry. `load_policy` is re-exported here.
"""

from mlx_coach.models.loader import load_policy

__all__ = ["load_policy"]
