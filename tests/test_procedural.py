"""Procedural tasks: canonical bodies pass and near misses fail in the real sandbox, instances are a
function of their seed, the held-out split shares nothing with training, the config keys reach them."""

import ast
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from mlx_coach.data import procedural as P
from mlx_coach.config.tree import load_config
from mlx_coach.core.errors import UserError
from mlx_coach.rewards.scoring.sandbox import build_program
from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
from mlx_coach.rewards.scoring.sandbox_scorer import SandboxScorer
from mlx_coach.data.task import Task
from mlx_coach.data.tasks import load_tasks
from mlx_coach.rl.setup import select_tasks

NONE_BODY = "    return None\n"
ALL_TEMPLATES = {(f, t.name) for f, ts in P.FAMILIES.items() for t in ts}


@pytest.fixture(scope="module")
def default_split():
    return P.procedural_split()  # what data.tasks: procedural uses with default options


@pytest.fixture(scope="module")
def scorer():
    with SandboxScorer(SandboxConfig(timeout_s=30.0, workers=2)) as s:
        yield s


def one_per_template(n=400):
    """(task, near miss) for one instance of every template, from the training stream."""
    found = {}
    for task, wrong in P.generate_with_near_misses(n, seed=7):
        found.setdefault((task.tags["category"], task.tags["template"]), (task, wrong))
    assert set(found) == ALL_TEMPLATES  # 400 draws reach every template
    return list(found.values())


def test_five_families_with_templates_at_every_level():
    assert set(P.FAMILIES) == {"strings", "lists", "arithmetic", "dicts", "parsing"}
    for family, templates in P.FAMILIES.items():
        assert len(templates) >= 8, family
        assert {t.level for t in templates} == {1, 2, 3, 4, 5}, family  # every family spans the knob


def test_each_template_canonical_passes_and_near_misses_fail_in_the_sandbox(scorer):
    """Through the sandbox's normal path (one program per run): one instance of every template."""
    pairs = one_per_template()
    items = [(t, t.canonical_solution) for t, _ in pairs] + [(t, w) for t, w in pairs] + \
            [(t, NONE_BODY) for t, _ in pairs]
    scores = scorer.score_batch(items)
    n = len(pairs)
    for (task, _), s in zip(pairs, scores[:n]):
        assert s.status == "passed", (task.task_id, task.tags["template"], s.error)
    for (task, _), s in zip(pairs + pairs, scores[n:]):
        assert s.status != "passed" and s.value == 0.0, (task.task_id, task.tags["template"])


def _bundle(tasks_and_bodies):
    """One sandbox task that runs many programs (each build_program(task, body), in a fresh
    namespace) inside the sandbox's worker and asserts the list of which ones passed."""
    programs = [build_program(t, body) for t, body in tasks_and_bodies]
    prompt = f"PROGRAMS = {programs!r}\n\n\ndef run_all():\n"
    body = ("    out = []\n    for src in PROGRAMS:\n        try:\n            exec(src, {'__name__': '__task__'})\n"
            "            out.append(True)\n        except Exception:\n            out.append(False)\n    return out\n")
    return Task("bundle", prompt, "run_all", "def check(candidate):\n    r = candidate()\n"
                "    bad = [i for i, ok in enumerate(r) if ok != EXPECTED]\n    assert not bad, bad\n"), body


def test_every_default_task_passes_its_tests_and_rejects_its_near_miss(default_split, scorer):
    """All 2,300 default instances (training and held out), in bundles of 100 programs per sandbox run."""
    train, heldout = default_split
    pairs = P.generate_with_near_misses(len(train), 0) + P.generate_with_near_misses(
        len(heldout), 0, split="heldout", exclude=frozenset(t.prompt for t in train))
    assert [t for t, _ in pairs] == train + heldout
    items = []
    for expected, which in ((True, lambda t, w: t.canonical_solution), (False, lambda t, w: w),
                            (False, lambda t, w: NONE_BODY)):
        for i in range(0, len(pairs), 100):
            chunk = [(t, which(t, w)) for t, w in pairs[i: i + 100]]
            task, body = _bundle(chunk)
            task = Task(task.task_id, task.prompt, task.entry_point, f"EXPECTED = {expected}\n" + task.test)
            items.append((task, body, chunk))
    scores = scorer.score_batch([(t, b) for t, b, _ in items])
    for (_, _, chunk), s in zip(items, scores):
        assert s.status == "passed", (s.error, [chunk[0][0].task_id])
    # and the bundle itself can fail: one canonical body expected to fail is reported
    task, body = _bundle([(train[0], train[0].canonical_solution)])
    bad = Task("bundle", task.prompt, task.entry_point, "EXPECTED = False\n" + task.test)
    assert scorer.score_batch([(bad, body)])[0].status == "failed"


