"""Training-health numbers that answer "is this run still learning?".

- gradient norms by parameter group (attention / MLP / embeddings / LoRA adapters / other), named after
  mlx-lm's llama-family parameter paths (`model.layers.3.self_attn.q_proj.lora_a`, ...);
- the relative size of an update, ||delta theta|| / ||theta||;
- per-module LoRA deltas: ||B A - B0 A0|| (the adapter's change to the weight, without its scale);
- held-out pass rates by category x length bucket, drawn as a heatmap image;
- a trend tracker for the validation metric (improving / plateau / regressing over K epochs).
"""

import bisect
import math

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_coach.core.errors import UserError

GROUPS = ("attention", "mlp", "embeddings", "adapters", "other")
_ATTENTION = {"self_attn", "attention", "attn"}
_MLP = {"mlp", "feed_forward", "ffn"}
_EMBEDDINGS = {"embed_tokens", "lm_head", "wte", "embed"}
_LORA = {"lora_a", "lora_b"}


def param_group(path):
    parts = set(path.split("."))
    if parts & _LORA:
        return "adapters"
    if parts & _EMBEDDINGS:
        return "embeddings"
    if parts & _ATTENTION:
        return "attention"
    if parts & _MLP:
        return "mlp"
    return "other"


def _leaves(tree):
    return [(k, v) for k, v in tree_flatten(tree) if isinstance(v, mx.array)]


def _sq(x):
    return mx.sum(mx.square(x.astype(mx.float32)))


def grad_norms_by_group(grads):
    """L2 norm of the gradients per group, plus the adapters split by where they sit and the total.

    Keys: grad/norm/{attention,mlp,embeddings,adapters,other} (0.0 for a group without parameters),
    grad/norm/adapters/{attention,mlp,other} when adapters exist, and grad/norm/total.
    """
    sums = {}
    for path, g in _leaves(grads):
        group = param_group(path)
        keys = [group]
        if group == "adapters":
            keys.append("adapters/" + param_group(path.replace("lora_a", "").replace("lora_b", "")))
        for key in keys:
            sums.setdefault(key, []).append(_sq(g))
    names = list(sums)
    totals = [mx.sum(mx.stack(sums[n])) for n in names]
    mx.eval(totals)
    values = {n: float(t) for n, t in zip(names, totals)}
    out = {f"grad/norm/{g}": math.sqrt(values.get(g, 0.0)) for g in GROUPS}
    for n in names:
        if n.startswith("adapters/"):
            out[f"grad/norm/{n}"] = math.sqrt(values[n])
    out["grad/norm/total"] = math.sqrt(sum(values.get(g, 0.0) for g in GROUPS))
    return out


def update_ratio(params_before, params_after):
    """||after - before|| / ||before|| over the parameters present in both trees.

    MLX arrays are immutable, so keeping a reference to the trainable parameters before the
    optimizer step costs no copy.
    """
    before = dict(_leaves(params_before))
    diffs, norms = [], []
    for path, new in _leaves(params_after):
        old = before.get(path)
        if old is not None and old.shape == new.shape:
            diffs.append(_sq(new - old))
            norms.append(_sq(old))
    if not diffs:
        return 0.0
    d, n = mx.sum(mx.stack(diffs)), mx.sum(mx.stack(norms))
    mx.eval(d, n)
    d, n = math.sqrt(float(d)), math.sqrt(float(n))
    if n == 0:
        return 0.0 if d == 0 else math.inf
    return d / n


