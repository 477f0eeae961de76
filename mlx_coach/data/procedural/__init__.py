"""Procedural tasks: families of small Python functions, generated from a seed, with a difficulty knob.

`template` holds what a template is, the random inputs templates draw and `build` (instance -> Task with
tests that reject its near miss); `strings`, `lists`, `arithmetic`, `dicts`, `parsing` hold one family's
templates each (levels 1 easiest .. 5 hardest); `split` holds the family registry and the seeded training
and held-out splits. Part of `data`: imports core and `data.task` only.
"""

from mlx_coach.data.procedural.split import (DEFAULT_COUNT, DEFAULT_HELDOUT, FAMILIES, check_families, generate,
                                             generate_with_near_misses, procedural_split)
from mlx_coach.data.procedural.template import MIN_CASES, N_EXAMPLES

__all__ = ["DEFAULT_COUNT", "DEFAULT_HELDOUT", "FAMILIES", "MIN_CASES", "N_EXAMPLES", "check_families", "generate",
           "generate_with_near_misses", "procedural_split"]
