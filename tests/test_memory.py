import sys
import mlx.core as mx
import pytest

from mlx_coach.core.errors import UserError
from mlx_coach.runtime.memory import MemoryConfig, MemoryManager, MemorySample, OomEvent
from mlx_coach.runtime.memory_policy import GB, clear_decision, device_memory_bytes, cache_share, halve_batch, is_oom_error, resolve_limit, resolve_wired_limit, trim_target

# mx.device_info() on an M1 Pro (16 GB); the CPU backend reports no memory size at all.
METAL_INFO = {
    "architecture": "applegpu_g13s",
    "device_name": "Apple M1 Pro",
    "max_buffer_length": 9663676416,
    "max_recommended_working_set_size": 11453251584,
    "memory_size": 17179869184,
    "resource_limit": 499000,
}
CPU_INFO = {"architecture": "x86_64", "device_name": "AMD EPYC"}

OOM = "[metal::malloc] Resource limit (499000) exceeded."


def test_cache_share_definition():
    assert cache_share(0, 0) == 0.0
    assert cache_share(3, 1) == 0.25
    assert cache_share(0, 7) == 1.0
    assert MemorySample(active=1, cache=3, peak=4, phase="rollout", t=0.0).cache_share == 0.75


def test_resolve_limit_bytes_and_fractions():
    assert resolve_limit(None, 10**9) is None
    assert resolve_limit(123, None) == 123
    assert resolve_limit(8.0e9, None) == 8_000_000_000  # an integral float is bytes
    assert resolve_limit(0.5, 16 * 2**30) == 8 * 2**30
    assert resolve_limit(1.0, 1000) == 1000
    assert resolve_limit(0, None) == resolve_limit(0.0, None) == 0  # cache_limit 0 disables MLX's cache
    for bad in (True, -1, 1.5, "8GB"):
        with pytest.raises(UserError):
            resolve_limit(bad, 10**9)
    with pytest.raises(UserError, match="memory.cache_limit"):
        resolve_limit(0.5, None, "memory.cache_limit")


def test_device_bytes_prefers_the_recommended_working_set():
    assert device_memory_bytes(METAL_INFO) == 11453251584
    assert device_memory_bytes({"memory_size": 17179869184}) == 17179869184
    assert device_memory_bytes(CPU_INFO) is None
    assert resolve_limit(0.5, device_memory_bytes(METAL_INFO)) == 5726625792


def test_wired_limit_is_bounded_by_the_recommended_working_set():
    assert resolve_wired_limit(0.75, METAL_INFO) == int(0.75 * 11453251584)
    assert resolve_wired_limit(8 * 2**30, METAL_INFO) == 8 * 2**30
    with pytest.raises(UserError, match="memory.wired_limit"):
        resolve_wired_limit(12 * 2**30, METAL_INFO)
    with pytest.raises(UserError, match="memory.wired_limit"):
        resolve_wired_limit(0.5, CPU_INFO)  # a fraction of an unknown size


def test_config_validation_names_the_field():
    with pytest.raises(UserError, match="memory.clear_cache_share"):
        MemoryConfig(clear_every=0, clear_cache_share=1.5)
    with pytest.raises(UserError, match="memory.clear_fraction"):
        MemoryConfig(clear_every=0, clear_fraction=-0.1)
    with pytest.raises(UserError, match="memory.oom_min_batch"):
        MemoryConfig(clear_every=0, oom_min_batch=0)
    with pytest.raises(UserError, match="memory.cache_limit"):
        MemoryConfig(clear_every=0, cache_limit=2.5)
    with pytest.raises(UserError, match="memory.clear_every"):
        MemoryConfig(clear_every=-1)


# A recorded run: active memory flat at 1 GB, the cache growing through an epoch, a drop at step 7.
CACHE_GB = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 0.1, 0.3, 1.5]


