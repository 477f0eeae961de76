"""The README's quick start, run once per test session: its two commands as the README writes them, and
the training run of the first one, made in a scratch folder that holds a copy of configs/ (so `runs/` lands
there, not in the checkout). test_quickstart.py checks what the run shows; test_readme.py runs the README's
other commands against it."""

import atexit
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_section(title, page="README.md"):
    text = (ROOT / page).read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else None]


def fenced(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def readme_commands():
    """Every command of the README's fenced bash blocks, in order: one per line, comments dropped."""
    lines = []
    for block in fenced((ROOT / "README.md").read_text(), "bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def quickstart_commands():
    """The quick start's two commands: (install and train, run the tests)."""
    install = [c for c in readme_commands() if c.startswith("pip install")]
    tests = [c for c in readme_commands() if "pytest" in c]
    assert len(install) == 1 and len(tests) == 1, (install, tests)
    return install[0], tests[0]


def train_command():
    """The training part of the README's first command (`... && mlx-coach train -c CONFIG`), as argv."""
    last = quickstart_commands()[0].split("&&")[-1].strip()
    assert last.startswith("mlx-coach train "), last
    return shlex.split(last)


def cli(argv, cwd, timeout=300):
    """A README command line starting with `mlx-coach`, as `python -m mlx_coach` of this checkout (what the
    console script runs), in `cwd`."""
    assert argv[0] == "mlx-coach", argv
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "mlx_coach", *argv[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def quickstart_run():
    """(scratch folder, the finished process) of the quick start's training run, made once per session."""
    work = Path(tempfile.mkdtemp(prefix="quickstart-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    shutil.copytree(ROOT / "configs", work / "configs")
    return work, cli(train_command(), work)
