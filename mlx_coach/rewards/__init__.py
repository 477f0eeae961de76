"""Rewards: the sources a run combines, the score cache, the scorers behind it.

`sources` (RewardSet: weighted sum of sources, each sample's provenance), `cache` (ScoreCache, keys,
settings) with `cache_policies` (LRU/TTL stores) and `cache_sqlite` (persistence), `scoring/` (the
sandbox, teachers, the caching scorer), `teacher_server` (`mlx_lm.server` on loopback), `shaping` (dense
shaping rewards). May import every floor below: core, runtime, telemetry, models, engine, data.
"""