def test_tasks_are_humaneval_shaped(default_split):
    train, heldout = default_split
    for t in train[:300] + heldout[:100]:
        func = ast.parse(t.prompt + NONE_BODY).body[-1]
        assert isinstance(func, ast.FunctionDef) and func.name == t.entry_point, t.task_id
        assert ast.get_docstring(func) and t.prompt.count(f">>> {t.entry_point}(") == P.N_EXAMPLES, t.task_id
        (check,) = ast.parse(t.test).body
        assert check.name == "check" and len(check.body) >= P.MIN_CASES, t.task_id  # edge cases + random inputs
        assert all(isinstance(s, ast.Assert) for s in check.body), t.task_id
        assert t.tags["source"] == "procedural" and t.tags["difficulty"] in range(1, 6)


def test_instances_are_a_function_of_the_seed():
    a = P.generate(60, seed=3)
    b = P.generate(60, seed=3)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    c = P.generate(60, seed=4)
    assert len({x.prompt for x in a} & {x.prompt for x in c}) < 10  # another seed, other tasks
    # instance i does not depend on how many are asked for
    assert [x.to_dict() for x in P.generate(20, seed=3)] == [x.to_dict() for x in a[:20]]
    # nor on the process: string hashing is randomised per process, and no set order leaks in
    code = ("import hashlib, json; from mlx_coach.data.procedural import generate; "
            "print(hashlib.sha256(json.dumps([t.to_dict() for t in generate(60, 3)]).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": h},
                              capture_output=True, text=True, check=True).stdout for h in ("1", "2")}
    assert digests == {hashlib.sha256(json.dumps([t.to_dict() for t in a]).encode()).hexdigest() + "\n"}


def test_heldout_shares_no_instance_or_prompt_with_training(default_split):
    train, heldout = default_split
    assert len(train) == P.DEFAULT_COUNT and len(heldout) == P.DEFAULT_HELDOUT
    assert {t.tags["split"] for t in train} == {"train"} and {t.tags["split"] for t in heldout} == {"heldout"}
    assert not {t.task_id for t in train} & {t.task_id for t in heldout}
    assert not {t.prompt for t in train} & {t.prompt for t in heldout}
    assert len({t.prompt for t in train}) == len(train) and len({t.prompt for t in heldout}) == len(heldout)
    # the held-out split covers every family and level, so it can show where a model improved
    assert set(Counter(t.tags["category"] for t in heldout)) == set(P.FAMILIES)
    assert set(Counter(t.tags["difficulty"] for t in heldout)) == {1, 2, 3, 4, 5}


def test_heldout_skips_a_prompt_that_training_holds():
    train = P.generate(50, seed=1, difficulty=(1, 1))
    first = P.generate(1, seed=1, difficulty=(1, 1), split="heldout")[0]
    excluded = P.generate(1, seed=1, difficulty=(1, 1), split="heldout", exclude=frozenset([first.prompt]))[0]
    assert excluded.prompt != first.prompt
    assert int(excluded.task_id.rsplit("/", 1)[1]) > int(first.task_id.rsplit("/", 1)[1])
    _, heldout = P.procedural_split(50, 50, seed=1, difficulty=(1, 1))
    assert not {t.prompt for t in train} & {t.prompt for t in heldout}


def test_difficulty_and_families_select_templates():
    tasks = P.generate(200, seed=0, difficulty=(4, 5), families=["lists", "parsing"])
    assert {t.tags["difficulty"] for t in tasks} == {4, 5}
    assert {t.tags["category"] for t in tasks} == {"lists", "parsing"}
    levels = {t.tags["template"]: t.tags["difficulty"] for t in tasks}
    lookup = {t.name: t.level for f in ("lists", "parsing") for t in P.FAMILIES[f]}
    assert all(lookup[name] == level for name, level in levels.items())


def test_config_keys_reach_the_generator(tmp_path):
    cfg = load_config(None, ["data.tasks=procedural", "data.procedural_count=40", "data.procedural_heldout=12",
                             "data.procedural_seed=5", "data.difficulty_min=2", "data.difficulty_max=3",
                             "data.families=[dicts, strings]"])
    train, val = select_tasks(cfg.data)
    assert len(train) == 40 and len(val) == 12
    assert {t.tags["category"] for t in train + val} <= {"dicts", "strings"}
    assert {t.tags["difficulty"] for t in train + val} <= {2, 3}
    assert [t.to_dict() for t in train] == [t.to_dict() for t in P.generate(40, 5, (2, 3), ["dicts", "strings"])]
    assert load_tasks("procedural:heldout")[:3] == P.procedural_split()[1][:3]


@pytest.mark.parametrize("override, key", [
    ("data.families=[lists, graphs]", "data.families"),
    ("data.difficulty_min=4", "data.difficulty_min"),  # above difficulty_max=3 below
    ("data.difficulty_max=6", "data.difficulty_max"),
])
def test_bad_procedural_config_names_the_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, ["data.tasks=procedural", "data.difficulty_max=3", override]
                    if key == "data.difficulty_min" else ["data.tasks=procedural", override])