def replay(cfg, cache_gb=CACHE_GB, active_gb=1.0):
    fired, last = [], None
    for step, c in enumerate(cache_gb):
        s = MemorySample(active=int(active_gb * GB), cache=int(c * GB), peak=0, phase="rollout", t=float(step))
        due, reason = clear_decision(s, cfg, step, last)
        if due:
            fired.append((step, reason))
            last = step
        else:
            assert reason is None
    return fired


def test_cache_share_rule_fires_when_cache_exceeds_active():
    # cache share > 0.5 <=> cache > active
    assert replay(MemoryConfig(clear_every=0, clear_cache_share=0.5)) == [
        (5, "cache_share"), (6, "cache_share"), (9, "cache_share")]
    assert replay(MemoryConfig(clear_every=0, clear_cache_share=0.5, clear_min_interval=3)) == [
        (5, "cache_share"), (9, "cache_share")]
    # 0.4 <=> cache > 2/3 of active
    assert [s for s, _ in replay(MemoryConfig(clear_every=0, clear_cache_share=0.4))] == [3, 4, 5, 6, 9]


def test_tiny_caches_are_not_cleared_for_cache_share():
    cfg = MemoryConfig(clear_every=0, clear_cache_share=0.5)
    s = MemorySample(active=0, cache=4, peak=4, phase="rollout", t=0.0)
    assert clear_decision(s, cfg, 1, None) == (False, None)
    cfg = MemoryConfig(clear_every=0, clear_cache_share=0.5, clear_min_cache_gb=0)
    assert clear_decision(s, cfg, 1, None) == (True, "cache_share")


def test_cache_size_and_periodic_rules():
    cfg = MemoryConfig(clear_every=0, clear_cache_share=None, clear_cache_gb=1.1)
    assert replay(cfg) == [(5, "cache_size"), (6, "cache_size"), (9, "cache_size")]
    cfg = MemoryConfig(clear_cache_share=None, clear_every=4)
    assert replay(cfg) == [(4, "periodic"), (8, "periodic")]
    # both due: the cache share is reported first
    cfg = MemoryConfig(clear_cache_share=0.5, clear_every=3)
    assert replay(cfg) == [(3, "periodic"), (5, "cache_share"), (6, "cache_share"), (9, "cache_share")]
    assert replay(MemoryConfig(clear_every=0, clear_cache_share=None)) == []
    assert replay(MemoryConfig(clear_every=0, clear_cache_share=0)) == []  # 0 is off too


def test_trim_target():
    assert trim_target(1000, None) == 0
    assert trim_target(1000, 0) == 0
    assert trim_target(1000, 1.0) == 0
    assert trim_target(1000, 0.25) == 750


def test_halve_batch():
    assert halve_batch(8, 1) == 4
    assert halve_batch(3, 1) == 1
    assert halve_batch(5, 4) == 4
    assert halve_batch(1, 1) is None
    assert halve_batch(4, 4) is None


