"""The peer job's tasks, chat prompt and reward, shared by the TRL and mlx-lm-lora drivers (standard library
only: the peers' virtual environments have no mlx-coach).

The tasks are the ones `mlx-coach bench step` trains on (benchmarks/step_tasks.jsonl): a function stub with
its docstring and a `check(candidate)` of three asserts. Every trainer sees the same chat: SYSTEM, then
USER with the stub in place of {prompt} (bench_step imports both from here). The reward follows mlx-coach's
`sandbox.partial_credit`: the program is the stub followed by the code of the answer's first fenced block
(the whole answer without one) and `candidate` bound to the entry point; then each assert runs on its own,
and the reward is the share that pass (0 if the program fails to load or the run outlasts TIMEOUT_S).
"""

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

TASKS = Path(__file__).resolve().parents[1] / "step_tasks.jsonl"
SYSTEM = "You are a Python coding assistant. Reply with one Python code block only."
USER = "Complete this Python function:\n```python\n{prompt}```"
TIMEOUT_S = 3.0
_BLOCK = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.S)
_MARK = "__peer_passed__"


def load_tasks(path=TASKS):
    """[{prompt, entry_point, asserts}] in file order; a task's index is its id in the drivers' datasets."""
    tasks = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            t = json.loads(line)
            asserts = [s.strip() for s in t["test"].splitlines() if s.strip().startswith("assert ")]
            tasks.append({"prompt": t["prompt"], "entry_point": t["entry_point"], "asserts": asserts})
    return tasks


def chat(task):
    """The task's chat messages: the system line and the user's request around the stub."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER.format(prompt=task["prompt"])}]


def answer_code(text):
    found = _BLOCK.search(text)
    return found.group(1) if found else text


def reward(text, task):
    """Share of the task's asserts that pass after the stub and the answer's code (see the module's text)."""
    count = ''.join(f"try:\n    {a}\n    {_MARK} += 1\nexcept BaseException:\n    pass\n" for a in task["asserts"])
    program = (f"{task['prompt']}{answer_code(text)}\ncandidate = {task['entry_point']}\n{_MARK} = 0\n{count}"
               f"print('{_MARK}', {_MARK})\n")
    try:
        out = subprocess.run([sys.executable, "-I", "-S", "-c", program], capture_output=True, text=True,
                             timeout=TIMEOUT_S).stdout
    except subprocess.TimeoutExpired:
        return 0.0
    found = re.search(rf"{_MARK} (\d+)", out)
    return int(found.group(1)) / len(task["asserts"]) if found else 0.0


def summary(name, steps, **extra):
    """The driver's last line: `PEER {json}` with the medians over steps 2.. (the first meets new shapes)."""
    timed = steps[1:] or steps
    med = lambda key: statistics.median(s[key] for s in timed)  # noqa: E731
    return "PEER " + json.dumps({"name": name, "median_step_s": med("step_s"), "median_generate_s": med("generate_s"),
                                 "steps": len(steps), **extra})
