"""Watch MLX and process memory, apply MLX's limits, clear its buffer cache: `MemoryManager`.

What to do when is decided by the pure functions of memory_policy.py; this module reads the numbers,
calls MLX and records what it did.

Numbers in every sample (bytes; GB in metric names is 1e9 bytes, as mlx-lm reports peak memory):

    active     memory held by live MLX arrays                          (mx.get_active_memory)
    cache      freed buffers MLX keeps for reuse                       (mx.get_cache_memory)
    peak       highest `active` since the last reset                   (mx.get_peak_memory)
    footprint  the process's resident memory from the OS: /proc/self/statm on Linux, the physical
               footprint (proc_pid_rusage) on macOS; None where neither is readable
    cache_share = cache / (active + cache): the idle share of MLX's memory (0 when both are 0)

What they mean. On Metal, `active + cache` is what MLX holds on the GPU heap and `footprint` what the
OS charges the process (MLX's buffers plus Python, tokenizer, sandbox pipes); a footprint can grow into
swap while MLX's peak stays flat, which only the OS number shows. On Linux/CPU MLX's buffers live in
ordinary memory and MLX caps the cache at 32 MiB unless told otherwise, so `cache_share` there mostly
reflects that cap. `cache_share` is not fragmentation (MLX does not report unused tails inside buffers;
a freed buffer is reused only for a request between its size and about twice it). The trainer logs the
(rows, tokens) shapes of a step's forwards: `memory/distinct_shapes` in the step and
`memory/new_shapes`, those no earlier step asked for. A new shape asks the allocator for buffer sizes
that earlier steps did not free, so it is the measured proxy for cache mismatch.

A clear either drops the whole cache (`mx.clear_cache()`) or, with `clear_fraction` set, trims it by
that fraction: the cache limit is lowered to `(1 - clear_fraction) * cache`, the allocator evicts its
least recently used buffers down to the limit, and the old limit is restored. MLX's CPU allocator
trims inside `set_cache_limit`; the Metal allocator enforces the limit on its next allocation, so a
one-element array is allocated while the lower limit is in force. Every clear is an event with the
bytes it freed and the milliseconds it took.
"""

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import mlx.core as mx

from mlx_coach.core.settings import check_fields, setting
from mlx_coach.runtime.memory_policy import (GB, cache_share, check_limit, clear_decision, device_memory_bytes,
                                             halve_batch, is_oom_error, pressure_limit, resolve_limit,
                                             resolve_wired_limit, trim_target)


@dataclass
class MemoryConfig:
    """The `memory:` config section.

    Limits: bytes, a fraction in (0, 1] of the device's recommended working set (Metal) or total memory
    (CPU), or null to leave MLX's default. A whole number above 1 is bytes (so 1 means the whole device).
    """

    cache_limit: Optional[float] = setting(None, lo=0.0, help="bytes, or a fraction (0,1] of device memory")
    memory_limit: Optional[float] = setting(None, lo=0.0)
    wired_limit: Optional[float] = setting(None, lo=0.0, help="Metal only; fraction of the recommended working set")
    clear_pressure: Optional[float] = setting(0.85, lo=0.0, hi=1.0, lo_open=True, help="clear when the footprint exceeds this share of the limit; null off")
    clear_growth_steps: int = setting(0, lo=0, help="clear when the cache grew in each of the last N steps; 0 off")
    clear_cache_share: Optional[float] = setting(None, lo=0.0, hi=1.0, help="clear when cache / (active + cache) exceeds this; 0/null off")
    clear_cache_gb: Optional[float] = setting(None, lo=0.0, help="clear when the cache holds more than this")
    clear_every: int = setting(1, lo=0, help="clear every N steps; 0 = off")
    clear_fraction: Optional[float] = setting(None, lo=0.0, hi=1.0, help="trim the cache by this fraction; null, 0 or 1 = drop all of it")
    clear_min_cache_gb: float = setting(0.0625, lo=0.0, help="the cache-share and growth rules ignore caches smaller than this")
    clear_min_interval: int = setting(1, lo=0, help="steps between proactive clears (1 = at most one per step)")
    oom_min_batch: int = setting(1, lo=1)
    plan_margin: float = setting(0.25, lo=0.0, help="alert (memory_over_plan) when a step's measured peak passes the "
                                                    "memory plan's prediction by more than this fraction")

    def __post_init__(self):
        check_fields(self, "memory")
        for name in ("cache_limit", "memory_limit", "wired_limit"):
            check_limit(getattr(self, name), f"memory.{name}")


