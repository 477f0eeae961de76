"""What a run shows: metrics.jsonl and TensorBoard, alerts, health statistics, the report, progress.

`writer` (Telemetry, epoch phases, custom layouts), `alerts`, `health`, `report` (two-axis PNGs),
`plots` (the one chart helper), `progress` (bars and the step clock), `passk` (the pass@k
estimator). May import: core, runtime.
"""
