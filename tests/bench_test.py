"""The benchmark and profiling commands, on a tiny model (correctness, not timing)."""

import json
import os
import subprocess
import sys

import pytest

from vmoe_jax import bench
from vmoe_jax import profile
from vmoe_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
  '--width=16',
  '--depth=2',
  '--num_heads=2',
  '--mlp_dim=32',
  '--image_size=16',
  '--batch_size=16',
  '--steps=2',
  '--warmup=1',
]


def run(module, *args):
  result = subprocess.run(
    [sys.executable, '-m', module, *args], cwd=REPO, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_bench_prints_a_table_and_writes_json(tmp_path):
  out = tmp_path / 'bench.json'
  result = run(
    'vmoe_jax.bench',
    *TINY,
    '--experts=4,8',
    '--dispatch=indices,einsum',
    '--modes=train,inference',
    f'--json={out}',
  )
  lines = [line for line in result.stdout.splitlines() if line.startswith('| ')]
  assert lines[0].startswith('| case | mode | step (ms) | images/s | vs dense')
  # dense + 2 experts x 2 dispatchers, in 2 modes.
  assert len(lines) == 2 + 2 * 5
  data = json.loads(out.read_text())
  rows = data['rows']
  assert {r['mode'] for r in rows} == {'train', 'inference'}
  assert all(r['step_seconds_median'] > 0 and len(r['step_seconds_all']) == 2 for r in rows)
  dense = [r for r in rows if r['num_experts'] == 0][0]
  moe = [r for r in rows if r['num_experts'] == 8][0]
  # Active FLOPs: K=1 expert per token, so the MoE model has the dense FLOPs
  # plus its routers.
  assert moe['gflops_per_image_fwd'] > dense['gflops_per_image_fwd']
  assert data['environment']['device_count'] == 8


def test_profile_writes_a_trace_and_all_to_all_bytes_match_the_buffers(tmp_path):
  result = run(
    'vmoe_jax.profile',
    *TINY,
    '--experts=8',
    '--mesh=data=2,expert=4',
    f'--workdir={tmp_path}',
    '--profile_steps=1',
    '--repeats=2',
  )
  phases = json.loads((tmp_path / 'phases.json').read_text())
  assert [p['phase'] for p in phases['phases']] == [
    'route',
    'dispatch',
    'all_to_all (to experts)',
    'expert MLPs',
    'all_to_all (back)',
    'combine',
  ]
  # Every all-to-all of the compiled step moves exactly one capacity buffer per
  # device: E x (G_l x C) x D float32. One MoE layer (every_2 of depth 2):
  # 2 exchanges forward + 2 backward.
  assert len(phases['all_to_all_bytes']) == 4
  assert set(phases['all_to_all_bytes']) == {phases['expected_all_to_all_bytes']}
  shape = phases['buffer_shape_per_device']
  assert phases['expected_all_to_all_bytes'] == shape[0] * shape[1] * shape[2] * 4
  assert shape[0] == 8 and shape[2] == 16
  traces = [f for _, _, files in os.walk(tmp_path / 'profile') for f in files]
  assert any(f.endswith('.xplane.pb') for f in traces)
  assert 'all_to_all per device and exchange' in result.stdout


def test_all_to_all_bytes_parser():
  hlo = (
    '  %all-to-all = (f32[2,8,4]{2,1,0}, f32[2,8,4]{2,1,0}) all-to-all(%a, %b), '
    'channel_id=1\n  %x = bf16[3,5]{1,0} all-to-all(%c), dimensions={0}\n'
    '  %y = f32[7]{0} add(%d, %e)\n'
  )
  assert profile.all_to_all_bytes(hlo) == [2 * 2 * 8 * 4 * 4, 3 * 5 * 2]


def test_mesh_flag():
  assert profile.parse_mesh('data=2,expert=4', 8) == 4
  assert profile.parse_mesh('', 8) == -1
  with pytest.raises(UserError, match='has 6 devices but 8 are present'):
    profile.parse_mesh('data=3,expert=2', 8)
  with pytest.raises(UserError, match='not understood'):
    profile.parse_mesh('dp=2', 8)


@pytest.mark.parametrize('interleave', [True, False])
def test_time_cases_warms_up_then_times_in_rounds(interleave):
  calls = []
  fns = [lambda name=name: calls.append(name) for name in 'abc']
  times = bench.time_cases(fns, steps=2, warmup=1, interleave=interleave)
  assert [len(t) for t in times] == [2, 2, 2]
  assert calls[:3] == ['a', 'b', 'c']  # One warm-up call each.
  timed = calls[3:]
  if interleave:  # Round by round: every case once per round.
    assert timed == ['a', 'b', 'c', 'a', 'b', 'c']
  else:
    assert timed == ['a', 'a', 'b', 'b', 'c', 'c']
