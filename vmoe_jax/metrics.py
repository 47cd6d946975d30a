"""Metric output: a JSONL file, TensorBoard event files and a progress line.

`metrics.jsonl` in the workdir gets one JSON object per logged step
({"step": 100, "train/loss": 0.31, ...}); TensorBoard event files go to
`workdir/tensorboard`. The TensorBoard writer needs only the `tensorboard`
package's protos (not TensorFlow) and is skipped when they are missing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import time
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = 'metrics.jsonl'


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TensorBoardWriter:
  """Writes scalar summaries as a TFRecord file of `Event` protos."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top

    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{int(time.time())}.{os.uname().nodename}.{os.getpid()}'
    self._file = open(os.path.join(logdir, name), 'ab')
    self._write(self._event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    data = event.SerializeToString()
    header = struct.pack('<Q', len(data))
    self._file.write(header + struct.pack('<I', _masked_crc32c(header)))
    self._file.write(data + struct.pack('<I', _masked_crc32c(data)))

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [
      self._summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()
    ]
    self._write(
      self._event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=self._summary_pb2.Summary(value=values)
      )
    )
    self._file.flush()

  def close(self) -> None:
    self._file.close()


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
  """JSONL + TensorBoard writer; a no-op on processes other than the writer."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')
    try:
      self._tb = TensorBoardWriter(os.path.join(workdir, 'tensorboard'))
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


def read_metrics(workdir: str) -> list[dict]:
  """All records of `workdir/metrics.jsonl`, in order."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Steps/s, images/s and ETA since the last report (first report: since start)."""

  def __init__(self, total_steps: int, start_step: int, batch_size: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self.start_time = self._last_time
    self.start_step = start_step
    self._intervals: list[float] = []  # Seconds per step of each report interval.

  def median_step_seconds(self) -> float | None:
    """Median seconds per step over report intervals, the first (compilation) excluded."""
    intervals = self._intervals[1:] or self._intervals
    return float(np.median(intervals)) if intervals else None

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = step - self._last_step
    elapsed = max(now - self._last_time, 1e-9)
    if steps > 0:
      self._intervals.append(elapsed / steps)
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
