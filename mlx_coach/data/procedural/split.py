"""The family registry and the splits: instance i of a split as a pure function of (seed, split, i).

Each instance is made by a `random.Random` seeded with a string (no set iteration, no hash()) that draws
the family, the level and the template, then the template's instance. The training and held-out splits
use different split names in their instance seeds, and an instance whose prompt was already produced (in
training, or earlier in its own split) is passed over, so the held-out split shares no prompt with training.
"""

from __future__ import annotations

import random
import textwrap

from mlx_coach.core.errors import UserError
from mlx_coach.data.procedural.arithmetic import ARITHMETIC
from mlx_coach.data.procedural.dicts import DICTS
from mlx_coach.data.procedural.lists import LISTS
from mlx_coach.data.procedural.parsing import PARSING
from mlx_coach.data.procedural.strings import STRINGS
from mlx_coach.data.procedural.template import build
from mlx_coach.data.task import Task

DEFAULT_COUNT = 2000  # training instances (data.procedural_count)
DEFAULT_HELDOUT = 300  # held-out instances (data.procedural_heldout)
# data.families=null (all) draws from the families in this order
FAMILIES = {"strings": STRINGS, "lists": LISTS, "arithmetic": ARITHMETIC, "dicts": DICTS, "parsing": PARSING}


def check_families(names):
    """`names` as a list of known family names without repeats (None: all); else a UserError."""
    if names is None:
        return list(FAMILIES)
    if not all(isinstance(n, str) for n in names):
        raise UserError("config key 'data.families' must be a list of family names")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise UserError(f"config key 'data.families': unknown family {unknown[0]!r}; "
                        f"choose from {', '.join(FAMILIES)}")
    if not names:
        raise UserError("config key 'data.families' is empty; leave it out for all families")
    return list(dict.fromkeys(names))


def _instance_rng(seed, split, index):
    return random.Random(f"mlx-coach-procedural:{seed}:{split}:{index}")


def _instance_spec(seed, split, index, families, difficulty):
    """(spec, tags) of instance `index` of `split`; the family, level and template are drawn first."""
    rng = _instance_rng(seed, split, index)
    lo, hi = difficulty
    choices = [f for f in families if any(lo <= t.level <= hi for t in FAMILIES[f])]
    family = rng.choice(choices)
    levels = sorted({t.level for t in FAMILIES[family] if lo <= t.level <= hi})
    level = rng.choice(levels)
    template = rng.choice([t for t in FAMILIES[family] if t.level == level])
    tags = {"source": "procedural", "category": family, "template": template.name, "difficulty": level,
            "seed": seed, "split": split, "index": index}
    return template.make(rng), tags, rng


def generate_with_near_misses(count, seed, difficulty=(1, 5), families=None, split="train",
                               exclude=frozenset()) -> list[tuple[Task, str]]:
    """`count` (task, near-miss body) pairs with distinct prompts, none of whose prompt is in `exclude`.

    Instance indices run 0, 1, 2, ...; an instance whose prompt was already produced is passed over,
    so ids can skip numbers. Fewer than `count` distinct prompts within 20 x count instances is a
    UserError (the families and levels chosen hold too few distinct tasks)."""
    families = check_families(families)
    lo, hi = difficulty
    if not (1 <= lo <= hi <= 5):
        raise UserError(f"config keys 'data.difficulty_min/max' must satisfy 1 <= min <= max <= 5; got {lo}, {hi}")
    out, seen = [], set(exclude)
    for index in range(20 * count):
        if len(out) == count:
            break
        spec, tags, rng = _instance_spec(seed, split, index, families, difficulty)
        task = build(spec, rng, f"procedural/{split}/{index}", tags)
        if task.prompt in seen:
            continue
        seen.add(task.prompt)
        out.append((task, textwrap.indent(spec.wrong, "    ") + "\n"))
    if len(out) < count:
        raise UserError(f"config key 'data.procedural_count': only {len(out)} distinct {split} tasks from "
                        f"{', '.join(families)} at difficulty {lo}..{hi}; ask for fewer")
    return out


def generate(count, seed, difficulty=(1, 5), families=None, split="train", exclude=frozenset()) -> list[Task]:
    """The tasks of `generate_with_near_misses`."""
    return [task for task, _ in generate_with_near_misses(count, seed, difficulty, families, split, exclude)]


def procedural_split(count=DEFAULT_COUNT, val_count=DEFAULT_HELDOUT, seed=0, difficulty=(1, 5),
                     families=None) -> tuple[list[Task], list[Task]]:
    """(training tasks, held-out tasks): disjoint instance seeds (split names "train" and "heldout")
    and no held-out prompt equal to a training prompt."""
    train = generate(count, seed, difficulty, families, "train")
    heldout = generate(val_count, seed, difficulty, families, "heldout",
                       exclude=frozenset(t.prompt for t in train)) if val_count else []
    return train, heldout