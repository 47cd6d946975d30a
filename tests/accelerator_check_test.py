"""launch/accelerator_check.py: every part at toy sizes on the CPU, and the full check's plan."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'launch', 'accelerator_check.py')


def load_script():
  spec = importlib.util.spec_from_file_location('launch_accelerator_check', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up.
  spec.loader.exec_module(module)
  return module


check = load_script()


def run(*args, timeout=300):
  result = subprocess.run(
    [sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """The --smoke run (8 fake CPU devices, synthetic IDX files): its JSON and markdown."""
  out = tmp_path_factory.mktemp('smoke')
  empty = tmp_path_factory.mktemp('no_fashion_files')
  run('--smoke', f'--output_dir={out}', f'--fashion_dir={empty}')
  with open(out / check.JSON_NAME) as f:
    data = json.load(f)
  return data, (out / check.MARKDOWN_NAME).read_text()


def ok_rows(part):
  assert part['status'] == 'ok', part
  assert all(r['status'] == 'ok' for r in part['rows']), part['rows']
  return part['rows']


def test_smoke_runs_every_part_without_tensorflow(smoke):
  data, text = smoke
  assert data['mode'] == 'smoke'
  assert set(data['parts']) == set(check.PARTS)
  assert data['environment']['tensorflow_imported'] is False
  for name in check.PARTS:
    assert f'## {name}' in text


def test_smoke_grouped_matmul_ragged_equals_blocks(smoke):
  rows = ok_rows(smoke[0]['parts']['grouped_matmul'])
  assert [r['num_experts'] for r in rows] == list(check.SMOKE.experts)
  for r in rows:
    assert r['ragged_ms'] > 0 and r['blocks_ms'] > 0
    assert r['within_tolerance'], r['max_error']
    assert max(r['max_error'].values()) <= check.BF16_TOLERANCE
    assert sum(r['rows_per_expert']) == r['rows']


def test_smoke_bench_has_dense_and_every_router_at_every_expert_count(smoke):
  rows = ok_rows(smoke[0]['parts']['bench'])
  assert rows[0]['case'] == 'dense' and rows[0]['vs_dense'] == 1.0
  routers = {(r['router'], r['num_experts'], r['num_selected']) for r in rows[1:]}
  for e in check.SMOKE.experts:
    for router, k, _ in check.ROUTER_CASES:
      assert (router, e, k if router in ('topk', 'dropless') else None) in routers
  dense_flops = rows[0]['gflops_per_image_fwd']
  for r in rows:
    assert r['step_seconds_median'] > 0 and r['images_per_sec'] > 0
    assert math.isfinite(r['vs_dense']) and r['vs_dense'] > 0
    assert r['loss_finite']
    assert r['mesh'] == {'data': 1, 'expert': 1}
    # Equal active FLOPs: within Soft MoE's dispatch and combine mixing.
    assert r['gflops_per_image_fwd'] == pytest.approx(dense_flops, rel=0.25)
    if r['num_selected'] == 2:
      assert r['expert_mlp_dim'] == check.SMOKE.model.mlp_dim // 2


def test_smoke_fashion_trains_both_configs(smoke):
  part = smoke[0]['parts']['fashion']
  rows = ok_rows(part)
  assert [r['config'] for r in rows] == list(check.FASHION_CONFIGS)
  assert 'Synthetic' in part['note']
  for r in rows:
    assert r['steps'] == check.SMOKE.fashion_steps
    assert 0 <= r['test_accuracy'] <= 1
    assert r['wall_seconds'] > 0 and r['train_seconds'] > 0


def test_smoke_multi_device_runs_on_the_fake_devices(smoke):
  part = smoke[0]['parts']['multi_device']
  devices = smoke[0]['environment']['device_count']
  if devices < 2:
    assert part['status'] == 'skipped' and 'one device' in part['reason']
    return
  rows = ok_rows(part)
  axes = [n for n in check.SMOKE.multi_axes if n <= devices]
  assert sorted({r['mesh_devices'] for r in rows}) == axes
  for r in rows:
    assert r['mesh'] == {'data': 1, 'expert': r['mesh_devices']}
    assert r['step_seconds_median'] > 0 and math.isfinite(r['scaling'])


def test_spent_budget_skips_every_part_with_a_line(tmp_path):
  run('--smoke', f'--output_dir={tmp_path}', '--budget_s=0', '--parts=bench,fashion')
  data = json.loads((tmp_path / check.JSON_NAME).read_text())
  assert set(data['parts']) == {'bench', 'fashion'}
  for part in data['parts'].values():
    assert part['status'] == 'skipped' and 'budget' in part['reason']
  assert 'skipped: the time budget' in (tmp_path / check.MARKDOWN_NAME).read_text()


def test_full_plan_fits_eight_minutes_on_one_h100():
  plan = check.time_plan(check.FULL)
  assert plan['total_seconds'] <= 8 * 60
  # ViT-B/16 at 224: 17.6 G multiply-adds per image forward; a train step is 3x.
  dense = plan['bench_step_tflops'][0]
  assert dense == pytest.approx(3 * 2 * 17.56e9 * 128 / 1e12, rel=0.02)
  # Every part's reserve covers its estimate, and the reserves fit the default budget.
  for part in ('grouped_matmul', 'bench', 'fashion'):
    assert plan['seconds'][part] <= check.FULL.reserve_s[part]
  one_gpu = sum(check.FULL.reserve_s[p] for p in ('grouped_matmul', 'bench', 'fashion'))
  assert one_gpu + plan['seconds']['startup'] <= 450


def test_peak_flops_by_device_kind():
  from vmoe_jax.tools import benchmark

  assert benchmark.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert benchmark.peak_flops('NVIDIA H100 PCIe', 'bfloat16') == 756e12
  assert benchmark.peak_flops('NVIDIA H200', 'bfloat16') == 989e12
  assert benchmark.peak_flops('NVIDIA A100-SXM4-80GB', 'bfloat16') == 312e12
  assert benchmark.peak_flops('TPU v5 lite', 'bfloat16') == 197e12
  assert benchmark.peak_flops('TPU v5', 'bfloat16') == 459e12
  assert benchmark.peak_flops('cpu', 'bfloat16') is None
