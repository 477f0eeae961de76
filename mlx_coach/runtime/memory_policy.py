"""Memory policy as pure functions of the samples and the `memory:` config: limits, clears, OOM backoff.

Limits (`resolve_limit`, `resolve_wired_limit`): bytes, or a fraction in (0, 1] of the device's
memory (`device_memory_bytes`: Metal's recommended working set, else total memory).

Clearing policy (`clear_decision`), first rule that fires:
- pressure: footprint (else active + cache) above `clear_pressure` x the limit (memory.memory_limit if
  set, else the device's recommended working set on Metal / physical memory on CPU);
- growth: the cache grew in each of the last `clear_growth_steps` steps;
- cache share above `clear_cache_share` (off by default: a high share after an update is normal);
- cache above `clear_cache_gb`; every `clear_every` steps.
A clear either drops the whole cache or, with `clear_fraction` set, trims it to `trim_target`
(MemoryManager.clear in memory.py carries it out).

Out of memory (`is_oom_error`, `halve_batch`): MLX's allocation errors are recognised by their text,
and the batch is halved down to `oom_min_batch`.
"""

from mlx_coach.core.errors import UserError

GB = 1e9

# Substrings of the errors MLX raises when an allocation fails (Metal and CPU allocators),
# matched case-insensitively.
OOM_MARKERS = (
    "[metal::malloc]",
    "[malloc] unable to allocate",
    "resource limit",
    "out of memory",
    "insufficient memory",
)


def check_limit(value, name):
    """UserError naming `name` unless value is null, bytes (a whole number) or a fraction in [0, 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be bytes (int), a fraction in (0, 1] or null, got {value!r}")
    if isinstance(value, float) and not (0 <= value <= 1 or (value > 1 and value.is_integer())):
        raise UserError(f"{name} must be bytes (int) or a fraction in (0, 1], got {value!r}")
    if value < 0:
        raise UserError(f"{name} must be >= 0, got {value!r}")


def cache_share(active, cache):
    """cache / (active + cache): the idle share of MLX's memory (0 when both are 0)."""
    total = active + cache
    return cache / total if total > 0 else 0.0


def device_memory_bytes(info):
    """Bytes that limit fractions refer to: Metal's recommended working set, else total memory."""
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        value = info.get(key) if info else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_limit(value, device_bytes, name="limit"):
    """A configured limit in bytes: ints are bytes, floats in (0, 1] a fraction of device_bytes."""
    if value is None:
        return None
    check_limit(value, name)
    if isinstance(value, float) and 0 < value <= 1:
        if not device_bytes:
            raise UserError(f"{name} is a fraction ({value}) but the device memory size is unknown; give bytes")
        return int(value * device_bytes)
    return int(value)


def resolve_wired_limit(value, info, name="memory.wired_limit"):
    """Wired limit in bytes; Metal refuses limits above the recommended working set, so do we."""
    if value is None:
        return None
    ceiling = (info or {}).get("max_recommended_working_set_size")
    limit = resolve_limit(value, ceiling or device_memory_bytes(info), name)
    if ceiling and limit > ceiling:
        raise UserError(f"{name} ({limit} bytes) exceeds the recommended working set ({ceiling} bytes)")
    return limit


def pressure_limit(cfg, device_bytes):
    """The bytes the pressure rule compares the footprint with: memory_limit if set, else the device's."""
    return resolve_limit(cfg.memory_limit, device_bytes, "memory.memory_limit") or device_bytes


def clear_decision(sample, cfg, step, last_clear_step, *, limit=None, cache_history=()):
    """(should_clear, reason) for the latest sample; reason is None when no clear is due.

    limit: bytes for the pressure rule (see pressure_limit); cache_history: the cache bytes at the end
    of each step so far, this one included, oldest first (growth: the last N + 1 of them rise)."""
    if last_clear_step is not None and step - last_clear_step < cfg.clear_min_interval:
        return False, None
    used = sample.footprint if sample.footprint is not None else sample.active + sample.cache
    if cfg.clear_pressure and limit and sample.cache > 0 and used > cfg.clear_pressure * limit:
        return True, "pressure"
    n = cfg.clear_growth_steps
    if n and sample.cache >= cfg.clear_min_cache_gb * GB and len(cache_history) > n:
        recent = list(cache_history[-(n + 1):])
        if all(b > a for a, b in zip(recent, recent[1:])):
            return True, "growth"
    if (
        cfg.clear_cache_share  # None or 0: off
        and sample.cache >= cfg.clear_min_cache_gb * GB
        and sample.cache > 0
        and cache_share(sample.active, sample.cache) > cfg.clear_cache_share
    ):
        return True, "cache_share"
    if cfg.clear_cache_gb is not None and sample.cache > cfg.clear_cache_gb * GB:
        return True, "cache_size"
    if cfg.clear_every and step > 0 and step % cfg.clear_every == 0:
        return True, "periodic"
    return False, None


def trim_target(cache, clear_fraction):
    """Cache limit that trims `cache` bytes by `clear_fraction`; 0 means drop everything."""
    if not clear_fraction or clear_fraction >= 1:
        return 0
    return int(cache * (1 - clear_fraction))


def halve_batch(batch, min_batch):
    """Next batch size after an out-of-memory error, or None when batch is already at the floor."""
    if batch <= min_batch:
        return None
    return max(min_batch, batch // 2)


def is_oom_error(exc):
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in OOM_MARKERS)
