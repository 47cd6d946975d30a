"""Tests of metrics.jsonl and the TensorBoard event files, read back with TensorBoard's loaders."""

import glob
import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from vmoe_jax.storage import metrics


@pytest.fixture
def load_scalars(monkeypatch):
  """Returns `load(logdir) -> {tag: [(step, value), ...]}` from TensorBoard's `EventAccumulator`.

  `tensorboard.compat.notf` present makes `tensorboard.compat.tf` the package's
  own TensorFlow stub (its documented no-TensorFlow mode) rather than a
  seconds-long TensorFlow import; the stub's record reader checks both CRCs.
  """
  monkeypatch.setitem(sys.modules, 'tensorboard.compat.notf', types.ModuleType('notf'))
  from tensorboard.backend.event_processing import event_accumulator

  def load(logdir):
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}

  return load


@pytest.fixture
def load_plugin_scalars(monkeypatch):
  """Like `load_scalars`, with the accumulator of `tensorboard --load_fast=false`."""
  monkeypatch.setitem(sys.modules, 'tensorboard.compat.notf', types.ModuleType('notf'))
  from tensorboard.backend.event_processing import plugin_event_accumulator
  from tensorboard.util import tensor_util

  def load(logdir):
    acc = plugin_event_accumulator.EventAccumulator(logdir, tensor_size_guidance={'scalars': 0})
    acc.Reload()
    return {
      tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
      for tag in acc.Tags()['tensors']
    }

  return load


def _write(workdir, steps, offset=0.0, resume_step=None):
  writer = metrics.MetricWriter(workdir, resume_step=resume_step)
  for step in steps:
    writer.write(step, {'train/loss': step + offset, 'train/moe_dropped': [step, -step]})
    if step % 5 == 0:
      writer.write(step, {'test/accuracy': step / 100 + offset})
  writer.close()


def test_scalars_and_vectors_reach_tensorboard(tmp_path, load_scalars):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {'train/loss': 2.5, 'train/moe_dropped': np.array([0.0, 0.25, 0.5])})
  writer.write(3, {'train/loss': np.float32(1.5), 'train/moe_dropped': np.zeros(3)})
  writer.write(3, {'test/accuracy': 0.75})
  writer.close()
  assert load_scalars(str(tmp_path / 'tensorboard')) == {
    'train/loss': [(1, 2.5), (3, 1.5)],
    'train/moe_dropped/0': [(1, 0.0), (3, 0.0)],
    'train/moe_dropped/1': [(1, 0.25), (3, 0.0)],
    'train/moe_dropped/2': [(1, 0.5), (3, 0.0)],
    'test/accuracy': [(3, 0.75)],
  }


def test_jsonl_round_trip(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {'train/loss': 0.5, 'train/moe_dropped': np.array([0.25, 1.0])})
  writer.write(2, {'a': float('nan'), 'b': np.float32('inf'), 'c': [-np.inf, 3]})
  writer.close()
  with open(tmp_path / metrics.METRICS_FILE) as f:
    assert f.read() == (
      '{"step": 1, "train/loss": 0.5, "train/moe_dropped": [0.25, 1.0]}\n'
      '{"step": 2, "a": "nan", "b": "inf", "c": ["-inf", 3.0]}\n'
    )
  assert metrics.read_metrics(str(tmp_path)) == [
    {'step': 1, 'train/loss': 0.5, 'train/moe_dropped': [0.25, 1.0]},
    {'step': 2, 'a': 'nan', 'b': 'inf', 'c': ['-inf', 3.0]},
  ]
  assert metrics.read_metrics(str(tmp_path / 'missing')) == []


def _expected(runs):
  """{tag: [(step, value)]} left by `runs` of `_write` with offsets 0, 100, 200, ..."""
  latest = {}
  for i, (resume_step, last) in enumerate(runs):
    for by_step in latest.values():
      for step in [s for s in by_step if s > resume_step]:
        del by_step[step]
    for step in range(resume_step + 1, last + 1):
      points = {'train/loss': step + 100 * i, 'train/moe_dropped/0': step}
      points['train/moe_dropped/1'] = -step
      if step % 5 == 0:
        points['test/accuracy'] = step / 100 + 100 * i
      for tag, value in points.items():
        latest.setdefault(tag, {})[step] = value
  return {tag: sorted(by_step.items()) for tag, by_step in latest.items()}


# (resume_step, last step) of consecutive runs; each resume replays from resume_step + 1.
REPLAYS = {
  'one_resume': [(0, 10), (6, 10)],
  'killed_twice': [(0, 10), (6, 8), (3, 12)],
  'resume_before_any_step': [(0, 4), (0, 6)],
  'replay_cut_short': [(0, 10), (6, 8)],
}


