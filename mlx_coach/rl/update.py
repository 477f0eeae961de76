"""One optimizer update from micro-batches: weighted loss and gradients, clipping, the non-finite
guard and the optimizer step.

Each micro-batch is evaluated before the next one builds its graph, so peak memory is one
micro-batch's. A non-finite loss or gradient norm leaves weights and optimizer state exactly as they
were (the step is not taken); nothing is clamped.

Not compiled: `mx.compile` over model, optimizer and RNG state (as mlx-lm's trainer does) was built
and measured on the common peer job on this project's CPU (see the README, `bench step`): the update
took 0.89x-1.0x as long eager as compiled, because its time is in matrix products that compilation
does not change, and the shape buckets a compiled step needs cost ~6% in padding. It was removed.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlx_coach.rl import objective as losses


class Updater:
    def __init__(self, model, optimizer, loss_fn, *, grad_clip):
        """loss_fn(model, x, beta, inject_nan) -> (loss, stats) on one micro-batch's arrays."""
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.loss_and_grad = nn.value_and_grad(model, loss_fn)

    def accumulate(self, parts, beta, inject_nan=False):
        """(grads, loss, stats) summed over parts = [(x, weight), ...], no update."""
        grads_sum, loss_sum, stats_sum = None, 0.0, {}
        for x, w in parts:
            (loss, stats), grads = self.loss_and_grad(self.model, x, beta, inject_nan)
            grads = tree_map(lambda g: g * w, grads)
            grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
            loss_sum += loss * w
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v * w
            mx.eval(grads_sum, loss_sum, stats_sum)
        return grads_sum, loss_sum, stats_sum

    def apply(self, grads, loss):
        """Clip, check and step: (clipped grads, norm, finite); no step unless finite."""
        if self.grad_clip > 0:  # one norm serves the clip, the finite check and the log
            clipped, norm = losses.clip_grad_norm(grads, self.grad_clip)
        else:
            clipped, norm = grads, losses.grad_global_norm(grads)
        finite = bool((mx.isfinite(loss) & mx.isfinite(norm)).item())
        if finite:
            self.optimizer.update(self.model, clipped)
            mx.eval(self.model.parameters(), self.optimizer.state)
        return clipped, norm, finite
