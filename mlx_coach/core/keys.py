"""Keyed draws: a random draw's key is a pure function of the run's seed, the draw's purpose and its ids.

`draw_key(seed, "lora_init", name)`, `draw_key(seed, "sample", step, place, sample_index)`, ... give MLX PRNG
keys that depend on nothing else: not on MLX's global generator, not on what was built, cached or drawn
before, not on the process. So a run draws the same whatever ran before it in the process, and a draw
made on another rank (or in another batch) for the same purpose and ids is the same draw.

The key comes from BLAKE2b over a canonical encoding of (seed, purpose, ids) (never `hash()`, which is
salted per process for strings): each part is tagged with its type and prefixed by its length, so
("a", 12) and ("a1", 2), or 1 and "1", never encode alike.
"""

import hashlib

import mlx.core as mx

_PERSON = b"mlx-coach-keys"


def _part(value) -> bytes:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"a keyed draw's seed, purpose and ids are ints or strings, got {value!r}")
    tag, body = (b"i", str(value).encode()) if isinstance(value, int) else (b"s", value.encode("utf-8"))
    return tag + len(body).to_bytes(8, "little") + body


def draw_seed(seed: int, purpose: str, *ids) -> int:
    """A 64-bit integer fixed by (seed, purpose, ids): for the places that take a seed, not a key
    (`mx.random.seed` before a draw MLX makes from its global generator, such as LoRA dropout)."""
    if not isinstance(purpose, str) or not purpose:
        raise TypeError(f"a keyed draw's purpose is a non-empty string, got {purpose!r}")
    h = hashlib.blake2b(digest_size=8, person=_PERSON)
    for value in (seed, purpose, *ids):
        h.update(_part(value))
    return int.from_bytes(h.digest(), "little")


def draw_key(seed: int, purpose: str, *ids) -> mx.array:
    """The MLX PRNG key (`mx.random.key`) of the draw for `purpose` with these ids under `seed`."""
    return mx.random.key(draw_seed(seed, purpose, *ids))
