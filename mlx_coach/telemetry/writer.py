"""The run's log files and TensorBoard events: `Telemetry` writes them, `read_jsonl` reads them back.

Files in the run directory:

    events.out.tfevents.*   TensorBoard events, in run_dir itself so that `tensorboard --logdir runs/`
                            names each run after its directory (what the A/B comparison needs)
    metrics.jsonl           one object per `log` call: {"step": N, "tag": value, ...}, plus one
                            {"step": N, "epoch": E, "epoch_table": {...}} per epoch
    events.jsonl            {"step", "kind", "t", ...fields} per `event` (cache clears, memory clears, OOM)
    alerts.jsonl            {"step", "level", "code", "message", "action"} per alert

JSON has no NaN or infinity: non-finite floats are written as the strings "nan", "inf", "-inf"
(`read_jsonl` turns them back into floats). TensorBoard receives the real non-finite value.
A write that fails (disk full, read-only) raises WriteFailed naming the file, in the main thread, and
leaves no part of a row: a JSONL row is written whole or cut off again, an event file ends on a whole
record (event_files.py).
Epoch phases and the per-phase table are computed in accumulators.py; the custom-scalar charts
are declared in scalar_charts.py.
"""

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from tensorboardX.proto.summary_pb2 import Summary

from mlx_coach.core.errors import UserError
from mlx_coach.core.settings import check_fields, setting
from mlx_coach.runtime.stops import write_failed
from mlx_coach.telemetry import event_files
from mlx_coach.telemetry.accumulators import as_float, epoch_phase
from mlx_coach.telemetry.scalar_charts import custom_scalar_layout


@dataclass
class TelemetryConfig:
    """The `telemetry:` config section."""

    tensorboard: bool = setting(True, help="write TensorBoard event files beside metrics.jsonl")
    progress: bool = setting(True, help="a line per step on stderr")
    report: bool = setting(True, help="write RUN/report/ (report.md + PNG charts) at each epoch end and log "
                                      "the charts to TensorBoard's Images tab")
    phase_bounds: tuple = setting((1 / 3, 2 / 3), help="epoch fractions where the mid and late phases start")

    def __post_init__(self):
        check_fields(self, "telemetry")
        if len(self.phase_bounds) != 2:
            raise UserError("config key 'telemetry.phase_bounds' must be two fractions 0 < early < late < 1")
        epoch_phase(0.0, self.phase_bounds)  # raises UserError naming phase_bounds


def _finite_or_str(value):
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, dict):
        return {k: _finite_or_str(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_str(v) for v in value]
    try:
        value = float(value)  # numpy / mlx scalars
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _restore(value):
    if isinstance(value, str):
        return _NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


def read_jsonl(path):
    """Rows of a JSONL file written here, with "nan"/"inf"/"-inf" turned back into floats."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(_restore(json.loads(line)))
    return rows


def truncate_jsonl(path, purge_step):
    """Drop rows with step >= purge_step (and a torn last line) by rewriting the file atomically."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a line cut short by a crash
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] >= purge_step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise write_failed(path, e) from None
    return dropped


