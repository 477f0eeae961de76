"""What a run shows: metrics.jsonl and TensorBoard, alerts, health statistics, the report, progress.

`writer` (Telemetry: metrics.jsonl, events, alerts, TensorBoard), `accumulators` (epoch phases,
PhaseAccumulator, Ema), `scalar_charts` (TensorBoard's custom-scalar layout, units of tags), `alerts`
(AlertConfig, Alert, AlertState), `alert_rules` (the rules), `health`, `report` (two-axis PNGs),
`plots` (the one chart helper), `progress` (bars, the step clock, the per-step line), `passk` (the
pass@k estimator). May import: core, runtime.
"""
