"""The benchmark and profiling commands and their libraries, on a tiny model (not timing)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from vmoe_jax.errors import UserError
from vmoe_jax.models import factory
from vmoe_jax.models import flops
from vmoe_jax.moe import routers
from vmoe_jax.tools import benchmark
from vmoe_jax.tools import expert_matmuls
from vmoe_jax.tools import profiling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = [
  '--width=16',
  '--depth=2',
  '--num_heads=2',
  '--mlp_dim=32',
  '--image_size=16',
  '--batch_size=16',
]
TINY = [*TINY_MODEL, '--steps=2', '--warmup=1']


DISPATCH = ['indices', 'einsum']
ROUTERS = ('topk', 'expert_choice', 'soft', 'image_topk', 'dropless')


def run(module, *args, env=None):
  result = subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
  """{(case, mode): cells} of the markdown table on stdout."""
  lines = [line for line in stdout.splitlines() if line.startswith('| ')][2:]
  cells = [[c.strip() for c in line.strip('|').split('|')] for line in lines]
  return {(c[0], c[1]): c for c in cells}


def git_status() -> str:
  return subprocess.run(
    ['git', 'status', '--porcelain'], cwd=REPO, capture_output=True, text=True
  ).stdout


def test_bench_prints_a_table_and_writes_json(tmp_path):
  out = tmp_path / 'bench.json'
  result = run(
    'vmoe_jax.bench',
    *TINY,
    '--experts=8',
    '--dispatch=indices,einsum',
    '--modes=train,inference',
    f'--json={out}',
  )
  lines = [line for line in result.stdout.splitlines() if line.startswith('| ')]
  assert lines[0].startswith('| case | mode | step (ms) | images/s | vs dense')
  # dense + 1 expert count x 2 dispatchers, in 2 modes.
  assert len(lines) == 2 + 2 * 3
  data = json.loads(out.read_text())
  rows = data['rows']
  assert {r['mode'] for r in rows} == {'train', 'inference'}
  assert all(r['step_seconds_median'] > 0 and len(r['step_seconds_all']) == 2 for r in rows)
  assert [r['case'] for r in rows[:3]] == [
    'dense',
    'topk E=8 K=1 cf=1.25 indices',
    'topk E=8 K=1 cf=1.25 einsum',
  ]
  dense = [r for r in rows if r['num_experts'] == 0][0]
  moe = [r for r in rows if r['num_experts'] == 8][0]
  # Active FLOPs: K=1 expert per token, so the MoE model has the dense FLOPs
  # plus its routers.
  assert moe['gflops_per_image_fwd'] > dense['gflops_per_image_fwd']
  assert data['environment']['device_count'] == 8


def test_bench_gives_a_row_per_router_and_writes_nothing_by_default():
  """One interleaved run: dense, then every router; GFLOPs of the model each row built."""
  before = git_status()
  shrink = ['--depth=1', '--moe_layers=all', '--modes=inference', '--steps=1', '--warmup=0']
  result = run('vmoe_jax.bench', *TINY, *shrink, f'--router={",".join(ROUTERS)}', '--experts=4')
  assert git_status() == before  # No --json: nothing written into the checkout.
  rows = table_rows(result.stdout)
  labels = [
    'dense',
    'topk E=4 K=1 cf=1.25 indices',
    'expert_choice E=4 cf=1.25 indices',
    'soft E=4 cf=1.25',
    'image_topk E=4 K=1 cf=1.25 indices',
    'dropless E=4 K=1',
  ]
  assert [case for case, _ in rows] == labels
  assert all(float(cells[4]) > 0 for cells in rows.values())  # The ratio to dense.
  settings = benchmark.BenchSettings(
    width=16, depth=1, num_heads=2, mlp_dim=32, image_size=16, batch_size=16, moe_layers='all'
  )
  for case in benchmark.bench_cases(ROUTERS, [4], [1], [1.25], ['indices']):
    config = benchmark.case_config(settings, case)
    model = factory.create_model(config, benchmark.NUM_CLASSES)
    # The subprocess sees the 8 fake devices of conftest: 2 images per device.
    expected = flops.forward_flops(model, settings.image_shape, images_per_group=2)['total']
    assert float(rows[case.label, 'inference'][6]) == pytest.approx(expected / 1e9, rel=1e-3)


def test_cases_read_only_the_fields_of_their_router():
  assert set(benchmark.ROUTER_FIELDS) == set(routers.ROUTERS)
  cases = benchmark.bench_cases(['soft', 'dropless'], [8], [1, 2], [1.0, 1.25], DISPATCH)
  # Soft MoE reads the capacity factor only, dropless K only: 2 + 2 cases after dense.
  assert [c.label for c in cases] == [
    'dense',
    'soft E=8 cf=1',
    'soft E=8 cf=1.25',
    'dropless E=8 K=1',
    'dropless E=8 K=2',
  ]
  settings = benchmark.BenchSettings()
  assert settings.group_size_for('soft') == 1 and settings.group_size_for('topk') == 0
  with pytest.raises(UserError, match='--group_size=0'):
    benchmark.check_cases(dataclasses.replace(settings, group_size=0), cases)


def test_profile_writes_a_trace_and_all_to_all_bytes_match_the_buffers(tmp_path):
  result = run(
    'vmoe_jax.profile_moe',
    *TINY_MODEL,
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


def test_profile_of_the_dropless_router_times_one_experts_phase(tmp_path):
  settings = benchmark.BenchSettings(
    width=16, depth=2, num_heads=2, mlp_dim=32, image_size=16, batch_size=16, expert_axis=4
  )
  report = profiling.profile_moe(
    settings, benchmark.Case(8, 'dropless'), str(tmp_path), profile_steps=1, repeats=1
  )
  assert [p['phase'] for p in report['phases']] == ['route', 'experts (dropless)']
  assert report['capacity'] is None and 'no capacity buffers' in report['note']
  # Every device sends each of the 4 shards its A = 2 images x 17 tokens x K=1 rows.
  assert report['buffer_shape_per_device'] == [4, 34, 16]
  assert report['expected_all_to_all_bytes'] in report['all_to_all_bytes']
  assert json.loads((tmp_path / 'phases.json').read_text())['router'] == 'dropless'


@pytest.mark.parametrize(
  'args, message',
  [
    (['--experts=8,16', '--workdir=unused'], 'error: --experts=8,16: the profiler takes one value'),
    (['--experts=8'], 'error: --workdir=DIR is needed'),
  ],
)
def test_profile_flag_errors_are_one_line(args, message):
  result = subprocess.run(
    [sys.executable, '-m', 'vmoe_jax.profile_moe', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(message)


def test_all_to_all_bytes_parser():
  hlo = (
    '  %all-to-all = (f32[2,8,4]{2,1,0}, f32[2,8,4]{2,1,0}) all-to-all(%a, %b), '
    'channel_id=1\n  %x = bf16[3,5]{1,0} all-to-all(%c), dimensions={0}\n'
    '  %y = f32[7]{0} add(%d, %e)\n'
  )
  assert profiling.all_to_all_bytes(hlo) == [2 * 2 * 8 * 4 * 4, 3 * 5 * 2]


def test_mesh_flag():
  assert profiling.parse_mesh('data=2,expert=4', 8) == 4
  assert profiling.parse_mesh('', 8) == -1
  with pytest.raises(UserError, match='has 6 devices but 8 are present'):
    profiling.parse_mesh('data=3,expert=2', 8)
  with pytest.raises(UserError, match='not understood'):
    profiling.parse_mesh('dp=2', 8)


@pytest.mark.parametrize('interleave', [True, False])
def test_time_cases_warms_up_then_times_in_rounds(interleave):
  calls = []
  fns = [lambda name=name: calls.append(name) for name in 'abc']
  times = benchmark.time_cases(fns, steps=2, warmup=1, interleave=interleave)
  assert [len(t) for t in times] == [2, 2, 2]
  assert calls[:3] == ['a', 'b', 'c']  # One warm-up call each.
  timed = calls[3:]
  if interleave:  # Round by round: every case once per round.
    assert timed == ['a', 'b', 'c', 'a', 'b', 'c']
  else:
    assert timed == ['a', 'a', 'b', 'b', 'c', 'c']


@pytest.mark.parametrize('name', list(expert_matmuls.EXPERT_MATMULS))
def test_expert_matmuls_are_the_expert_mlp_gradients(name):
  """Each timed matmul is the product it is named after (checked against NumPy)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  ops = {
    k: np.asarray(v, np.float64)
    for k, v in expert_matmuls.expert_matmul_operands(3, 5, 4, 6).items()
  }
  spec, lhs, rhs = expert_matmuls.EXPERT_MATMULS[name]
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
  assert [line.split(' | ')[0][2:] for line in lines[2:]] == [*expert_matmuls.EXPERT_MATMULS, 'sum']
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
    ('--router=topk,top2', "must be routers from ['dropless', 'expert_choice', 'image_topk'"),
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