def markdown_table(rows, columns=None, label="phase"):
    """rows: {row_label: {column: value}} -> a markdown table (TensorBoard renders markdown text)."""
    if columns is None:
        columns = []
        for r in rows.values():
            columns += [c for c in r if c not in columns]
    lines = [f"| {label} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Telemetry:
    def __init__(self, run_dir, *, tensorboard=True, console=True, purge_step=None, stream=None):
        self.run_dir = str(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.console = console
        self.stream = stream
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.events_path = os.path.join(self.run_dir, "events.jsonl")
        self.alerts_path = os.path.join(self.run_dir, "alerts.jsonl")
        if purge_step is not None:
            for path in (self.metrics_path, self.events_path, self.alerts_path):
                truncate_jsonl(path, purge_step)
        self._files = {}
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # Non-finite scalars are written on purpose (the "nonfinite" alert reports them).
            logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
            # Event files are named by the second; a resume within the same second would overwrite
            # the previous file, and readers apply purges in file-name order: suffix with the time in ns.
            try:
                self.writer = SummaryWriter(
                    event_files.guarded_logdir(self.run_dir),
                    purge_step=purge_step,
                    flush_secs=10,
                    filename_suffix=f".{time.time_ns()}",
                )
            except OSError as e:
                event_files.forget(self.run_dir)
                raise write_failed(f"TensorBoard events in {self.run_dir}", e) from None

    def _append(self, path, row):
        """One row, whole or not at all: a failed write cuts the file back to where it was."""
        data = (json.dumps(_finite_or_str(row)) + "\n").encode()
        try:
            fd = self._files.get(path)
            if fd is None:
                fd = self._files[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            end = os.fstat(fd).st_size  # one writer per run directory (its lock)
        except OSError as e:
            raise write_failed(path, e) from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise write_failed(path, e) from None

    def check_event_files(self):
        """WriteFailed if TensorBoard's writer thread failed to write an event file."""
        failed = event_files.first_failure(self.run_dir)
        if failed is not None:
            raise write_failed(*failed)

    def log(self, step, metrics):
        self.check_event_files()
        self._append(self.metrics_path, {"step": step, **metrics})
        if self.writer is not None:
            for tag, value in metrics.items():
                x = as_float(value)
                if x is not None:
                    self._scalar(tag, x, step)

    def _scalar(self, tag, value, step):
        # tensorboardX's add_scalar rewrites characters such as '@' ("eval/pass@1" -> "eval/pass_1");
        # TensorBoard itself accepts any tag, so write the summary proto with the tag as logged.
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
        self.writer._get_file_writer().add_summary(summary, step)

    def text(self, tag, text, step):
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def event(self, step, kind, **fields):
        self._append(self.events_path, {"step": step, "kind": kind, "t": time.time(), **fields})
        if self.writer is not None:
            self.writer.add_text(f"events/{kind}", markdown_table({kind: fields}, label="event"), step)
            for name, value in fields.items():
                x = None if isinstance(value, bool) else as_float(value)
                if x is not None:
                    self._scalar(f"events/{kind}/{name}", x, step)

    def alert(self, step, alert):
        row = {
            "step": step,
            "level": alert.level,
            "code": alert.code,
            "message": alert.message,
            "action": alert.action,
        }
        self._append(self.alerts_path, row)
        if self.console:
            print(
                f"[{alert.level.upper()}] step {step} {alert.code}: {alert.message} -> {alert.action}",
                file=self.stream or sys.stderr,
                flush=True,
            )
        if self.writer is not None:
            self.writer.add_text(
                f"alerts/{alert.code}", f"**{alert.level}**: {alert.message}\n\n*Action:* {alert.action}", step
            )

    def histogram(self, tag, values, step):
        """A TensorBoard histogram of `values` (nothing for an empty list)."""
        if self.writer is not None and len(values):
            self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), step, bins=np.linspace(0, 1, 11))

    def image(self, tag, hwc, step):
        if self.writer is not None:
            self.writer.add_image(tag, hwc, step, dataformats="HWC")

    def epoch_table(self, epoch, step, rows):
        self._append(self.metrics_path, {"step": step, "epoch": epoch, "epoch_table": rows})
        if self.writer is not None:
            self.writer.add_text("epoch/phase_table", f"epoch {epoch}\n\n" + markdown_table(rows), step)

    def custom_layout(self, layout=None):
        """Register the custom-scalars charts; once per writer (tensorboardX allows one call)."""
        if self.writer is not None:
            self.writer.add_custom_scalars(layout or custom_scalar_layout())

    def flush(self):
        """Rows are written as they come; TensorBoard's events are flushed here."""
        if self.writer is not None:
            self.writer.flush()
            self.check_event_files()

    def close(self):
        """Close every file, then raise WriteFailed if an event file could not be written."""
        for fd in self._files.values():
            os.close(fd)
        self._files = {}
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            try:
                self.check_event_files()
            finally:
                event_files.forget(self.run_dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SilentTelemetry:
    """What ranks other than 0 log to in a distributed run: nothing (rank 0 writes the run directory)."""

    def _nothing(self, *args, **kwargs):
        return None

    log = text = event = alert = image = histogram = epoch_table = custom_layout = flush = close = _nothing
