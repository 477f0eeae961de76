"""A model spec's architecture without loading its weights: `describe(spec)` for the memory plan.

Returns the mlx-lm config (HF names: hidden_size, num_hidden_layers, heads, intermediate_size, vocab_size,
tie_word_embeddings, and mlx-lm's "quantization" entry when the weights are quantized) plus "stored_dtype",
the float dtype the weights load in when `model.dtype` is null, and for a GGUF "disk_dtype", the dtype its
converted folder holds them in. Builtin specs come from code, folders from
their config.json, GGUF files from their header (metadata and tensor names, read without the tensor data).
A hub id is described from the local Hugging Face cache; one not there cannot be described before it is
downloaded (`describe` returns None; `huggingface-cli download REPO config.json` fetches what it needs).
`plan_run(cfg, tasks)` puts it together with the run's sizes into runtime/memory_plan.py's prediction, and
`machine()` says what this machine offers.
"""

import json
import struct
from dataclasses import replace
from pathlib import Path

from mlx_coach.core.errors import UserError
from mlx_coach.runtime.memory import _device_info, _physical_memory
from mlx_coach.runtime.memory_plan import Capacity, predict, refusal, shape_of
from mlx_coach.runtime.micro_batches import AUTO, auto_plan
from mlx_coach.models.builtin_qwen2 import builtin_qwen2_path
from mlx_coach.models.builtin_tiny import TINY_CONFIG, TINY_SPECIALS
from mlx_coach.models.gguf import gguf_config
from mlx_coach.models.loader import looks_like_hub_id, parse_builtin, smollm2_gguf

QUANT_GROUP_SIZE = 64  # what the builtin quantized models use (mlx-community's group size)


def describe(spec):
    """The architecture dict of a model spec (see the module docstring), or None for an undownloaded hub id."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        name, bits, seed = parse_builtin(spec)
        if name == "smollm2":
            config = describe_gguf(smollm2_gguf(spec))
            if bits:  # the Q4_1 weights kept quantized: GGUF's group of 32, float16 scales, which it computes in
                config["quantization"] = {"bits": 4, "group_size": 32, "scales_dtype": "float16"}
                config["stored_dtype"] = config["disk_dtype"] = "float16"
            return config
        if name == "qwen2-mini":  # a miniature of a few hundred kB: its folder (written once, as the loader does)
            return describe(str(builtin_qwen2_path(seed, bits=bits)))
        config = dict(TINY_CONFIG, vocab_size=256 + len(TINY_SPECIALS), stored_dtype="float32")
        if bits:  # quantized with its scales in the compute dtype (models/quantize.py)
            config["quantization"] = {"bits": bits, "group_size": QUANT_GROUP_SIZE}
        return config
    local = Path(spec).expanduser()
    if local.suffix == ".gguf" and local.is_file():
        return describe_gguf(local)
    if local.is_dir():
        try:
            config = json.loads((local / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"model: cannot read {local / 'config.json'} ({e})") from None
        # folder.stored_dtype would weigh the tensors when torch_dtype is absent; float32 is the plan's guess
        config["stored_dtype"] = config.get("torch_dtype") if config.get("torch_dtype") in FLOATS else "float32"
        return config
    cached = _hub_cache(spec)
    return describe(str(cached.parent)) if cached else None


def _hub_cache(repo):
    """config.json of a hub id in the local Hugging Face cache (no network), or None."""
    if not looks_like_hub_id(repo):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json")
    except Exception:  # no huggingface_hub, or a cache it cannot read: the size stays unknown
        return None
    return Path(found) if isinstance(found, str) else None


FLOATS = ("float32", "float16", "bfloat16")

# GGUF value types: struct format of the scalars; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Reader:
    def __init__(self, f):
        self.f = f

    def unpack(self, fmt):
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise ValueError("file ends inside the header")
        return struct.unpack(fmt, data)[0]

    def string(self):
        return self.f.read(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, kind):
        """A scalar or string; an array is returned as its length (the plan needs no array's items)."""
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item, n = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS:
                self.f.seek(n * struct.calcsize(_SCALARS[item]), 1)
            else:
                for _ in range(n):
                    self.value(item)
            return n
        raise ValueError(f"unknown GGUF value type {kind}")


def describe_gguf(path):
    """The architecture of a llama/qwen2 GGUF file from its header. Its conversion (models/gguf.py) holds
    dequantized tensors as float16 but says float32, the dtype it dequantizes in: a load without a dtype
    reads float16 and computes in float32."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            r = _Reader(f)
            if f.read(4) != b"GGUF":
                raise ValueError("not a GGUF file")
            r.unpack("<I")  # version
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            md = {}
            for _ in range(n_kv):
                key = r.string()
                md[key] = r.value(r.unpack("<I"))
            names = []
            for _ in range(n_tensors):
                names.append(r.string())
                dims = r.unpack("<I")
                f.seek(8 * dims + 4 + 8, 1)  # dims, type, offset
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path}: cannot read the GGUF header ({e})") from None
    config = gguf_config(md, path)
    arch = md.get("general.architecture")
    config["vocab_size"] = int(md.get(f"{arch}.vocab_size") or md.get("tokenizer.ggml.tokens") or 0)
    config["tie_word_embeddings"] = "output.weight" not in names
    config["stored_dtype"], config["disk_dtype"] = "float32", "float16"
    return config


SHARED_PROMPT_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # engine.logprobs.can_share_prompts, by model type


def plan_run(cfg, tasks):
    """(arch, RunShape, Plan) of the run `cfg` over `tasks` (their prompts set the prompt length), or None
    when the model cannot be described before loading (a hub id not on disk)."""
    arch = describe(cfg.model.path)
    if arch is None:
        return None
    longest = max((len(t.prompt) for t in tasks), default=0)
    shape = shape_of(cfg, arch, longest, share_prompts=arch.get("model_type") in SHARED_PROMPT_TYPES)
    if shape.grad_accum == AUTO:  # the count auto picks for the longest rows, the peak of its worst step
        count, plan = auto_plan(arch, shape, cfg.optim.micro_batch_gb)
        return arch, replace(shape, grad_accum=count), plan
    return arch, shape, predict(arch, shape)


def machine():
    """This machine's Capacity: physical memory, and Metal's recommended working set where there is one."""
    info = _device_info()
    working_set = info.get("max_recommended_working_set_size")
    physical = _physical_memory() or info.get("memory_size")
    return Capacity(physical=float(physical), working_set=float(working_set) if working_set else None)


def check_fits(cfg, tasks, capacity=None):
    """The run's plan (as plan_run), after refusing with UserError a run that cannot fit the machine."""
    planned = plan_run(cfg, tasks)
    if planned is not None:
        arch, shape, plan = planned
        reason = refusal(arch, shape, capacity or machine(), plan)
        if reason:
            raise UserError(reason)
    return planned
