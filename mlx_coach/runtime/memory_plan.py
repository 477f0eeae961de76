"""A run's memory, predicted before any model is loaded: `predict(arch, shape)` -> `Plan`.

Pure arithmetic on the model's architecture (models/size.py `describe`: the config.json names) and the
run's sizes (`RunShape`, built from a config by `shape_of`). All figures are bytes; d is the compute
dtype's width (4 float32, 2 bfloat16/float16).

The model (what is alive at the highest point of each phase):
    weights      float parameters x d; a quantized linear or embedding (input width a multiple of the group
                 size) as packed weights (bits / 8 per weight) plus a scale and a bias per group, in the
                 scales' dtype (quantization["scales_dtype"], else d)
    reference    full fine-tune: a frozen copy of the weights; LoRA: none (the base with adapters off)
    trainable    LoRA: rank x (in + out) per adapted linear of the last lora_layers blocks (lora_keys, else
                 every linear); full: every float parameter. LoRA adapters are float32 whatever d is
                 (models/folder.py cast_floats); held as the parameters, the run's starting copy and AdamW's
                 two moments. Full: AdamW's two moments in d
    load         mlx-lm reads the stored weights, then casts them: stored and cast copies at once
    rollout      KV cache of the rows in flight (min(all rows, rollout.max_batch_tokens / sequence)) over
                 prompt + max_new_tokens, and the prefill's logits in d (the model's output at every position
                 of a prefill chunk: prompts x min(prompt, prefill_step) x vocab; each prompt is prefilled once
                 for its group_size rows, engine/decoding.py)
    update       per micro-batch of rows = group_size x prompts_per_step / grad_accum: the gradient sum and
                 one micro-batch's gradient (2 x trainable), the activations kept for the backward pass over
                 the blocks it runs through (ACT_HIDDEN x hidden + ACT_INTER x intermediate per token and
                 block, in d, x HALF_ACT or HALF_ACT_FULL in a half dtype, plus the attention scores in
                 float32), and the completion logits rows x max_new_tokens x vocab: LOGIT_COPIES float32
                 copies (the float32 logits engine/logprobs.py keeps for the log-softmax's backward, and their
                 gradient), plus the head's own output in a half dtype (its float32 cast is a second array; in
                 float32 it is the same array)
    reference pass / pi_old  a forward of one micro-batch: REF_LOGIT_COPIES float32 copy of its logits, plus the
                 head's half-precision output as above
Completion lengths are taken at max_new_tokens: a run whose completions end earlier peaks lower.
MLX peak = max(load, weights + reference + trainable + the largest of rollout, update, reference pass).
Peak RSS = RSS_BASE (interpreter, MLX, mlx-lm, tokenizer libraries, sandbox plumbing: measured with the
builtin tiny model, whose arrays are a few MB) + RSS_PER_MLX x MLX peak (MLX's buffers live in ordinary
memory on the CPU backend; on Metal they are the GPU heap, so RSS there is an upper bound).
Prompt tokens: the longest prompt of the run's tasks (with its template text) at 1 token per byte for a
byte-level vocabulary (<= 512 entries), else CHARS_PER_TOKEN characters per token.
The constants are fitted on measured peaks (benchmarks/bench_plan.py); the held-out configurations of
benchmarks/plan_holdout.yaml say how far off the model is.
"""

import math
from dataclasses import dataclass, field, replace
from typing import Optional

GB = 1e9
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

ACT_HIDDEN = 14.0  # [tokens x hidden] tensors a block keeps for its backward, per token (fitted)
ACT_INTER = 5.2  # [tokens x intermediate] tensors a block keeps for its backward, per token (fitted)
LOGIT_COPIES = 2.0  # float32 logits the update holds: the cast logits and the log-softmax's gradient
REF_LOGIT_COPIES = 1.0  # float32 logits the reference pass holds (no gradient)
RSS_BASE = 0.165 * GB
RSS_PER_MLX = 1.0
# activations in a half dtype, per token: d x HALF_ACT with LoRA (the float32 adapters promote the inputs they
# keep for the backward to float32), d x HALF_ACT_FULL in a full fine-tune (no float32 adapters)
HALF_ACT = 1.5
HALF_ACT_FULL = 0.62
CHARS_PER_TOKEN = 3.0
TEMPLATE_TOKENS = 16  # chat-template markers around the system and user messages
MAC_WORKING_SET = 0.75  # --memory N: the Metal working set taken as this share of a Mac's N GB


