"""One optimizer update from micro-batches: loss, gradients, clipping, the non-finite guard and the
optimizer step, optionally compiled into one function (`optim.compile`).

Compiled, the step is traced by `mx.compile` over the model's, the optimizer's and MLX's RNG state
(`inputs=state, outputs=state`, as mlx-lm's trainer does), so its graph is built once per input shape
and its element-wise work (Adam's update, the loss arithmetic) is fused. Everything that changes
between steps is an array argument or part of that state (the micro-batch weight, an adaptive beta,
the learning-rate scale): a Python number read inside would be frozen at trace time. Shapes repeat
because the trainer pads sequence lengths to buckets (`logprob_inputs`).

Each micro-batch is one call, evaluated before the next one starts (peak memory is one micro-batch's);
the last call also clips, checks and applies. A non-finite loss or gradient norm leaves weights and
optimizer state exactly as they were: eagerly by not stepping, compiled by selecting the old arrays
(`mx.where`), since a traced graph cannot branch on a value.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from . import losses


class Updater:
    def __init__(self, model, optimizer, loss_fn, *, grad_clip, compiled, extra_state=()):
        """loss_fn(model, x, beta, inject_nan) -> (loss, stats). extra_state: containers of arrays
        that the loss or the optimizer's schedule read (the compiled step tracks them as state)."""
        self.model, self.optimizer, self.grad_clip, self.compiled = model, optimizer, grad_clip, compiled
        self.loss_and_grad = nn.value_and_grad(model, loss_fn)
        self.extra_state = list(extra_state)
        self._fns = None

    def _functions(self):
        # a checkpoint load replaces the optimizer's state dict: the compiled functions track the one
        # they were built with, so they are rebuilt when it changes
        if self._fns is None or self._fns[0] is not self.optimizer.state:
            # a loaded state lacks the empty entries of frozen modules; the traced step needs the
            # state's full structure before it runs (init keeps every value already there)
            self.optimizer.init(self.model.trainable_parameters())
            self.state = [self.model.state, self.optimizer.state, mx.random.state, *self.extra_state]
            step, apply = self._step, self._apply
            if self.compiled:
                step = mx.compile(step, inputs=self.state, outputs=self.state)
                apply = mx.compile(apply, inputs=self.state, outputs=self.state)
            self._fns = (self.optimizer.state, step, apply)
        return self._fns[1:]

    # ------------------------------------------------------------ traced functions
    def _step(self, x, weight, beta, acc, finish, inject_nan):
        (loss, stats), grads = self.loss_and_grad(self.model, x, beta, inject_nan)
        grads = tree_map(lambda g: g * weight, grads)
        loss = loss * weight
        stats = {k: v * weight for k, v in stats.items()}
        if acc is not None:
            grads = tree_map(mx.add, acc[0], grads)
            loss = loss + acc[1]
            stats = {k: acc[2][k] + v for k, v in stats.items()}
        if not finish:
            return grads, loss, stats
        clipped, norm, finite = self._apply(grads, loss)
        return clipped, loss, stats, norm, finite

    def _apply(self, grads, loss):
        if self.grad_clip > 0:  # one norm serves the clip, the finite check and the log
            clipped, norm = losses.clip_grad_norm(grads, self.grad_clip)
        else:
            clipped, norm = grads, losses.grad_global_norm(grads)
        finite = mx.isfinite(loss) & mx.isfinite(norm)
        if not self.compiled:
            if bool(finite.item()):
                self.optimizer.update(self.model, clipped)
            return clipped, norm, finite
        params, old = self.model.trainable_parameters(), tree_map(lambda a: a, self.optimizer.state)
        self.optimizer.update(self.model, clipped)
        keep = lambda new, before: mx.where(finite, new, before)  # noqa: E731
        self.model.update(tree_map(keep, self.model.trainable_parameters(), params))
        for k, v in tree_map(keep, dict(self.optimizer.state), old).items():
            self.optimizer.state[k] = v
        return clipped, norm, finite

    # ------------------------------------------------------------ drivers
    def accumulate(self, parts, beta, inject_nan=False):
        """(grads, loss, stats) summed over parts = [(x, weight), ...], no update."""
        step, _ = self._functions()
        acc = None
        for x, w in parts:
            acc = step(x, mx.array(w, dtype=mx.float32), beta, acc, False, inject_nan)
            mx.eval(acc)
        return acc

    def apply(self, grads, loss):
        """Clip, check and step on accumulated gradients: (clipped, norm, finite)."""
        _, apply = self._functions()
        out = apply(grads, loss)
        mx.eval(self.state, out)
        return out

    def run(self, parts, beta, inject_nan=False):
        """One update over parts: (clipped grads, loss, stats, norm, finite); the last part's call
        accumulates, clips, checks and steps in one function."""
        step, _ = self._functions()
        acc = None
        for i, (x, w) in enumerate(parts):
            finish = i == len(parts) - 1
            acc = step(x, mx.array(w, dtype=mx.float32), beta, acc, finish, inject_nan)
            mx.eval(self.state, acc) if finish else mx.eval(acc)
        return acc
