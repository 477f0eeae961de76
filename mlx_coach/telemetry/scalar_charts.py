"""TensorBoard's custom-scalar charts (`custom_scalar_layout`) and the unit each tag is in (`unit_of`).

A custom-scalar chart has one y-axis, so each chart holds series of one unit; a test checks every
chart against the tags a real run logs. Two units side by side (tok/s against hit rate or memory) are
the run report's two-axis PNGs (report.py), which the trainer also logs to the Images tab.
"""

TOKS = "gen/tokens_per_sec"
FRAG = "memory/cache_share"


def unit_of(tag):
    """The unit a tag's values are in, read from its name: what may share one y-axis."""
    if tag.startswith("gen/tokens_per_sec_rel"):
        return "x the first steps' tok/s"
    if "tokens_per_sec" in tag:
        return "tok/s"
    if tag.endswith("_gb"):
        return "GB"
    if "hit_rate" in tag or "cache_share" in tag or tag.endswith("_frac") or "pass@" in tag:
        return "fraction"
    if tag.startswith("reward/") and tag.endswith(("_mean", "/mean", "/ema")):
        return "reward"
    if tag.startswith("loss/"):
        return "loss"
    return "other"


def custom_scalar_layout():
    """The charts of TensorBoard's custom-scalars tab, each of one unit (`unit_of`). Tags are anchored regexes."""
    exact = lambda *tags: [f"^{t}$" for t in tags]  # noqa: E731
    return {
        "mlx-coach": {
            "tok/s: per step and by epoch phase": ["Multiline", exact(TOKS) + ["^gen/tokens_per_sec_by_phase/"]],
            "cache hit rate: per step and by epoch phase": [
                "Multiline", exact("cache/hit_rate") + ["^cache/hit_rate_by_phase/"]],
            "MLX cache share: per step and by epoch phase": ["Multiline", exact(FRAG) + ["^memory/cache_share_by_phase/"]],
            "reward: fresh vs cached": [
                "Multiline",
                exact("reward/fresh_mean", "reward/cached_mean", "reward/mean"),
            ],
            "loss": ["Multiline", exact("loss/total", "loss/policy", "loss/kl", "loss/total_ema")],
            # one unit (GB): what the OS charges the process next to what MLX holds
            "memory (GB): process footprint vs MLX active and cache": [
                "Multiline", exact("memory/footprint_gb", "memory/active_gb", "memory/cache_gb")],
        }
    }