def test_is_oom_error_matches_mlx_messages_only():
    assert is_oom_error(RuntimeError(OOM))
    assert is_oom_error(RuntimeError("[malloc] Unable to allocate 1073741824 bytes."))
    assert is_oom_error(RuntimeError(
        "[metal::malloc] Attempting to allocate 17179869184 bytes which is greater than the maximum "
        "allowed buffer size of 9663676416 bytes."))
    assert is_oom_error(RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory"))
    assert is_oom_error(MemoryError())
    assert not is_oom_error(RuntimeError("[matmul] Last dimension of first input must match"))
    assert not is_oom_error(ValueError("out of memory"))


@pytest.fixture
def mlx_limits():
    """Restore MLX's global limits and empty its cache around a test."""
    cache = mx.set_cache_limit(0)
    mx.set_cache_limit(cache)
    memory = mx.set_memory_limit(mx.set_memory_limit(0))
    mx.clear_cache()
    yield cache
    mx.set_cache_limit(cache)
    mx.set_memory_limit(memory)
    mx.clear_cache()


def fill_cache(n=10, shape=(256, 1024)):
    """Allocate n float32 buffers (1 MiB each by default) and free them: they land in MLX's cache."""
    xs = [mx.ones(shape) + i for i in range(n)]
    mx.eval(xs)
    del xs
    return mx.get_cache_memory()


def test_the_first_steps_peak_leaves_out_what_came_before_the_manager(mlx_limits):
    big = mx.ones((64, 1024, 1024))  # 256 MiB, freed before the manager exists
    mx.eval(big)
    del big
    mx.clear_cache()
    held = mx.get_active_memory()  # whatever else this process holds (other tests' arrays)
    assert mx.get_peak_memory() >= held + 256 * 2**20
    mgr = MemoryManager(MemoryConfig(clear_every=0), device_info=CPU_INFO)
    small = mx.ones((1024, 1024))  # 4 MiB
    mx.eval(small)
    mgr.sample("update")
    assert mgr.step_metrics()["memory/peak_gb"] * GB < held + 128 * 2**20


def test_oom_backoff_halves_until_it_fits(mlx_limits):
    mgr = MemoryManager(MemoryConfig(clear_every=0), device_info=CPU_INFO)
    calls = []

    def step(batch):
        calls.append(batch)
        if batch > 3:
            raise RuntimeError(OOM)
        return mx.sum(mx.ones((batch, 8))).item()

    assert mgr.run_with_oom_backoff(step, 16, step=7) == 2 * 8
    assert calls == [16, 8, 4, 2]
    assert [(e.batch, e.new_batch, e.step) for e in mgr.events] == [(16, 8, 7), (8, 4, 7), (4, 2, 7)]
    assert all(isinstance(e, OomEvent) and e.message == OOM for e in mgr.events)
    assert mgr.last_ok_batch == 2
    assert mgr.step_metrics()["memory/oom_events"] == 3


def test_oom_backoff_reraises_at_the_minimum_batch(mlx_limits):
    mgr = MemoryManager(MemoryConfig(clear_every=0, oom_min_batch=2), device_info=CPU_INFO)

    def step(batch):
        raise RuntimeError(OOM)

    with pytest.raises(RuntimeError, match="Resource limit"):
        mgr.run_with_oom_backoff(step, 8)
    assert [(e.batch, e.new_batch) for e in mgr.events] == [(8, 4), (4, 2), (2, None)]


def test_oom_backoff_leaves_other_errors_alone(mlx_limits):
    mgr = MemoryManager(MemoryConfig(clear_every=0), device_info=CPU_INFO)
    calls = []

    def step(batch):
        calls.append(batch)
        raise RuntimeError("[matmul] shapes do not match")

    with pytest.raises(RuntimeError, match="matmul"):
        mgr.run_with_oom_backoff(step, 8)
    assert calls == [8] and mgr.events == []


def test_apply_limits_sets_mlx_limits(mlx_limits):
    mgr = MemoryManager(MemoryConfig(clear_every=0, cache_limit=123_456_789, memory_limit=6_000_000_000), device_info=CPU_INFO)
    applied = mgr.apply_limits()
    assert applied == {"memory_limit": 6_000_000_000, "cache_limit": 123_456_789}
    assert mx.set_cache_limit(mlx_limits) == 123_456_789  # set_* returns the limit in force
    assert mx.set_memory_limit(mgr.previous_limits["memory_limit"]) == 6_000_000_000
    assert mgr.previous_limits["cache_limit"] == mlx_limits


def test_apply_limits_resolves_fractions_against_device_info(mlx_limits):
    cfg = MemoryConfig(clear_every=0, cache_limit=0.25, wired_limit=0.5)
    mgr = MemoryManager(cfg, device_info=METAL_INFO)
    applied = mgr.apply_limits()
    assert applied["cache_limit"] == int(0.25 * 11453251584)
    assert mx.set_cache_limit(mlx_limits) == int(0.25 * 11453251584)
    if mx.metal.is_available():
        assert applied["wired_limit"] == int(0.5 * 11453251584)
    else:  # only set on Metal; resolve_wired_limit is tested above
        assert "wired_limit" not in applied
        # a fraction of an unknown working set is no error where the wired limit is not used
        assert MemoryManager(MemoryConfig(clear_every=0, wired_limit=0.5), device_info=CPU_INFO).apply_limits() == {}


def test_fraction_limits_fall_back_to_physical_memory_on_cpu(mlx_limits):
    mgr = MemoryManager(MemoryConfig(clear_every=0, cache_limit=0.5), device_info=CPU_INFO)
    assert mgr.device_bytes and mgr.device_bytes > 2**28
    assert mgr.apply_limits() == {"cache_limit": int(0.5 * mgr.device_bytes)}


def test_sample_reads_mlx_memory(mlx_limits):
    ticks = iter(range(100))
    mgr = MemoryManager(MemoryConfig(clear_every=0), device_info=CPU_INFO, clock=lambda: float(next(ticks)))
    a = mx.ones((1024, 1024))  # 4 MiB
    mx.eval(a)
    s = mgr.sample("rollout")
    assert s.phase == "rollout" and s.t == 0.0
    assert s.active >= 4 * 2**20
    assert s.peak >= s.active
    assert s.cache == mx.get_cache_memory()
    del a
    s2 = mgr.sample("update")
    assert s2.active <= s.active - 4 * 2**20 and s2.cache >= 4 * 2**20
    assert s2.cache_share > s.cache_share
    m = mgr.step_metrics()
    assert m["memory/phase/rollout/active_gb"] == s.active / GB
    assert m["memory/phase/update/cache_gb"] == s2.cache / GB
    assert m["memory/active_gb"] == s2.active / GB
    assert m["memory/cache_share"] == s2.cache_share
    assert m["memory/peak_gb"] >= 4 * 2**20 / GB
    assert m["memory/clear_events"] == 0 and m["memory/freed_gb"] == 0
    assert mx.get_peak_memory() < s.peak  # reset for the next step
    assert "memory/phase/rollout/active_gb" not in mgr.step_metrics()  # per-step phases start over


def test_maybe_clear_frees_the_cache(mlx_limits):
    # a cache-size trigger: the cache share depends on what else this process holds (other tests' models)
    cfg = MemoryConfig(clear_every=0, clear_cache_share=None, clear_cache_gb=0.008, clear_min_cache_gb=0.001, clear_fraction=None)
    mgr = MemoryManager(cfg, device_info=CPU_INFO)
    cached = fill_cache()
    assert cached >= 10 * 2**20
    sample = mgr.sample("rollout")
    event = mgr.maybe_clear(step=3)
    assert event is not None and event.reason == "cache_size" and event.step == 3
    assert event.cache_before == cached and event.cache_after == 0 and event.freed_bytes == cached
    assert not event.partial and event.cache_share == sample.cache_share and event.ms >= 0
    assert mx.get_cache_memory() == 0
    assert mgr.maybe_clear(step=3) is None  # at most one proactive clear per step
    fill_cache()
    mgr.sample("rollout")
    second = mgr.maybe_clear(step=4)
    assert second is not None
    m = mgr.step_metrics()
    assert m["memory/clear_events"] == 2
    assert m["memory/freed_gb"] == pytest.approx((event.freed_bytes + second.freed_bytes) / GB)
    assert mgr.events == [event, second]
    assert event.fields()["reason"] == "cache_size" and event.kind == "memory/clear"


def test_maybe_clear_trims_by_fraction_and_restores_the_limit(mlx_limits):
    cfg = MemoryConfig(clear_every=0, clear_cache_share=None, clear_cache_gb=0.008, clear_min_cache_gb=0.001, clear_fraction=0.5)
    mgr = MemoryManager(cfg, device_info=CPU_INFO)
    cached = fill_cache(n=10)
    mgr.sample("rollout")
    event = mgr.maybe_clear(step=1)
    assert event.partial
    # LRU buffers are evicted until the cache fits half its size: at most half is left, not all freed
    assert 0 < event.cache_after <= cached // 2
    assert event.freed_bytes == cached - event.cache_after
    assert mx.set_cache_limit(mlx_limits) == mlx_limits  # the limit in force was restored


def test_clear_every_on_a_real_manager(mlx_limits):
    mgr = MemoryManager(MemoryConfig(clear_cache_share=None, clear_every=2), device_info=CPU_INFO)
    reasons = []
    for step in range(1, 6):
        fill_cache(n=2)
        mgr.sample("rollout")
        ev = mgr.maybe_clear(step)
        reasons.append(ev and ev.reason)
    assert reasons == [None, "periodic", None, "periodic", None]


# --- what the OS says, pressure and growth ---------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_footprint_is_the_resident_size_the_os_reports():
    from mlx_coach.runtime.memory import process_footprint

    def vm_rss():
        line = next(ln for ln in open("/proc/self/status") if ln.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    before = (vm_rss(), process_footprint(), vm_rss())
    assert min(before[0], before[2]) - 8 * 2**20 <= before[1] <= max(before[0], before[2]) + 8 * 2**20
    held = bytearray(256 * 2**20)  # touched pages count as resident
    held[:: 4096] = b"x" * len(held[:: 4096])
    grown = process_footprint()
    assert grown - before[1] >= 200 * 2**20
    del held


def test_pressure_rule_compares_the_footprint_with_the_limit():
    cfg = MemoryConfig(clear_every=0, clear_pressure=0.8)
    gb = int(GB)
    calm = MemorySample(active=1 * gb, cache=1 * gb, peak=0, phase="p", t=0.0, footprint=7 * gb)
    tight = MemorySample(active=1 * gb, cache=1 * gb, peak=0, phase="p", t=0.0, footprint=9 * gb)
    assert clear_decision(calm, cfg, 1, None, limit=10 * gb) == (False, None)
    assert clear_decision(tight, cfg, 1, None, limit=10 * gb) == (True, "pressure")
    assert clear_decision(tight, MemoryConfig(clear_every=0, clear_pressure=None), 1, None, limit=10 * gb) == (False, None)
    # without an OS number, MLX's own active + cache stand in for the footprint
    no_os = MemorySample(active=5 * gb, cache=4 * gb, peak=0, phase="p", t=0.0)
    assert clear_decision(no_os, cfg, 1, None, limit=10 * gb) == (True, "pressure")
    empty_cache = MemorySample(active=9 * gb, cache=0, peak=0, phase="p", t=0.0, footprint=9 * gb)
    assert clear_decision(empty_cache, cfg, 1, None, limit=10 * gb) == (False, None)  # nothing to free


def test_growth_rule_fires_on_a_cache_that_grew_every_step():
    cfg = MemoryConfig(clear_every=0, clear_growth_steps=3, clear_pressure=None, clear_min_cache_gb=0.0)
    s = MemorySample(active=1, cache=40, peak=0, phase="p", t=0.0)
    assert clear_decision(s, cfg, 5, None, cache_history=[10, 20, 30, 40]) == (True, "growth")
    assert clear_decision(s, cfg, 5, None, cache_history=[10, 20, 20, 40]) == (False, None)  # one flat step
    assert clear_decision(s, cfg, 5, None, cache_history=[20, 30, 40]) == (False, None)  # too short a history


def test_step_metrics_carry_footprint_and_distinct_shapes(mlx_limits):
    mgr = MemoryManager(MemoryConfig(clear_every=0, clear_pressure=None), device_info=CPU_INFO)
    mgr.note_shapes("generate", [(8, 1), (8, 1), (4, 1)])
    mgr.note_shapes("update", [(8, 64)])
    mgr.sample("update")
    m = mgr.step_metrics()
    assert m["memory/distinct_shapes"] == m["memory/new_shapes"] == 3
    if sys.platform.startswith("linux"):
        assert m["memory/footprint_gb"] > 0 and m["memory/phase/update/footprint_gb"] > 0
    assert mgr.step_metrics()["memory/distinct_shapes"] == 0  # per step
    mgr.note_shapes("update", [(8, 64), (8, 96)])
    m = mgr.step_metrics()
    assert (m["memory/distinct_shapes"], m["memory/new_shapes"]) == (2, 1)  # (8, 64) was seen two steps ago
