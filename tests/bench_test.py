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


@pytest.mark.parametrize('name', list(bench.EXPERT_MATMULS))
def test_expert_matmuls_are_the_expert_mlp_gradients(name):
  """Each timed matmul is the product it is named after (checked against NumPy)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  ops = {k: np.asarray(v, np.float64) for k, v in bench.expert_matmul_operands(3, 5, 4, 6).items()}
  spec, lhs, rhs = bench.EXPERT_MATMULS[name]
  expected = {
    'x · W_in': lambda: ops['x'] @ ops['w_in'],
    'h · W_out': lambda: ops['h'] @ ops['w_out'],
    'dy · W_out^T': lambda: ops['dy'] @ ops['w_out'].transpose(0, 2, 1),
    'dh · W_in^T': lambda: ops['dh'] @ ops['w_in'].transpose(0, 2, 1),
    'x^T · dh (dW_in)': lambda: ops['x'].transpose(0, 2, 1) @ ops['dh'],
    'h^T · dy (dW_out)': lambda: ops['h'].transpose(0, 2, 1) @ ops['dy'],
  }[name]()
  got = np.einsum(spec, ops[lhs], ops[rhs])
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_expert_matmuls_table(tmp_path):
  out = tmp_path / 'matmuls.json'
  result = run('vmoe_jax.bench', *TINY, '--experts=2,4', '--expert_matmuls', f'--json={out}')
  lines = [line for line in result.stdout.splitlines() if line.startswith('| ')]
  # 16x16 images, patch 4: 16 patches + class token; 16 images: 272 tokens;
  # capacity 1.25: ceil(340 / 2) = 170 and ceil(340 / 4) = 85 rows per expert.
  assert lines[0] == '| matmul (ms) | E=2 (C=170) | E=4 (C=85) |'
  assert [line.split(' | ')[0][2:] for line in lines[2:]] == [*bench.EXPERT_MATMULS, 'sum']
  rows = json.loads(out.read_text())['expert_matmuls']
  assert len(rows) == 12 and all(len(r['seconds_all']) == 2 for r in rows)
  assert {(r['num_experts'], r['capacity']) for r in rows} == {(2, 170), (4, 85)}


@pytest.mark.parametrize(
  'flag, message',
  [
    ('--experts=8,abc', 'must be positive integers'),
    ('--experts=0', 'must be positive integers'),
    ('--num_selected=0', 'must be positive integers'),
    ('--capacity_factors=-1', 'must be positive numbers'),
    ('--dispatch=onehot', "must be 'indices' and/or 'einsum'"),
    ('--modes=eval', "must be 'train' and/or 'inference'"),
  ],
)
def test_bench_rejects_bad_lists_in_one_line(flag, message):
  result = subprocess.run(
    [sys.executable, '-m', 'vmoe_jax.bench', flag],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if 'Flags parsing error' in line]
  assert len(errors) == 1 and flag.split('=')[0] in errors[0] and message in errors[0]