@dataclass
class MemorySample:
    active: int
    cache: int
    peak: int
    phase: str
    t: float
    footprint: Optional[int] = None  # the OS's number for the whole process; None where unreadable

    @property
    def cache_share(self):
        return cache_share(self.active, self.cache)


@dataclass
class ClearEvent:
    reason: str  # "cache_share" | "cache_size" | "periodic" | "oom" | a caller's reason
    freed_bytes: int
    ms: float
    step: int
    cache_before: int = 0
    cache_after: int = 0
    cache_share: float = 0.0  # before the clear
    partial: bool = False  # True when the cache was trimmed by clear_fraction, not dropped
    kind: str = field(default="memory/clear", init=False)

    def fields(self):
        return _event_fields(self)


@dataclass
class OomEvent:
    step: int | None
    batch: int
    new_batch: int | None  # None: already at oom_min_batch, the error was re-raised
    message: str
    freed_bytes: int = 0
    kind: str = field(default="memory/oom", init=False)

    def fields(self):
        return _event_fields(self)


def _event_fields(event):
    """Keyword arguments for `Telemetry.event(step, event.kind, **event.fields())`."""
    return {k: v for k, v in asdict(event).items() if k not in ("step", "kind")}


def process_footprint():
    """Resident bytes of this process from the OS, or None. Linux: resident pages of /proc/self/statm.
    macOS: ri_phys_footprint of proc_pid_rusage (what Activity Monitor shows)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None
    if sys.platform == "darwin":
        return _darwin_phys_footprint()
    return None


def _darwin_phys_footprint():
    import ctypes

    try:
        libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
        info = (ctypes.c_uint64 * 64)()  # rusage_info_v2, with room to spare
        if libc.proc_pid_rusage(os.getpid(), 2, ctypes.byref(info)) != 0:
            return None
        return int(info[9])  # 16-byte uuid, then user, system, idle wakeups, interrupts, pageins, wired, resident, footprint
    except (OSError, AttributeError):
        return None


def _device_info():
    try:
        return dict(mx.device_info())
    except Exception:  # older MLX: only the Metal query exists
        return dict(mx.metal.device_info()) if mx.metal.is_available() else {}


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class MemoryManager:
    def __init__(self, cfg, device_info=None, clock=time.perf_counter):
        self.cfg = cfg
        self.info = dict(device_info) if device_info is not None else _device_info()
        self.device_bytes = device_memory_bytes(self.info) or _physical_memory()
        self.clock = clock
        self.latest = None
        self.by_phase = {}  # phase -> latest MemorySample in the current step
        self.events = []  # ClearEvent and OomEvent, in order
        self.previous_limits = {}  # what MLX had before apply_limits
        self.last_clear_step = None
        self.clear_count = 0
        self.freed_total = 0
        self.oom_count = 0
        self.run_peak = 0
        self.last_ok_batch = None
        self.clear_ms_total = 0.0
        self.cache_history = []  # cache bytes at the end of each step (the growth rule), bounded
        self.shapes = set()  # (phase, rows, tokens) the current step asked for
        self.seen_shapes = set()  # every shape earlier steps asked for
        # the first step's peak is its own, not what the process held before the trainer existed (bench
        # learn evaluates the base model first, in the same process)
        mx.reset_peak_memory()

    def apply_limits(self):
        """Set the configured limits in MLX; returns {name: bytes} for those set."""
        cfg, applied = self.cfg, {}
        memory = resolve_limit(cfg.memory_limit, self.device_bytes, "memory.memory_limit")
        cache = resolve_limit(cfg.cache_limit, self.device_bytes, "memory.cache_limit")
        # the wired limit means nothing off Metal; a config shared with a Mac must still run here
        wired = resolve_wired_limit(cfg.wired_limit, self.info) if mx.metal.is_available() else None
        if memory is not None:  # first: MLX's cache limit defaults to the memory limit
            self.previous_limits["memory_limit"] = mx.set_memory_limit(memory)
            applied["memory_limit"] = memory
        if cache is not None:
            self.previous_limits["cache_limit"] = mx.set_cache_limit(cache)
            applied["cache_limit"] = cache
        if wired is not None:
            self.previous_limits["wired_limit"] = mx.set_wired_limit(wired)
            applied["wired_limit"] = wired
        return applied

    def sample(self, phase):
        s = self._read(phase)
        self.by_phase[phase] = s
        return s

    def _read(self, phase):
        s = MemorySample(
            active=mx.get_active_memory(),
            cache=mx.get_cache_memory(),
            peak=mx.get_peak_memory(),
            phase=phase,
            t=self.clock(),
            footprint=process_footprint(),
        )
        self.latest = s
        self.run_peak = max(self.run_peak, s.peak)
        return s

    def maybe_clear(self, step):
        """Clear (or trim) the cache if the policy says so for the latest sample."""
        s = self.latest or self._read("clear")
        due, reason = clear_decision(s, self.cfg, step, self.last_clear_step,
                                     limit=pressure_limit(self.cfg, self.device_bytes), cache_history=self.cache_history)
        if not due:
            return None
        return self.clear(step, reason, fraction=self.cfg.clear_fraction)

    def clear(self, step, reason="manual", fraction=None):
        """Clear now, whatever the policy; fraction as in MemoryConfig.clear_fraction."""
        mx.synchronize()  # buffers of in-flight work return to the cache first
        frag = cache_share(mx.get_active_memory(), mx.get_cache_memory())
        before = mx.get_cache_memory()
        t0 = time.perf_counter()
        target = trim_target(before, fraction)
        if target == 0:
            mx.clear_cache()
        else:
            previous = mx.set_cache_limit(target)
            mx.eval(mx.zeros((1,)))  # Metal enforces the limit on its next allocation
            mx.set_cache_limit(previous)
        ms = (time.perf_counter() - t0) * 1000
        after = mx.get_cache_memory()
        event = ClearEvent(reason, max(0, before - after), ms, step, before, after, frag, target > 0)
        self.events.append(event)
        self.clear_count += 1
        self.freed_total += event.freed_bytes
        self.clear_ms_total += ms
        self.last_clear_step = step
        self._read("after_clear")  # later decisions in this step see the cleared state
        return event

    def run_with_oom_backoff(self, fn, batch, step=None):
        """fn(batch), halving batch after each MLX out-of-memory error down to oom_min_batch."""
        while True:
            try:
                result = fn(batch)
                self.last_ok_batch = batch
                return result
            except (RuntimeError, MemoryError) as exc:
                if not is_oom_error(exc):
                    raise
                before = mx.get_cache_memory()
                mx.clear_cache()
                new_batch = halve_batch(batch, self.cfg.oom_min_batch)
                freed = max(0, before - mx.get_cache_memory())
                self.events.append(OomEvent(step, batch, new_batch, str(exc).splitlines()[0][:200], freed))
                self.oom_count += 1
                if new_batch is None:
                    raise
                batch = new_batch

    def note_shapes(self, phase, shapes):
        """Record the (rows, tokens) shapes a phase of this step asked for."""
        self.shapes.update((phase, *shape) for shape in shapes)

    def step_metrics(self, reset_peak=True):
        """Metrics for the step; peak is per step (MLX's peak is reset here unless reset_peak=False)."""
        s = self.latest or self._read("step")
        step_peak = max([p.peak for p in self.by_phase.values()] + [s.peak])
        m = {
            "memory/active_gb": s.active / GB,
            "memory/cache_gb": s.cache / GB,
            "memory/peak_gb": step_peak / GB,
            "memory/peak_run_gb": self.run_peak / GB,
            "memory/cache_share": s.cache_share,
            "memory/clear_events": self.clear_count,
            "memory/clear_ms": self.clear_ms_total,
            "memory/freed_gb": self.freed_total / GB,
            "memory/oom_events": self.oom_count,
            "memory/distinct_shapes": len(self.shapes),
            "memory/new_shapes": len(self.shapes - self.seen_shapes),
        }
        if s.footprint is not None:
            m["memory/footprint_gb"] = s.footprint / GB
        self.cache_history = (self.cache_history + [s.cache])[-64:]
        self.seen_shapes |= self.shapes
        self.shapes = set()
        for phase, p in self.by_phase.items():
            m[f"memory/phase/{phase}/active_gb"] = p.active / GB
            m[f"memory/phase/{phase}/cache_gb"] = p.cache / GB
            m[f"memory/phase/{phase}/peak_gb"] = p.peak / GB
            m[f"memory/phase/{phase}/cache_share"] = p.cache_share
            if p.footprint is not None:
                m[f"memory/phase/{phase}/footprint_gb"] = p.footprint / GB
        self.by_phase = {}
        self.latest = None
        if reset_peak:
            mx.reset_peak_memory()
        return m