@dataclass
class RunShape:
    """The sizes of a run that set its memory (`shape_of` reads them from a config)."""

    group_size: int = 4
    prompts_per_step: int = 4
    grad_accum: int = 1
    max_new_tokens: int = 64
    prompt_tokens: int = 256
    fine_tune: str = "lora"
    lora_rank: int = 8
    lora_layers: int = -1
    lora_keys: Optional[list] = None
    dtype: Optional[str] = None  # None: the model's stored dtype
    max_batch_tokens: int = 16384
    prefill_step: int = 512
    share_prompts: bool = True


@dataclass
class Plan:
    parts: dict = field(default_factory=dict)  # name -> bytes (the breakdown)
    mlx_peak: float = 0.0
    rss_peak: float = 0.0
    phase: str = ""  # the phase that sets the MLX peak
    dtype: str = "float32"
    params: int = 0
    trainable: int = 0


def _linears(arch):
    """(name, in, out) of one block's linear layers (llama / qwen2 / mistral layout)."""
    h, inter = arch["hidden_size"], arch["intermediate_size"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or heads
    hd = arch.get("head_dim") or h // heads
    return [("self_attn.q_proj", h, heads * hd), ("self_attn.k_proj", h, kv * hd), ("self_attn.v_proj", h, kv * hd),
            ("self_attn.o_proj", heads * hd, h), ("mlp.gate_proj", h, inter), ("mlp.up_proj", h, inter),
            ("mlp.down_proj", inter, h)]


def _matrix_bytes(n_in, n_out, d, quant):
    """Bytes of an n_in x n_out matrix: d each, or packed with a scale and a bias per group."""
    if quant and n_in % quant["group_size"] == 0:
        scale = DTYPE_BYTES.get(quant.get("scales_dtype"), d)
        return n_in * n_out * quant["bits"] / 8 + 2 * (n_in * n_out / quant["group_size"]) * scale
    return n_in * n_out * d


def weight_bytes(arch, d, quant):
    """(bytes, parameter count, float parameter count) of the model's weights."""
    h, vocab, layers = arch["hidden_size"], arch["vocab_size"], arch["num_hidden_layers"]
    lin = _linears(arch)
    block = sum(_matrix_bytes(i, o, d, quant) for _, i, o in lin) + 2 * h * d
    heads = 1 if arch.get("tie_word_embeddings", True) else 2
    total = layers * block + heads * _matrix_bytes(h, vocab, d, quant) + h * d
    params = layers * (sum(i * o for _, i, o in lin) + 2 * h) + heads * h * vocab + h
    if quant:  # norms, and matrices whose input width is not a multiple of the group size, stay float
        g = quant["group_size"]
        floats = layers * (2 * h + sum(i * o for _, i, o in lin if i % g)) + h + (heads * h * vocab if h % g else 0)
    else:
        floats = params
    return total, params, floats


def adapted_layers(arch, shape):
    layers = arch["num_hidden_layers"]
    return layers if shape.lora_layers < 0 or shape.lora_layers > layers else shape.lora_layers


def lora_params(arch, shape):
    keys = shape.lora_keys
    per_block = sum(shape.lora_rank * (i + o) for name, i, o in _linears(arch) if keys is None or name in keys)
    return adapted_layers(arch, shape) * per_block


def compute_dtype(arch, shape):
    return shape.dtype or arch.get("stored_dtype") or "float32"


def prompt_tokens(arch, longest_prompt_chars, template_chars=0, chat=False):
    """Tokens of the longest prompt: bytes for a byte-level vocabulary, else CHARS_PER_TOKEN per token."""
    chars = longest_prompt_chars + template_chars
    per = 1.0 if arch["vocab_size"] <= 512 else CHARS_PER_TOKEN
    return int(math.ceil(chars / per)) + (TEMPLATE_TOKENS if chat else 0)


def predict(arch, shape):
    """The Plan of a run of `shape` on the model `arch` (see the module docstring for the model)."""
    dtype = compute_dtype(arch, shape)
    d = DTYPE_BYTES[dtype]
    quant = arch.get("quantization")
    weights, params, floats = weight_bytes(arch, d, quant)
    on_disk = arch.get("disk_dtype") or arch.get("stored_dtype") or dtype
    stored, _, _ = weight_bytes(arch, DTYPE_BYTES[on_disk], quant)
    h, inter, vocab = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or heads
    hd = arch.get("head_dim") or h // heads
    layers = arch["num_hidden_layers"]
    full = shape.fine_tune == "full"
    trainable = floats if full else lora_params(arch, shape)
    dt = d if full else 4  # LoRA adapters stay float32
    parts = {"weights": weights, "reference": weights if full else 0.0,
             # LoRA: the adapters, their starting copy and two AdamW moments; full: the moments
             "trainable_state": trainable * dt * (2 if full else 4)}
    resident = sum(parts.values())

    rows = shape.group_size * shape.prompts_per_step
    seq = shape.prompt_tokens + shape.max_new_tokens
    in_flight = max(1, min(rows, shape.max_batch_tokens // max(seq, 1)))
    prefill = min(shape.prompt_tokens, shape.prefill_step)
    prefilled = math.ceil(in_flight / shape.group_size)  # each prompt is prefilled once for its G rows
    rollout = (2 * layers * kv * hd * in_flight * seq * d  # KV cache
               + prefilled * prefill * vocab * d)  # the prefill's logits, every position's, in d
    micro = math.ceil(rows / shape.grad_accum)
    prompt_rows = math.ceil(micro / shape.group_size) if shape.share_prompts else micro
    positions = micro * shape.max_new_tokens + prompt_rows * shape.prompt_tokens
    backprop = layers if full else adapted_layers(arch, shape)
    act_width = d if d == 4 else d * (HALF_ACT_FULL if full else HALF_ACT)
    activations = backprop * (positions * (ACT_HIDDEN * h + ACT_INTER * inter) * act_width
                              + micro * heads * shape.max_new_tokens * seq * 4)
    logits = micro * shape.max_new_tokens * vocab
    head = d if d < 4 else 0  # a half-precision head's own output, beside its float32 cast
    update_logits = logits * (LOGIT_COPIES * 4 + head)
    update = 2 * trainable * dt + activations + update_logits
    reference_pass = logits * (REF_LOGIT_COPIES * 4 + head)
    cast = quant is None and on_disk != dtype  # mlx-lm reads, then the loader casts
    phases = {"load": stored + weights if cast else weights,
              "rollout": resident + rollout, "update": resident + update, "reference_pass": resident + reference_pass}
    phase = max(phases, key=phases.get)
    parts.update({"rollout": rollout, "update_activations": activations, "update_logits": update_logits,
                  "update_gradients": 2 * trainable * dt, "reference_pass": reference_pass})
    mlx_peak = phases[phase]
    return Plan(parts=parts, mlx_peak=mlx_peak, rss_peak=RSS_BASE + RSS_PER_MLX * mlx_peak, phase=phase,
                dtype=dtype, params=params, trainable=trainable)


def shape_of(cfg, arch, longest_prompt_chars, share_prompts=True):
    """The RunShape of a config (any object with the config tree's attributes)."""
    r, m = cfg.rollout, cfg.model
    template = len(r.user_template) - len("{prompt}") + len(r.system_prompt or "")
    return RunShape(group_size=r.group_size, prompts_per_step=r.prompts_per_step, grad_accum=cfg.optim.grad_accum,
                    max_new_tokens=r.max_new_tokens,
                    prompt_tokens=prompt_tokens(arch, longest_prompt_chars, template, r.chat_template),
                    fine_tune=m.fine_tune, lora_rank=m.lora_rank, lora_layers=m.lora_layers, lora_keys=m.lora_keys,
                    dtype=getattr(m, "dtype", None), max_batch_tokens=r.max_batch_tokens,
                    prefill_step=r.prefill_step, share_prompts=share_prompts and cfg.optim.share_prompts)


# ------------------------------------------------------------------ fitting a machine
# settings that shrink a run's memory: (setting, RunShape field, the direction that shrinks it, its bound)
KNOBS = (("optim.grad_accum", "grad_accum", +1, None), ("rollout.prompts_per_step", "prompts_per_step", -1, 1),
         ("rollout.group_size", "group_size", -1, 2), ("rollout.max_new_tokens", "max_new_tokens", -1, 1),
         ("model.lora_rank", "lora_rank", -1, 1))
# settings a refusal may blame, with a size typical of a run: the one whose typical value saves most is named
BLAME = (("rollout.group_size", "group_size", 4), ("rollout.prompts_per_step", "prompts_per_step", 4),
         ("rollout.max_new_tokens", "max_new_tokens", 64), ("model.lora_rank", "lora_rank", 8),
         ("rollout.max_batch_tokens", "max_batch_tokens", 16384))


@dataclass
class Capacity:
    """What a machine offers: physical bytes (RSS) and, on a Mac, Metal's working set (MLX peak)."""

    physical: float
    working_set: Optional[float] = None
    name: str = "this machine"

    def fits(self, plan):
        return plan.rss_peak <= self.physical and (self.working_set is None or plan.mlx_peak <= self.working_set)

    def limit_text(self, plan):
        if self.working_set is not None and plan.mlx_peak > self.working_set:
            return (f"MLX peak {plan.mlx_peak / GB:.2f} GB > {self.name}'s Metal working set "
                    f"{self.working_set / GB:.1f} GB")
        return f"peak RSS {plan.rss_peak / GB:.2f} GB > {self.name}'s {self.physical / GB:.1f} GB"


def mac(gb):
    return Capacity(physical=gb * GB, working_set=MAC_WORKING_SET * gb * GB, name=f"a Mac with {gb:g} GB")


def fitting_value(arch, shape, capacity, attr, direction, bound):
    """The value of `attr` nearest the current one that makes the run fit, or None if none does."""
    current = getattr(shape, attr)
    rows = shape.group_size * shape.prompts_per_step
    lo, hi = (current, rows) if direction > 0 else (bound, current)
    if lo > hi or not capacity.fits(predict(arch, replace(shape, **{attr: lo if direction > 0 else hi}))) and \
            not capacity.fits(predict(arch, replace(shape, **{attr: hi if direction > 0 else lo}))):
        return None
    while lo < hi:  # fits is monotone in each knob: bisect for the value closest to the current one
        mid = (lo + hi) // 2 if direction > 0 else (lo + hi + 1) // 2
        ok = capacity.fits(predict(arch, replace(shape, **{attr: mid})))
        if direction > 0:
            lo, hi = (lo, mid) if ok else (mid + 1, hi)
        else:
            lo, hi = (mid, hi) if ok else (lo, mid - 1)
    return lo


def suggestions(arch, shape, capacity):
    """[(setting, value)]: each knob alone, set so that the run fits (knobs that cannot are left out)."""
    out = []
    for key, attr, direction, bound in KNOBS:
        value = fitting_value(arch, shape, capacity, attr, direction, bound)
        if value is not None and value != getattr(shape, attr):
            out.append((key, value))
    return out


def culprit(arch, shape):
    """The setting whose typical value would shrink the predicted peak most: (setting, its value)."""
    base = predict(arch, shape).rss_peak
    best, saved = None, 0.0
    for key, attr, typical in BLAME:
        value = getattr(shape, attr)
        if value > typical:
            gain = base - predict(arch, replace(shape, **{attr: typical})).rss_peak
            if gain > saved:
                best, saved = (key, value), gain
    return best


def refusal(arch, shape, capacity, plan=None):
    """None when the run fits; else the one-line reason, naming the setting to change. plan: the run's own
    (grad_accum auto's bounds the update by its budget, micro_batches.auto_plan), else predicted here."""
    plan = plan or predict(arch, shape)
    if capacity.fits(plan):
        return None
    blamed = culprit(arch, shape)
    fixes = dict(suggestions(arch, shape, capacity))
    head = f"config key '{blamed[0]}' ({blamed[1]}): " if blamed else ""
    text = f"{head}the memory plan predicts {capacity.limit_text(plan)}; the run cannot fit"
    if blamed and blamed[0] in fixes:
        text += f"; it fits with {blamed[0]}={fixes[blamed[0]]}"
    elif fixes:
        key, value = next(iter(fixes.items()))
        text += f"; it fits with {key}={value}"
    return text + " (mlx-coach plan -c CONFIG shows the breakdown)"