@pytest.mark.parametrize('runs', REPLAYS.values(), ids=REPLAYS.keys())
def test_resume_logs_each_step_once(tmp_path, runs, load_scalars, load_plugin_scalars):
  workdir = str(tmp_path)
  for i, (resume_step, last) in enumerate(runs):
    if i:  # The previous run was killed mid-line.
      with open(tmp_path / metrics.METRICS_FILE, 'a') as f:
        f.write('{"step": 99, "train/lo')
    _write(workdir, range(resume_step + 1, last + 1), offset=100 * i, resume_step=resume_step)

  expected = _expected(runs)
  records = metrics.read_metrics(workdir)
  train = [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]
  test = [(r['step'], r['test/accuracy']) for r in records if 'test/accuracy' in r]
  assert train == expected['train/loss']
  assert test == expected['test/accuracy']
  assert os.listdir(tmp_path) == [metrics.METRICS_FILE, 'tensorboard']  # No temp file left.

  logdir = str(tmp_path / 'tensorboard')
  assert len(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))) == len(runs)
  for load in (load_scalars, load_plugin_scalars):
    loaded = load(logdir)
    assert loaded.keys() == expected.keys()
    for tag, points in expected.items():
      assert [s for s, _ in loaded[tag]] == [s for s, _ in points], tag
      np.testing.assert_allclose([v for _, v in loaded[tag]], [v for _, v in points], rtol=1e-6)


def test_event_files_sort_in_creation_order(tmp_path):
  names = []
  for _ in range(3):  # Within one second, in one process.
    writer = metrics.MetricWriter(str(tmp_path), resume_step=0)
    names.append(os.path.basename(writer._tb.path))
    writer.close()
  assert sorted(names) == names and len(set(names)) == 3


def _contents(root):
  return {path: path.read_bytes() for path in root.rglob('*') if path.is_file()}


def test_disabled_writer_writes_nothing(tmp_path):
  missing = tmp_path / 'fresh'
  writer = metrics.MetricWriter(str(missing), enabled=False, resume_step=0)
  writer.write(1, {'train/loss': 1.0})
  writer.close()
  assert not missing.exists()

  _write(str(tmp_path), range(1, 4))
  before = _contents(tmp_path)
  writer = metrics.MetricWriter(str(tmp_path), enabled=False, resume_step=1)  # Process 1 of 2.
  writer.write(2, {'train/loss': 5.0})
  writer.close()
  assert _contents(tmp_path) == before


def test_tensorflow_is_never_imported(tmp_path):
  """Writing through a blocker that records (and refuses) every attempt to import TensorFlow."""
  script = textwrap.dedent(f"""
    import importlib.abc, json, sys

    attempts = []

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'tensorflow':
          attempts.append(name)
          raise ImportError('blocked: ' + name)

    sys.meta_path.insert(0, Block())
    from vmoe_jax.storage import metrics

    writer = metrics.MetricWriter({str(tmp_path)!r}, resume_step=0)
    writer.write(1, {{'train/loss': 1.0, 'v': [1.0, 2.0]}})
    writer.close()
    writer = metrics.MetricWriter({str(tmp_path)!r}, resume_step=0)
    writer.close()
    print(json.dumps([attempts, writer._tb is not None]))
  """)
  out = subprocess.run(
    [sys.executable, '-c', script],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    capture_output=True,
    text=True,
    check=True,
    timeout=120,
  )
  assert json.loads(out.stdout.splitlines()[-1]) == [[], True]


def test_progress_rates_and_eta_leave_out_the_compiling_first_step(monkeypatch):
  clock = iter([0.0, 60.0, 70.0, 80.0])  # Start; first step done (compiled) at 60 s; reports.
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
  progress = metrics.Progress(total_steps=1001, start_step=0, batch_size=10)
  assert progress.compiled(1) == 60.0
  first = progress.report(101)  # 100 steps in 10 s.
  assert first['images_per_sec'] == pytest.approx(100.0)
  assert first['eta_sec'] == pytest.approx(90.0)  # 900 steps at 10 steps/s, not 540 s.
  progress.report(201)
  assert progress.median_step_seconds() == pytest.approx(0.1)


def test_the_accuracy_axis_spans_at_least_two_points():
  from vmoe_jax.evaluation import routing_maps

  low, high = routing_maps.accuracy_limits([96.94, 97.49])  # Two test images apart.
  assert high - low == pytest.approx(2.0) and low < 96.94 and high > 97.49
  low, high = routing_maps.accuracy_limits([80.0, 90.0])
  assert (low, high) == pytest.approx((78.5, 91.5))
