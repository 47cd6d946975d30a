"""Metric output: a JSONL file, TensorBoard event files and a progress line.

`metrics.jsonl` in the workdir gets one JSON object per logged step
({"step": 100, "train/loss": 0.31, ...}); TensorBoard event files go to
`workdir/tensorboard`, written with the `tensorboard` package's protos and
record writer (TensorFlow is never imported) and skipped when it is missing.
A writer opened with the step a run resumes from drops what the run replays
from both, so that a resumed run logs each step once.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import socket
import time
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = 'metrics.jsonl'
_EVENTS_PREFIX = 'events.out.tfevents.'


class TensorBoardWriter:
  """Scalar summaries appended to a new TensorBoard event file in `logdir`.

  Records are framed and checksummed by the `tensorboard` package's own
  `RecordWriter` over a plain file. Its `EventFileWriter` is not used: it goes
  through `tensorboard.compat.tf`, which imports TensorFlow whenever that is
  installed (seconds of start-up in a JAX process).

  With `restart_step`, the file starts with a `SessionLog.START` event at that
  step: TensorBoard's Python loaders then drop the events of earlier files
  with step >= `restart_step` (`EventAccumulator` on every START,
  `plugin_event_accumulator` on every START after a run's first).
  """

  def __init__(self, logdir: str, restart_step: int | None = None):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.summary.writer import record_writer

    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, _event_file_name(logdir))
    self._records = record_writer.RecordWriter(open(self.path, 'xb'))
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))
    if restart_step is not None:
      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      self._write(event_pb2.Event(wall_time=time.time(), step=restart_step, session_log=start))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [
      self._summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()
    ]
    summary = self._summary_pb2.Summary(value=values)
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def close(self) -> None:
    self._records.close()


def _event_file_name(logdir: str) -> str:
  """`events.out.tfevents.<seconds>.<host>.<pid>`, sorting after the event files already there.

  TensorBoard reads a run's event files in name order; the 10-digit seconds
  come first, so a later second keeps a resumed run's file (and its START
  event) after the earlier ones, even within the same second or with a clock
  behind the previous host's.
  """
  seconds = int(time.time())
  for path in glob.glob(os.path.join(logdir, _EVENTS_PREFIX + '*')):
    stamp = os.path.basename(path)[len(_EVENTS_PREFIX) :].split('.', 1)[0]
    if stamp.isdigit():
      seconds = max(seconds, int(stamp) + 1)
  return f'{_EVENTS_PREFIX}{seconds:010d}.{socket.gethostname()}.{os.getpid()}'


def to_scalars(metrics: Mapping[str, object]) -> dict[str, float]:
  """Flattens metrics to scalars: (E,) vectors become `name/i` entries."""
  out = {}
  for key, value in metrics.items():
    array = np.asarray(value)
    if array.ndim == 0:
      out[key] = float(array)
    else:
      for i, v in enumerate(array.reshape(-1)):
        out[f'{key}/{i}'] = float(v)
  return out


class MetricWriter:
  """JSONL + TensorBoard writer; a no-op on processes other than the writer.

  `resume_step`: the step the run resumes from (0 for a fresh run). The
  records of `metrics.jsonl` after it, which the run is about to replay, are
  dropped first (and a torn last line of a killed run with them), and the new
  event file starts with a `SessionLog.START` at `resume_step + 1`, so that
  after the replay each step is logged once in both. `None` appends to both
  as they are.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    if resume_step is not None:
      _truncate_metrics(path, resume_step)
    self._jsonl = open(path, 'a')
    try:
      self._tb = TensorBoardWriter(
        os.path.join(workdir, 'tensorboard'),
        restart_step=None if resume_step is None else resume_step + 1,
      )
    except ImportError:
      log.warning('tensorboard is not installed: metrics go to %s only.', METRICS_FILE)

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    if not self.enabled:
      return
    scalars = to_scalars(metrics)
    record = {'step': int(step)}
    for key, value in metrics.items():
      array = np.asarray(value, np.float64)
      record[key] = (
        _json_number(float(array))
        if array.ndim == 0
        else [_json_number(v) for v in array.reshape(-1).tolist()]
      )
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.scalars(step, scalars)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _json_number(value: float) -> float | str:
  return value if math.isfinite(value) else str(value)  # 'nan' / 'inf' as strings.


def _truncate_metrics(path: str, last_step: int) -> None:
  """Keeps the lines of `path` with step <= `last_step`, replacing the file atomically."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # A line torn by a kill.
    if isinstance(record, dict) and record.get('step', 0) <= last_step:
      kept.append(line if line.endswith('\n') else line + '\n')
  if kept == lines:
    return
  log.info('%s: %d records after step %d dropped.', path, len(lines) - len(kept), last_step)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
  """All records of `workdir/metrics.jsonl`, in order."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Steps/s, images/s and ETA over the steps since the last report, compilation excluded.

  `compiled(step)` marks the end of the run's first step, which includes the
  compilation of the train step (seconds to minutes): the first report then
  counts from there, so that its rate and ETA are those of the steps to come.
  A report with no step since the mark (logging every step) counts from the
  start. The rates are of one interval; on a shared machine they vary from
  report to report, `median_step_seconds` is the steadier figure.
  """

  def __init__(self, total_steps: int, start_step: int, batch_size: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self.start_time = self._last_time
    self.start_step = start_step
    self.compile_seconds: float | None = None
    self._intervals: list[float] = []  # Seconds per step of each interval after compilation.

  def compiled(self, step: int) -> float:
    """Marks `step` (the run's first) as done; returns its seconds (mostly compilation)."""
    now = time.perf_counter()
    self.compile_seconds = now - self.start_time
    self._last_step, self._last_time = step, now
    return self.compile_seconds

  def median_step_seconds(self) -> float | None:
    """Median seconds per step over the report intervals after compilation."""
    return float(np.median(self._intervals)) if self._intervals else None

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = step - self._last_step
    if steps > 0:
      elapsed = max(now - self._last_time, 1e-9)
      if self.compile_seconds is not None:
        self._intervals.append(elapsed / steps)
    else:  # Nothing since the mark: the rate since the start, compilation included.
      steps, elapsed = step - self.start_step, max(now - self.start_time, 1e-9)
    self._last_step, self._last_time = step, now
    steps_per_sec = steps / elapsed
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float('inf')
    return {
      'steps_per_sec': steps_per_sec,
      'images_per_sec': steps_per_sec * self.batch_size,
      'eta_sec': eta,
    }


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes}:{secs:02d}'
