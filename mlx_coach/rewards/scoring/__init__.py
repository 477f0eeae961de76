"""Scorers: one sample in, a `Score` out (base); the sandbox (sandbox_config, sandbox, sandbox_scorer and the
`_*.py` scripts it runs), the teachers (grading, judge_config, http_judge, local_teacher), and the caching
wrapper (cached). Part of `rewards`: may import the floors below it; the `_*.py` scripts import nothing
of the package (they run in the sample's own interpreter)."""
