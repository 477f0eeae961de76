"""The "tests" scorer: samples run in the sandbox (sandbox.py) on a pool of threads, each driving one
sample's processes at a time; its version names every setting that can change a verdict."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor

from mlx_coach.rewards.scoring.base import Score
from mlx_coach.rewards.scoring.sandbox import run_sample
from mlx_coach.rewards.scoring.sandbox_config import SandboxConfig


class SandboxScorer:
    """Unit tests in the sandbox; `workers` threads each drive one child process at a time."""

    name = "tests"
    version = "4"  # changes whenever the same sample and settings can get another verdict: it is in every cache key

    def __init__(self, cfg: SandboxConfig | None = None):
        self.cfg = cfg or SandboxConfig()
        # the cache key names every setting that can change a verdict (limits, partial credit, ...)
        settings = json.dumps(self.cfg.verdict_settings(), sort_keys=True)
        digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
        self.version = f"{SandboxScorer.version}-{'partial-' if self.cfg.partial_credit else ''}{digest}"
        self.workers = self.cfg.workers or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox")

    def submit(self, task, completion: str) -> Future:
        """Future[Score]: scoring starts as soon as a worker is free, so callers can keep generating."""
        return self._pool.submit(run_sample, task, completion, self.cfg)

    def score_batch(self, items) -> list[Score]:
        futures = [self.submit(task, completion) for task, completion in items]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