def _product_norm(a, b):
    """||a @ b||_F for a (m x r), b (r x n) without forming the m x n product."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return mx.sqrt(mx.maximum(mx.sum((a.T @ a) * (b @ b.T)), 0.0))


def lora_deltas(initial, current, by="module"):
    """Change of each LoRA adapter since `initial`: {module path: ||B A - B0 A0||_F}.

    mlx-lm's LoRALinear adds scale * (x @ lora_a) @ lora_b, so lora_a @ lora_b is the weight change
    (transposed, unscaled). Parameters of a module that are not a 2-D lora_a/lora_b pair fall back to
    the norm of their own change. by="block" sums the squares per transformer block ("...layers.N").
    """
    init, cur = dict(_leaves(initial)), dict(_leaves(current))
    modules = {}
    for path in cur:
        if path in init:
            module, _, leaf = path.rpartition(".")
            modules.setdefault(module, {})[leaf] = path
    norms = {}
    for module, leaves in modules.items():
        a, b = leaves.get("lora_a"), leaves.get("lora_b")
        if a and b and cur[a].ndim == 2 and cur[b].ndim == 2 and cur[a].shape[1] == cur[b].shape[0]:
            # [A, A0] @ [[B], [-B0]] = A B - A0 B0, a rank-2r product
            a2 = mx.concatenate([cur[a], init[a]], axis=1)
            b2 = mx.concatenate([cur[b], -init[b]], axis=0)
            norms[module] = _product_norm(a2, b2)
        elif any(leaf in _LORA for leaf in leaves):
            norms[module] = mx.sqrt(sum(_sq(cur[p] - init[p]) for p in leaves.values()))
    mx.eval(list(norms.values()))
    deltas = {m: float(v) for m, v in norms.items()}
    if by == "block":
        return block_deltas(deltas)
    if by != "module":
        raise ValueError(f"by must be 'module' or 'block', got {by!r}")
    return deltas


def block_deltas(deltas):
    """Module deltas from `lora_deltas` combined per transformer block ("...layers.N")."""
    blocks = {}
    for module, value in deltas.items():
        parts = module.split(".")
        key = module
        if "layers" in parts:
            i = parts.index("layers")
            key = ".".join(parts[: i + 2])
        blocks[key] = blocks.get(key, 0.0) + value**2
    return {k: math.sqrt(v) for k, v in blocks.items()}


def top_layers_text(deltas, k=5):
    """Markdown table of the k largest deltas, for TensorBoard text."""
    ranked = sorted(deltas.items(), key=lambda kv: kv[1], reverse=True)[:k]
    lines = ["| rank | layer | delta |", "|---|---|---|"]
    lines += [f"| {i} | {name} | {value:.4g} |" for i, (name, value) in enumerate(ranked, 1)]
    return "\n".join(lines)


def bucket_labels(edges):
    """[0, e0) -> "<e0", [e0, e1) -> "e0-e1", ..., [e_last, inf) -> ">=e_last"."""
    if not edges:
        return ["all"]
    labels = [f"<{edges[0]}"]
    labels += [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]
    labels.append(f">={edges[-1]}")
    return labels


def bucket_table(results, length_edges):
    """(categories, buckets, pass-rate matrix with NaN for empty cells, count matrix)."""
    edges = list(length_edges)
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise UserError(f"eval.length_edges must be strictly increasing, got {edges}")
    buckets = bucket_labels(edges)
    categories = sorted({str(c) for c, _, _ in results})
    row = {c: i for i, c in enumerate(categories)}
    passed = np.zeros((len(categories), len(buckets)))
    counts = np.zeros((len(categories), len(buckets)), dtype=np.int64)
    for category, length, ok in results:
        i, j = row[str(category)], bisect.bisect_right(edges, length)
        counts[i, j] += 1
        passed[i, j] += bool(ok)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(counts > 0, passed / np.maximum(counts, 1), np.nan)
    return categories, buckets, rates, counts


def bucket_pass_rates(results, length_edges):
    """results: [(category, length, passed)] -> (categories, bucket labels, pass-rate matrix)."""
    categories, buckets, rates, _ = bucket_table(results, length_edges)
    return categories, buckets, rates


_RED, _YELLOW, _GREEN, _GREY = (215, 48, 39), (254, 224, 139), (26, 152, 80), (170, 170, 170)


def rate_color(value):
    """Red (0) -> yellow (0.5) -> green (1); grey for NaN."""
    if value is None or not math.isfinite(value):
        return _GREY
    v = min(max(float(value), 0.0), 1.0)
    lo, hi, t = (_RED, _YELLOW, v * 2) if v < 0.5 else (_YELLOW, _GREEN, v * 2 - 1)
    return tuple(round(a + (b - a) * t) for a, b in zip(lo, hi))


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def heatmap_image(matrix, row_labels, col_labels, title=None, counts=None):
    """Draw a pass-rate matrix as an RGB HWC uint8 array; cells show the rate (and n with counts)."""
    from PIL import Image, ImageDraw  # pillow: only needed for the heatmap

    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix shape {matrix.shape} does not match labels {len(row_labels)}x{len(col_labels)}")
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text):
        x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    pad = 8
    text_h = size("Ag%")[1]
    cell_w = max([size(c)[0] for c in col_labels] + [size("100%")[0], size("n=0000")[0]]) + 2 * pad
    cell_h = (2 if counts is not None else 1) * (text_h + 4) + 2 * pad
    left = max([size(r)[0] for r in row_labels] + [0]) + 2 * pad
    top = text_h + 2 * pad + ((text_h + pad) if title else 0)
    width = left + cell_w * len(col_labels) + pad
    height = top + cell_h * len(row_labels) + pad
    img = Image.new("RGB", (max(width, 1), max(height, 1)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for j, label in enumerate(col_labels):
        w, _ = size(label)
        draw.text((left + j * cell_w + (cell_w - w) // 2, top - text_h - pad), label, fill=(0, 0, 0), font=font)
    for i, label in enumerate(row_labels):
        y = top + i * cell_h
        draw.text((pad, y + (cell_h - text_h) // 2), label, fill=(0, 0, 0), font=font)
        for j in range(len(col_labels)):
            x, value = left + j * cell_w, matrix[i, j]
            color = rate_color(value)
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=color, outline=(255, 255, 255))
            lines = ["n/a" if not math.isfinite(value) else f"{value:.0%}"]
            if counts is not None:
                lines.append(f"n={int(counts[i][j])}")
            ink = (0, 0, 0) if sum(c * w for c, w in zip(color, (0.299, 0.587, 0.114))) > 110 else (255, 255, 255)
            ty = y + (cell_h - len(lines) * (text_h + 4)) // 2
            for line in lines:
                w, _ = size(line)
                draw.text((x + (cell_w - w) // 2, ty), line, fill=ink, font=font)
                ty += text_h + 4
    return np.asarray(img, dtype=np.uint8)


class TrendTracker:
    """Trend of a validation metric over the last k epochs.

    improving   the best value of the last k epochs beats every earlier value by more than min_delta
    regressing  every value of the last k epochs is worse than the earlier best by more than min_delta
                and, when both values are rates in [0, 1] with their counts (tasks), by more than
                noise_k standard errors of the difference (two-proportion test, pooled rate)
    plateau     neither (a fall within the noise of the counts is a plateau, not a regression)
    insufficient  fewer than k + 1 values so far
    """

    def __init__(self, k=3, higher_is_better=True, min_delta=0.0, noise_k=0.0):
        if k < 1:
            raise UserError(f"alerts.plateau_epochs must be >= 1, got {k}")
        self.k, self.higher_is_better, self.min_delta, self.noise_k = k, higher_is_better, min_delta, noise_k
        self.history = []  # (epoch, value)
        self.counts = []  # samples (tasks) behind each value, None when unknown

    def update(self, value, epoch=None, count=None):
        if value is not None and math.isfinite(value):
            self.history.append((len(self.history) if epoch is None else epoch, float(value)))
            self.counts.append(count)
        return self.trend

    def _score(self, value):
        return value if self.higher_is_better else -value

    def standard_error(self, i, j):
        """Standard error of value[i] - value[j] for two rates with counts (pooled), else 0."""
        (_, a), (_, b) = self.history[i], self.history[j]
        na, nb = self.counts[i], self.counts[j]
        if not na or not nb or not (0.0 <= a <= 1.0 and 0.0 <= b <= 1.0):
            return 0.0
        p = (a * na + b * nb) / (na + nb)
        return math.sqrt(p * (1 - p) * (1 / na + 1 / nb))

    @property
    def trend(self):
        if len(self.history) < self.k + 1:
            return "insufficient"
        scores = [self._score(v) for _, v in self.history]
        n_before = len(scores) - self.k
        i_best = max(range(n_before), key=lambda i: scores[i])
        j_best = max(range(n_before, len(scores)), key=lambda j: scores[j])
        best_before, window_best = scores[i_best], scores[j_best]
        if window_best > best_before + self.min_delta:
            return "improving"
        margin = max(self.min_delta, self.noise_k * self.standard_error(i_best, j_best))
        if window_best < best_before - margin:
            return "regressing"
        return "plateau"

    @property
    def best(self):
        """(epoch, value) of the best value so far, or None."""
        if not self.history:
            return None
        return max(self.history, key=lambda ev: self._score(ev[1]))

    def state_dict(self):
        return {"k": self.k, "higher_is_better": self.higher_is_better, "min_delta": self.min_delta,
                "noise_k": self.noise_k, "history": [list(h) for h in self.history], "counts": list(self.counts)}

    def load(self, state):
        self.k, self.higher_is_better = state["k"], state["higher_is_better"]
        self.min_delta = state["min_delta"]
        self.noise_k = state.get("noise_k", self.noise_k)  # absent from older checkpoints
        self.history = [tuple(h) for h in state["history"]]
        self.counts = list(state.get("counts", [None] * len(self.history)))
