#!/usr/bin/env python3
r"""The project's figures on one GPU, in one command of at most 8 minutes.

  python launch/accelerator_check.py --output_dir=DIR          # the full check (one H100/H200)
  python launch/accelerator_check.py --smoke --output_dir=DIR  # every part at toy sizes, any CPU
  python launch/accelerator_check.py --plan                    # the full check's time plan

Writes DIR/accelerator_check.json and DIR/accelerator_check.md, rewritten
after every row, so that a run cut short still leaves what it finished.
Four parts, in this order (`--parts` picks some):

  grouped_matmul  the dropless grouped matmul: `jax.lax.ragged_dot` against
                  the block path (`vmoe_jax.moe.dropless.grouped_mlp`,
                  impl='ragged' / 'blocks') on one MoE layer's rows of the
                  bench model (A = 128 x 197 tokens, D 768, H 3,072, E 8 and
                  32, bfloat16): outputs and gradients equal within bfloat16
                  tolerance, and the time of forward + backward of each.
  bench           bfloat16 train steps of a dense ViT-B/16 at 224x224
                  (batch 128, Adafactor) against MoE ViTs at equal active
                  FLOPs (the V-MoE-B/16 setting: E = 8 and 32, MoE in every
                  other block, groups of 8 images): topk K=1 (capacity 1.25),
                  topk K=2 (experts half as wide, capacity 1.05),
                  expert_choice and soft (capacity 1.0, Soft MoE one image per
                  group), dropless K=1 (ragged_dot on GPU/TPU). Per case: step
                  time, images/s, ratio to dense, analytic GFLOPs and MFU
                  (peak from the device kind, `benchmark.PEAK_FLOPS`; omitted
                  where unknown), XLA's peak memory. All steps are compiled
                  first, in parallel threads, then each case is initialised,
                  timed alone (3 warm-up and 20 timed steps) and freed.
  fashion         configs/fashion_vit.py and configs/fashion_switch.py trained
                  to the end by `vmoe_jax.train.train_and_evaluate`, as the
                  training command runs them (on all devices; workdirs in a
                  temporary directory, deleted after): wall time, loop time,
                  median step time and test accuracy.
  multi_device    with 2 or more devices: the dense ViT, topk K=1 and dropless
                  at E=8 on the first n devices with expert axis n (n = 2, 4,
                  8 as far as the devices go), 128 images per device, with
                  the scaling against the bench part's one-device rows; with
                  one device, a line saying it was skipped.

Every case and part catches its own errors (the row says what failed) and
the rest go on. A time budget (`--budget_s`, default 450 s from the end of
the imports) keeps the whole command within 8 minutes: every part keeps
time for the parts after it (`Plan.reserve_s`), and what no longer fits is
skipped with a line. `--smoke` runs every part at toy sizes on any machine
(a 2-block ViT of width 32 on 16x16 images and E=8, a 256-row grouped
matmul, 10 Fashion-MNIST steps on 512 images, synthetic IDX files when the
real ones are absent, expert axes 2 and 8 where there are that many
devices); `tests/accelerator_check_test.py` runs it on 8 fake CPU devices.

Time plan of the full check on one H100 SXM (`--plan` prints it; FLOPs from
`vmoe_jax.flops`, the rest `PLAN_ASSUMPTIONS`, from CPU measurements of the
same programs, see docs/performance.md, "Accelerator check"):

  part            sizes                                             est. s  reserve s
  startup         imports, CUDA backend, files                          20
  grouped_matmul  25,216 rows, D 768, H 3,072, E 8 and 32; 6 programs   30         40
  bench           11 cases of 13.5-14.0 TFLOP a step, 3 + 20 steps     172        220
                  each; 11 x (45 s to compile), 4 threads at a time
  fashion         2 runs of 5,600 steps (batch 64), host-bound:        117        150
                  25 s + 6 ms a step each
  multi_device    skipped on one GPU                                     0
  total                                                                340        450

What the GPU host needs: JAX with CUDA, flax, optax, orbax-checkpoint,
einops and numpy (nothing imports TensorFlow or scikit-learn on this path),
plus ml-collections (its dependencies absl-py and PyYAML come with optax,
orbax-checkpoint and flax), and the four Fashion-MNIST IDX files. Here, with
network:

  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
  mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/

(`.whl/` and `.data/` are git-ignored; copy both with the checkout to the GPU
host), then there, from the checkout:

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
  python3 launch/accelerator_check.py --output_dir=$OUT

`--fashion_dir` defaults to .data/fashion-mnist in the checkout, else
/usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback

try:
  import ml_collections  # noqa: F401  (the configs need it; absent from plain JAX images)
except ImportError:
  sys.exit(
    'error: ml_collections is not installed; carry its wheel (see the docstring of '
    'launch/accelerator_check.py: pip download ... ml_collections==1.1.0, then pip install '
    '--no-index --target /tmp/site .whl/*.whl and PYTHONPATH=/tmp/site).'
  )

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_jax.data import idx_files
from vmoe_jax.data import input_pipeline
from vmoe_jax.models import factory
from vmoe_jax.moe import dropless
from vmoe_jax.runtime import sharding
from vmoe_jax.tools import benchmark
from vmoe_jax.tools.benchmark import BenchSettings
from vmoe_jax.tools.benchmark import Case

START = time.monotonic()  # The budget's clock (the imports above take a few seconds).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ('grouped_matmul', 'bench', 'fashion', 'multi_device')
FASHION_CONFIGS = ('fashion_vit', 'fashion_switch')
FASHION_DIRS = (os.path.join(REPO, '.data', 'fashion-mnist'), input_pipeline.FASHION_MNIST_DIR)
JSON_NAME, MARKDOWN_NAME = 'accelerator_check.json', 'accelerator_check.md'

# The MoE cases of the bench, at the dense model's active FLOPs: (router, K,
# capacity factor); experts are mlp_dim / K wide.
ROUTER_CASES = (
  ('topk', 1, 1.25),
  ('topk', 2, 1.05),
  ('expert_choice', 1, 1.0),
  ('soft', 1, 1.0),
  ('dropless', 1, 1.25),
)
# The multi-device cases, at every expert axis: (router, K, capacity factor); None: dense.
MULTI_DEVICE_CASES = ((None, 1, 1.25), ('topk', 1, 1.25), ('dropless', 1, 1.25))
# max |a - b| / max |b| of the outputs and the matmul gradients (rows, W_in,
# W_out): bfloat16 has 8 significant bits (2^-8 = 0.4%), and the two paths
# differ in the order of their sums. The bias gradients are sums over all rows
# of an expert (thousands) and are reported on their own.
BF16_TOLERANCE = 2e-2
MATMUL_TENSORS = ('out', 'd_rows', 'd_wi', 'd_wo')
BIAS_TENSORS = ('d_bi', 'd_bo')


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes of every part (`FULL` or `SMOKE`) and the seconds each keeps for itself."""

  name: str
  model: BenchSettings  # The bench ViT and its timing (one device, expert axis 1).
  group_size: int  # Images per routing group; Soft MoE: 1.
  experts: tuple[int, ...]
  grouped_rows: int
  grouped_width: int
  grouped_hidden: int
  grouped_steps: int
  grouped_warmup: int
  fashion_steps: int | None  # None: the recipe's.
  fashion_train_split: str | None  # None: the recipe's.
  fashion_test_split: str | None
  fashion_overrides: dict  # 'model.width' -> value, on both configs.
  multi_axes: tuple[int, ...]
  multi_experts: int
  multi_cases: tuple  # Of MULTI_DEVICE_CASES.
  reserve_s: dict  # part -> seconds kept for it by the parts before.


FULL = Plan(
  name='full',
  model=BenchSettings(
    width=768,
    depth=12,
    num_heads=12,
    mlp_dim=3072,
    patch_size=16,
    image_size=224,
    batch_size=128,
    moe_layers='every_2',
    dtype='bfloat16',
    optimizer='adafactor',
    expert_axis=1,
    steps=20,
    warmup=3,
    interleave=False,
  ),
  group_size=8,
  experts=(8, 32),
  grouped_rows=128 * 197,
  grouped_width=768,
  grouped_hidden=3072,
  grouped_steps=20,
  grouped_warmup=3,
  fashion_steps=None,
  fashion_train_split=None,
  fashion_test_split=None,
  fashion_overrides={},
  multi_axes=(2, 4, 8),
  multi_experts=8,
  multi_cases=MULTI_DEVICE_CASES,
  reserve_s={'grouped_matmul': 40, 'bench': 220, 'fashion': 150, 'multi_device': 120},
)
SMOKE = Plan(
  name='smoke',
  model=BenchSettings(
    width=32,
    depth=2,
    num_heads=2,
    mlp_dim=64,
    patch_size=4,
    image_size=16,
    batch_size=16,
    moe_layers='every_2',
    dtype='bfloat16',
    optimizer='adafactor',
    expert_axis=1,
    steps=2,
    warmup=1,
    interleave=False,
  ),
  group_size=2,
  experts=(8,),
  grouped_rows=256,
  grouped_width=32,
  grouped_hidden=64,
  grouped_steps=2,
  grouped_warmup=1,
  fashion_steps=10,
  fashion_train_split='train[:512]',
  fashion_test_split='test[:256]',
  fashion_overrides={
    'model.width': 32,
    'model.num_heads': 2,
    'model.mlp_dim': 64,
    'input.eval_batch_size': 256,
  },
  multi_axes=(2, 8),
  multi_experts=8,
  multi_cases=MULTI_DEVICE_CASES[1:2],  # topk.
  reserve_s={'grouped_matmul': 0, 'bench': 0, 'fashion': 0, 'multi_device': 0},
)

# What the time plan of the full check assumes besides the FLOPs (one H100 SXM).
# CPU figures: this project's 2-core CI machine, full-size programs (ViT-B/16,
# batch 128, bf16); see docs/performance.md, "Accelerator check".
PLAN_ASSUMPTIONS = {
  'peak_flops': 989e12,  # H100 SXM, bfloat16, dense.
  'mfu': 0.3,  # Of the bench train steps (MoE included); the steps are a small part.
  'startup_s': 20,  # Python and JAX imports, the CUDA backend, writing the files.
  'trace_s': 3.0,  # Build + lower a bench case, main thread (CPU: 2.3-3.4 s).
  'compile_s': 45,  # Step + init compile of a bench case (CPU: 12-29 s; GPU autotuning).
  'init_run_s': 2.0,  # Initialising a case's parameters and a batch on the device.
  'compile_threads': 4,
  'grouped_compile_s': 5,  # Per grouped-matmul program (forward + backward of one layer).
  'fashion_step_s': 0.006,  # Host-bound step: batch assembly, transfer, dispatch, check.
  'fashion_fixed_s': 25,  # Per run: dataset, compiles, evaluation, checkpoints.
}


# --------------------------------------------------------------------------- report


class Report:
  """The JSON and markdown of the check, rewritten whenever something is added."""

  def __init__(self, output_dir: str, plan: Plan, args):
    self.output_dir = output_dir
    self.start = START
    self.data = {
      'mode': plan.name,
      'command': ' '.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
      'environment': environment(),
      'plan': dataclasses.asdict(plan),
      'budget_s': args.budget_s,
      'parts': {},
    }
    os.makedirs(output_dir, exist_ok=True)

  def part(self, name: str) -> dict:
    return self.data['parts'].setdefault(name, {'status': 'running', 'rows': []})

  def write(self) -> None:
    self.data['elapsed_s'] = time.monotonic() - self.start
    self.data['environment']['tensorflow_imported'] = 'tensorflow' in sys.modules
    self.data['environment']['sklearn_imported'] = 'sklearn' in sys.modules
    for name, text in (
      (JSON_NAME, json.dumps(self.data, indent=2, default=str)),
      (MARKDOWN_NAME, markdown(self.data)),
    ):
      path = os.path.join(self.output_dir, name)
      with open(path + '.tmp', 'w') as f:
        f.write(text + '\n')
      os.replace(path + '.tmp', path)


def environment() -> dict:
  device = jax.devices()[0]
  return {
    'jax': jax.__version__,
    'backend': jax.default_backend(),
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'platform_version': getattr(getattr(device, 'client', None), 'platform_version', None),
    'peak_bf16_flops': benchmark.peak_flops(device.device_kind, 'bfloat16'),
    'python': platform.python_version(),
    'cpu_count': os.cpu_count(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'ragged_dot_flags': {  # How jax lowers ragged_dot on this backend.
      name: getattr(jax.config, name, None)
      for name in (
        'jax_ragged_dot_use_ragged_dot_instruction',
        'jax_ragged_dot_use_gpu_pallas_triton_lowering',
      )
    },
  }


def one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:400] if text else ""}'


def _fmt(value, spec: str, scale: float = 1.0) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return '-'
  return format(value * scale, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '| --- |' + ' ---: |' * (len(header) - 1)]
  return lines + ['| ' + ' | '.join(r) + ' |' for r in rows]


def _not_ok(row: dict, width: int) -> list[str] | None:
  """The cells of a row that failed or was skipped: its label, then what happened."""
  if row.get('status', 'ok') == 'ok':
    return None
  what = (row.get('error') or row.get('reason') or row['status']).replace('|', '/')
  return [row.get('case', row.get('config', '?')), f'{row["status"]}: {what}'] + [''] * (width - 2)


def markdown(data: dict) -> str:
  env = data['environment']
  lines = [
    f'# Accelerator check ({data["mode"]})',
    '',
    f'{env["device_count"]} x {env["device_kind"]} ({env["backend"]}), jax {env["jax"]}, '
    f'Python {env["python"]}, {env["cpu_count"]} CPUs; bf16 peak '
    f'{_fmt(env["peak_bf16_flops"], ".0f", 1e-12)} TFLOP/s per device; '
    f'{data.get("elapsed_s", 0):.0f} s of a {data["budget_s"]:.0f} s budget; TensorFlow '
    f'{"imported" if env.get("tensorflow_imported") else "not imported"}.',
  ]
  for name in PARTS:
    part = data['parts'].get(name)
    if part is None:
      continue
    lines += ['', f'## {name}', '']
    if part.get('note'):
      lines += [part['note'], '']
    if part['status'] in ('skipped', 'error') and not part['rows']:
      lines.append(f'{part["status"]}: {part.get("reason") or part.get("error")}')
      continue
    lines += FORMATTERS[name](part['rows'])
    if part['status'] not in ('ok', 'running'):
      lines += ['', f'{part["status"]}: {part.get("reason") or part.get("error") or ""}'.rstrip()]
  return '\n'.join(lines)


def _grouped_table(rows):
  header = ['E', 'rows', 'ragged (ms)', 'blocks (ms)', 'blocks / ragged', 'ragged vs blocks']
  header += [
    'ragged vs f32',
    'blocks vs f32',
    f'within {BF16_TOLERANCE:g}',
    'bias grads (the same three)',
  ]
  cells = []
  for r in rows:
    bad = _not_ok(r, len(header))
    if bad:
      cells.append(bad)
      continue
    cells.append(
      [
        str(r['num_experts']),
        str(r['rows']),
        _fmt(r['ragged_ms'], '.2f'),
        _fmt(r['blocks_ms'], '.2f'),
        _fmt(r['blocks_ms'] / r['ragged_ms'], '.2f'),
        _fmt(r['max_error']['ragged_vs_blocks'], '.1e'),
        _fmt(r['max_error']['ragged_vs_f32'], '.1e'),
        _fmt(r['max_error']['blocks_vs_f32'], '.1e'),
        'yes' if r['within_tolerance'] else 'NO',
        ' / '.join(_fmt(v, '.1e') for v in r['max_bias_grad_error'].values()),
      ]
    )
  return _table(header, cells)


def _bench_table(rows):
  header = ['case', 'expert H', 'step (ms)', 'images/s', 'vs dense', 'GFLOP/img (fwd)', 'MFU']
  header += ['XLA peak (MB)', 'compile (s)']
  cells = []
  for r in rows:
    bad = _not_ok(r, len(header))
    if bad:
      cells.append(bad)
      continue
    peak = r.get('xla_peak_bytes') or r.get('xla_memory_bytes')
    cells.append(
      [
        r['case'] + (f' ({r["mesh_devices"]} devices)' if r.get('mesh_devices', 1) > 1 else ''),
        str(r.get('expert_mlp_dim') or '-'),
        _fmt(r['step_seconds_median'], '.1f', 1000),
        _fmt(r['images_per_sec'], '.0f'),
        _fmt(r.get('vs_dense'), '.3f'),
        _fmt(r['gflops_per_image_fwd'], '.4g'),
        _fmt(r['mfu'], '.1%'),
        _fmt(peak, '.4g', 2**-20),
        _fmt(r['compile_seconds'], '.1f'),
      ]
    )
  return _table(header, cells)


def _fashion_table(rows):
  header = ['config', 'steps', 'devices', 'test accuracy', 'wall (s)', 'training loop (s)']
  header += ['step (ms)', 'train images/s', 'eval images/s']
  cells = []
  for r in rows:
    bad = _not_ok(r, len(header))
    if bad:
      cells.append(bad)
      continue
    cells.append(
      [
        r['config'],
        str(r['steps']),
        str(r['devices']),
        _fmt(r['test_accuracy'], '.2%'),
        _fmt(r['wall_seconds'], '.1f'),
        _fmt(r['train_seconds'], '.1f'),
        _fmt(r['step_seconds'], '.2f', 1000),
        _fmt(r['train_images_per_sec'], '.0f'),
        _fmt(r['eval_images_per_sec'], '.0f'),
      ]
    )
  return _table(header, cells)


def _multi_table(rows):
  header = ['devices', 'case', 'step (ms)', 'images/s', 'per device', 'vs 1 device', 'MFU']
  cells = []
  for r in rows:
    bad = _not_ok(r, len(header) - 1)
    if bad:
      cells.append([str(r.get('mesh_devices', '?')), *bad])
      continue
    cells.append(
      [
        str(r['mesh_devices']),
        r['case'],
        _fmt(r['step_seconds_median'], '.1f', 1000),
        _fmt(r['images_per_sec'], '.0f'),
        _fmt(r['images_per_sec'] / r['mesh_devices'], '.0f'),
        _fmt(r.get('scaling'), '.2f'),
        _fmt(r['mfu'], '.1%'),
      ]
    )
  return _table(header, cells)


FORMATTERS = {
  'grouped_matmul': _grouped_table,
  'bench': _bench_table,
  'fashion': _fashion_table,
  'multi_device': _multi_table,
}


# --------------------------------------------------------------------------- time budget


class Budget:
  """Deadlines: every part may use the time left but what the parts after it keep."""

  def __init__(self, seconds: float, reserve: dict, parts: list[str]):
    self.end = START + seconds
    self.reserve, self.parts = reserve, parts

  def left(self) -> float:
    return self.end - time.monotonic()

  def deadline(self, part: str) -> float:
    later = self.parts[self.parts.index(part) + 1 :]
    return self.end - sum(self.reserve.get(p, 0) for p in later)


# --------------------------------------------------------------------------- grouped matmul


def grouped_operands(plan: Plan, num_experts: int, seed: int = 0):
  """Rows, their experts (a mildly uneven draw), expert MLP parameters and a cotangent."""
  rng = np.random.default_rng(seed)
  a, d, h = plan.grouped_rows, plan.grouped_width, plan.grouped_hidden
  share = np.exp(0.5 * rng.normal(size=num_experts))
  expert = rng.choice(num_experts, size=a, p=share / share.sum()).astype(np.int32)
  params = {
    'wi': rng.normal(size=(num_experts, d, h)) / math.sqrt(d),
    'bi': 0.1 * rng.normal(size=(num_experts, h)),
    'wo': rng.normal(size=(num_experts, h, d)) / math.sqrt(h),
    'bo': 0.1 * rng.normal(size=(num_experts, d)),
  }
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  rows = jnp.asarray(rng.normal(size=(a, d)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(a, d)), jnp.float32)
  return rows, jnp.asarray(expert), params, cotangent


def grouped_step(impl: str, dtype, block_size: int):
  """Jitted (rows, expert, params, cotangent) -> {'out', 'd_rows', 'd_wi', 'd_bi', ...}."""

  def loss(rows, params, expert, cotangent):
    out = dropless.grouped_mlp(
      rows.astype(dtype), expert, params, block_size=block_size, dtype=dtype, impl=impl
    )
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  def step(rows, expert, params, cotangent):
    (_, out), (d_rows, d_params) = grad(rows, params, expert, cotangent)
    return {'out': out, 'd_rows': d_rows, **{f'd_{k}': v for k, v in d_params.items()}}

  return jax.jit(step)


def relative_errors(a: dict, b: dict) -> dict[str, float]:
  """max |a - b| / max |b| of every tensor."""
  out = {}
  for name, x in a.items():
    x, y = np.asarray(x, np.float32), np.asarray(b[name], np.float32)
    out[name] = float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))
  return out


def run_grouped_matmul(plan: Plan, report: Report, part: dict, deadline: float) -> None:
  block_size = factory.moe_spec(config_for(plan, Case(8, 'dropless'))).block_size
  for num_experts in plan.experts:
    if time.monotonic() > deadline:
      part['rows'].append(skipped_row(f'E={num_experts}', 'the time budget was spent'))
    else:
      try:
        part['rows'].append(grouped_row(plan, num_experts, block_size))
      except Exception as e:  # pylint: disable=broad-except
        part['rows'].append(error_row(f'E={num_experts}', e))
    report.write()


def grouped_row(plan: Plan, num_experts: int, block_size: int) -> dict:
  """Both grouped-matmul paths at E experts: times, and errors against each other and f32."""
  rows, expert, params, cotangent = grouped_operands(plan, num_experts)
  args = (rows, expert, params, cotangent)
  fns, compile_s = {}, {}
  for impl in ('ragged', 'blocks'):
    start = time.perf_counter()
    fns[impl] = grouped_step(impl, jnp.bfloat16, block_size).lower(*args).compile()
    compile_s[impl] = time.perf_counter() - start
  with jax.default_matmul_precision('highest'):
    reference = grouped_step('blocks', jnp.float32, block_size).lower(*args).compile()
  out = {impl: jax.device_get(fn(*args)) for impl, fn in fns.items()}
  ref = jax.device_get(reference(*args))
  runs = [lambda fn=fn: fn(*args) for fn in fns.values()]
  times = benchmark.time_cases(runs, plan.grouped_steps, plan.grouped_warmup, interleave=True)
  ms = {impl: 1000 * statistics.median(t) for impl, t in zip(fns, times)}
  errors = {
    'ragged_vs_blocks': relative_errors(out['ragged'], out['blocks']),
    'ragged_vs_f32': relative_errors(out['ragged'], ref),
    'blocks_vs_f32': relative_errors(out['blocks'], ref),
  }
  worst = {k: max(v[t] for t in MATMUL_TENSORS) for k, v in errors.items()}
  worst_bias = {k: max(v[t] for t in BIAS_TENSORS) for k, v in errors.items()}
  flops = 3 * 2 * 2 * plan.grouped_rows * plan.grouped_width * plan.grouped_hidden
  print(
    f'grouped_matmul E={num_experts}: ragged {ms["ragged"]:.2f} ms, blocks '
    f'{ms["blocks"]:.2f} ms, max error {max(worst.values()):.1e} (bias gradients '
    f'{max(worst_bias.values()):.1e})',
    file=sys.stderr,
  )
  return {
    'case': f'E={num_experts}',
    'status': 'ok',
    'num_experts': num_experts,
    'rows': plan.grouped_rows,
    'width': plan.grouped_width,
    'hidden': plan.grouped_hidden,
    'block_size': block_size,
    'rows_per_expert': np.bincount(np.asarray(expert), minlength=num_experts).tolist(),
    'ragged_ms': ms['ragged'],
    'blocks_ms': ms['blocks'],
    'ragged_ms_all': [1000 * t for t in times[0]],
    'blocks_ms_all': [1000 * t for t in times[1]],
    'active_tflops_per_sec': {k: flops / v / 1e9 for k, v in ms.items()},
    'compile_seconds': compile_s,
    'errors': errors,
    'max_error': worst,
    'max_bias_grad_error': worst_bias,
    'within_tolerance': all(e <= BF16_TOLERANCE for e in worst.values()),
  }


# --------------------------------------------------------------------------- train-step cases


def config_for(settings_or_plan, case: Case, group_size: int | None = None):
  """The bench config of a case: experts mlp_dim / K wide, routing groups of `group_size`."""
  plan = settings_or_plan if isinstance(settings_or_plan, Plan) else None
  settings = plan.model if plan else settings_or_plan
  group_size = plan.group_size if plan else group_size
  config = benchmark.case_config(settings, case)
  if case.num_experts:
    config.model.moe.mlp_dim = settings.mlp_dim // case.num_selected
    config.model.moe.group_size = 1 if case.router == 'soft' else group_size
  return config


@dataclasses.dataclass
class Job:
  """One train-step case to build, compile and time on `devices`."""

  settings: BenchSettings
  case: Case
  config: object
  devices: list
  extra: dict


def bench_jobs(plan: Plan) -> list[Job]:
  devices = jax.devices()[:1]
  cases = [Case()]
  for num_experts in plan.experts:
    for router, k, factor in ROUTER_CASES:
      cases.append(Case(num_experts, router, k, factor).normalized())
  return [Job(plan.model, c, config_for(plan, c), devices, {}) for c in cases]


def multi_device_jobs(plan: Plan, num_devices: int) -> list[Job]:
  jobs = []
  for n in plan.multi_axes:
    if n > num_devices:
      continue
    settings = dataclasses.replace(plan.model, batch_size=plan.model.batch_size * n, expert_axis=n)
    for router, k, factor in plan.multi_cases:
      case = Case(plan.multi_experts, router, k, factor).normalized() if router else Case()
      config = config_for(settings, case, plan.group_size)
      jobs.append(Job(settings, case, config, jax.devices()[:n], {'mesh_devices': n}))
  return jobs


def skipped_row(label: str, reason: str, **extra) -> dict:
  return {'case': label, 'status': 'skipped', 'reason': reason, **extra}


def error_row(label: str, error: BaseException, **extra) -> dict:
  return {'case': label, 'status': 'error', 'error': one_line(error), **extra}


def _compile(step_lowered, init_lowered):
  start = time.perf_counter()
  step = step_lowered.compile()
  middle = time.perf_counter()
  init = init_lowered.compile()
  return step, middle - start, init, time.perf_counter() - middle


def run_jobs(jobs: list[Job], deadline: float, threads: int, on_row) -> None:
  """Builds and lowers every job, compiles them `threads` at a time, then times each alone.

  The timing waits for all compilations, so that none runs (or autotunes on
  the device) during a timed step. `on_row(row)` gets every row as it is made.
  """
  pool = concurrent.futures.ThreadPoolExecutor(max(1, threads))
  lowered = []
  try:
    for job in jobs:
      label, extra = job.case.label, job.extra
      if time.monotonic() > deadline:
        on_row(skipped_row(label, 'the time budget was spent before it was compiled', **extra))
        continue
      try:
        start = time.perf_counter()
        built = benchmark.build_case(
          job.settings, job.case, config=job.config, devices=job.devices, abstract=True
        )
        step_lowered = benchmark.lower_case(built, 'train')
        init_lowered = built.init_fn.lower(0)
        trace_s = time.perf_counter() - start
      except Exception as e:  # pylint: disable=broad-except
        on_row(error_row(label, e, **extra))
        continue
      lowered.append([job, built, trace_s, pool.submit(_compile, step_lowered, init_lowered)])
    concurrent.futures.wait(
      [item[3] for item in lowered], timeout=max(0.0, deadline - time.monotonic())
    )
    for i, (job, built, trace_s, future) in enumerate(lowered):
      lowered[i] = None  # The case's state goes when its row is made.
      label, extra = job.case.label, job.extra
      if not future.done():
        on_row(skipped_row(label, 'its compilation did not finish within the budget', **extra))
        continue
      if time.monotonic() > deadline:
        on_row(skipped_row(label, 'the time budget was spent before it ran', **extra))
        continue
      try:
        row = _time_job(job, built, trace_s, *future.result())
      except Exception as e:  # pylint: disable=broad-except
        on_row(error_row(label, e, **extra))
        continue
      finally:
        built = None
      on_row(row)
  finally:
    pool.shutdown(wait=False, cancel_futures=True)


def _time_job(job: Job, built, trace_s, step, step_s, init, init_s) -> dict:
  settings = job.settings
  built.state = init()
  built.batch = benchmark.random_batch(settings, built.mesh)
  prepared = benchmark.prepared_case(built, 'train', step, step_s)
  times = benchmark.time_cases([prepared.run_once], settings.steps, settings.warmup, False)[0]
  loss = float(jax.device_get(prepared.run_once()))
  row = benchmark.case_row(settings, prepared, times, alone=False)
  spec = built.model.moe
  row.update(
    status='ok',
    expert_mlp_dim=spec.mlp_dim if spec is not None else None,
    grouped_matmul=dropless.default_impl() if job.case.router == 'dropless' else None,
    batch_size=settings.batch_size,
    trace_seconds=trace_s,
    init_compile_seconds=init_s,
    loss_after=loss,
    loss_finite=math.isfinite(loss),
    **job.extra,
  )
  print(
    f'{job.case.label} ({len(job.devices)} device(s)): {1000 * row["step_seconds_median"]:.1f} '
    f'ms/step, compiled in {step_s:.1f} + {init_s:.1f} s',
    file=sys.stderr,
  )
  return row


def run_bench(plan: Plan, report: Report, part: dict, deadline: float, threads: int) -> None:
  def on_row(row):
    if row['status'] == 'ok':
      dense = next((r for r in part['rows'] if r['case'] == 'dense' and r['status'] == 'ok'), None)
      if row['case'] == 'dense':
        dense = row
      row['vs_dense'] = row['step_seconds_median'] / dense['step_seconds_median'] if dense else None
    part['rows'].append(row)
    report.write()

  run_jobs(bench_jobs(plan), deadline, threads, on_row)


def run_multi_device(plan: Plan, report: Report, part: dict, deadline: float, threads: int):
  one_device = {
    r['case']: r['images_per_sec']
    for r in report.data['parts'].get('bench', {}).get('rows', [])
    if r.get('status') == 'ok'
  }

  def on_row(row):
    if row['status'] == 'ok' and row['case'] in one_device:
      row['scaling'] = row['images_per_sec'] / (row['mesh_devices'] * one_device[row['case']])
    part['rows'].append(row)
    report.write()

  run_jobs(multi_device_jobs(plan, jax.device_count()), deadline, threads, on_row)


# --------------------------------------------------------------------------- Fashion-MNIST


def load_config(name: str):
  path = os.path.join(REPO, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_accelerator_check_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_synthetic_fashion(directory: str, num_train: int, num_test: int) -> None:
  """Four IDX files of random 28x28 images and labels, in Fashion-MNIST's names."""
  rng = np.random.default_rng(0)
  for split, count in (('train', num_train), ('test', num_test)):
    image_stem, label_stem = input_pipeline.FASHION_MNIST_FILES[split]
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    idx_files.write(os.path.join(directory, image_stem + '.gz'), images)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    idx_files.write(os.path.join(directory, label_stem + '.gz'), labels)


def fashion_dir(requested: str | None) -> str | None:
  """The first directory holding the four IDX files: `requested`, else `FASHION_DIRS`."""
  for directory in [requested] if requested else FASHION_DIRS:
    if input_pipeline.fashion_mnist_files(directory) is not None:
      return directory
  return None


def run_fashion(plan: Plan, args, report: Report, part: dict, deadline: float) -> None:
  from vmoe_jax import train  # pylint: disable=g-import-not-at-top  (orbax, only here)

  scratch = tempfile.mkdtemp(prefix='accelerator_check_', dir=args.workdir_root)
  try:
    data_dir = fashion_dir(args.fashion_dir)
    if data_dir is None:
      where = args.fashion_dir or ' or '.join(FASHION_DIRS)
      if not args.smoke:
        part.update(status='error', error=f'no Fashion-MNIST IDX files in {where}')
        return
      data_dir = os.path.join(scratch, 'fashion-mnist')
      os.makedirs(data_dir)
      write_synthetic_fashion(data_dir, 512, 256)
      part['note'] = f'Synthetic IDX files (random images): no Fashion-MNIST files in {where}.'
    part['data_dir'] = data_dir
    previous_s = None
    for name in FASHION_CONFIGS:
      config = load_config(name)
      config.input.data_dir = data_dir
      steps = args.fashion_steps or plan.fashion_steps or config.train.num_steps
      config.train.num_steps = steps
      if plan.fashion_train_split:
        config.input.train_split = plan.fashion_train_split
        config.input.test_split = plan.fashion_test_split
      for key, value in plan.fashion_overrides.items():
        section, field = key.split('.')
        config[section][field] = value
      if steps < 10 * config.train.log_every:  # The median step time leaves the first out.
        config.train.log_every = max(1, steps // 5)
      need = (
        1.2 * previous_s
        if previous_s
        else (PLAN_ASSUMPTIONS['fashion_fixed_s'] + steps * PLAN_ASSUMPTIONS['fashion_step_s'])
      )
      if not args.smoke and deadline - time.monotonic() < need:
        part['rows'].append(
          skipped_row(name, f'about {need:.0f} s needed, {deadline - time.monotonic():.0f} left')
        )
        part['rows'][-1]['config'] = name
        report.write()
        continue
      print(f'fashion: training {name} for {steps} steps', file=sys.stderr)
      workdir = os.path.join(scratch, name)
      start = time.perf_counter()
      try:
        results = train.train_and_evaluate(config, workdir)
      except Exception as e:  # pylint: disable=broad-except
        part['rows'].append({**error_row(name, e), 'config': name})
        report.write()
        continue
      previous_s = time.perf_counter() - start
      step_s = results.get('step_seconds')
      part['rows'].append(
        {
          'config': name,
          'case': name,
          'status': 'ok',
          'steps': results['step'],
          'batch_size': config.input.batch_size,
          'devices': jax.device_count(),
          'num_params': results.get('num_params'),
          'test_accuracy': results.get('test/accuracy'),
          'test_loss': results.get('test/loss'),
          'wall_seconds': previous_s,
          'train_seconds': results.get('train_seconds'),
          'step_seconds': step_s,
          'train_images_per_sec': config.input.batch_size / step_s if step_s else None,
          'eval_images_per_sec': results.get('eval_images_per_sec'),
          'test_moe_dropped': results.get('test/moe_dropped'),
        }
      )
      print(
        f'fashion {name}: test accuracy {results.get("test/accuracy", float("nan")):.4f}, '
        f'{previous_s:.1f} s',
        file=sys.stderr,
      )
      report.write()
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------- the plan


def time_plan(plan: Plan = FULL) -> dict:
  """Estimated seconds of every part of `plan` on one H100 (`PLAN_ASSUMPTIONS`)."""
  a = PLAN_ASSUMPTIONS
  jobs = bench_jobs(plan)
  step_flops, steps = [], plan.model.warmup + plan.model.steps + 1
  for job in jobs:
    mesh = sharding.create_mesh(1, job.case.num_experts, job.devices)
    spec = factory.moe_spec(job.config)
    model = factory.create_model(job.config, benchmark.NUM_CLASSES, mesh, moe=spec)
    fwd = benchmark.case_flops(plan.model, model, 1)['total']
    step_flops.append(3 * fwd * plan.model.batch_size)
  run_s = sum(steps * f / (a['mfu'] * a['peak_flops']) + a['init_run_s'] for f in step_flops)
  compile_s = math.ceil(len(jobs) / a['compile_threads']) * a['compile_s']
  bench_s = max(len(jobs) * a['trace_s'], compile_s + a['trace_s']) + run_s
  grouped_flops = 3 * 2 * 2 * plan.grouped_rows * plan.grouped_width * plan.grouped_hidden
  grouped_s = len(plan.experts) * (
    3 * a['grouped_compile_s']
    + 2 * (plan.grouped_steps + plan.grouped_warmup) * grouped_flops / (a['mfu'] * a['peak_flops'])
  )
  fashion_steps = plan.fashion_steps or 5600
  fashion_s = len(FASHION_CONFIGS) * (a['fashion_fixed_s'] + fashion_steps * a['fashion_step_s'])
  parts = {
    'startup': a['startup_s'],
    'grouped_matmul': grouped_s,
    'bench': bench_s,
    'fashion': fashion_s,
    'multi_device': 0.0,  # Skipped on one device.
  }
  return {
    'seconds': parts,
    'total_seconds': sum(parts.values()),
    'bench_step_tflops': [f / 1e12 for f in step_flops],
    'assumptions': a,
  }


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--output_dir', help='Where the JSON and the markdown go.')
  parser.add_argument('--smoke', action='store_true', help='Every part at toy sizes.')
  parser.add_argument('--plan', action='store_true', help="Print the full check's time plan.")
  parser.add_argument('--parts', default=','.join(PARTS), help=f'Some of {",".join(PARTS)}.')
  parser.add_argument(
    '--fashion_dir',
    default=None,
    help=f'The four IDX files (default: {" or ".join(FASHION_DIRS)}).',
  )
  parser.add_argument('--fashion_steps', type=int, default=None, help="Default: the recipe's.")
  parser.add_argument('--budget_s', type=float, default=None, help='Default 450 (smoke: 900).')
  parser.add_argument(
    '--compile_threads', type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2))
  )
  parser.add_argument('--workdir_root', default=None, help='Scratch space (default: $TMPDIR).')
  args = parser.parse_args(argv)
  parts = [p for p in args.parts.split(',') if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f'--parts: unknown {unknown}; use some of {",".join(PARTS)}.')
  if not args.plan and not args.output_dir:
    parser.error('--output_dir=DIR is needed.')
  args.parts = [p for p in PARTS if p in parts]
  if args.budget_s is None:
    args.budget_s = 900.0 if args.smoke else 450.0
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  logging.getLogger('vmoe_jax').setLevel(logging.WARNING)
  logging.getLogger('absl').setLevel(logging.WARNING)
  if args.plan:
    print(json.dumps(time_plan(FULL), indent=2))
    return 0
  plan = SMOKE if args.smoke else FULL
  report = Report(args.output_dir, plan, args)
  reserve = dict(plan.reserve_s)
  if jax.device_count() < 2:  # The multi-device part is skipped at once.
    reserve['multi_device'] = 0
  budget = Budget(args.budget_s, reserve, args.parts)
  report.data['time_plan'] = time_plan(FULL)
  report.write()
  for name in args.parts:
    part = report.part(name)
    start = time.monotonic()
    deadline = budget.deadline(name)
    try:
      if name == 'multi_device' and jax.device_count() < 2:
        part.update(
          status='skipped',
          reason=f'one device ({jax.devices()[0].device_kind}); the multi-device path needs 2+.',
        )
      elif time.monotonic() >= deadline:
        part.update(status='skipped', reason=f'the time budget ({args.budget_s:.0f} s) was spent.')
      elif name == 'grouped_matmul':
        run_grouped_matmul(plan, report, part, deadline)
      elif name == 'bench':
        run_bench(plan, report, part, deadline, args.compile_threads)
      elif name == 'fashion':
        run_fashion(plan, args, report, part, deadline)
      else:
        run_multi_device(plan, report, part, deadline, args.compile_threads)
    except Exception as e:  # pylint: disable=broad-except
      part.update(status='error', error=one_line(e), traceback=traceback.format_exc()[-3000:])
    if part['status'] == 'running':
      states = {r.get('status', 'ok') for r in part['rows']}
      part['status'] = 'ok' if states <= {'ok'} and part['rows'] else 'partial'
      if part['status'] == 'partial' and not part['rows']:
        part.update(status='error', error=part.get('error', 'no rows'))
    part['seconds'] = time.monotonic() - start
    print(f'{name}: {part["status"]} in {part["seconds"]:.1f} s', file=sys.stderr)
    report.write()
  print(f'Written to {os.path.join(args.output_dir, MARKDOWN_NAME)} and {JSON_NAME}.')
  return 0


if __name__ == '__main__':
  code = main()
  if threading.active_count() > 1:  # A compilation past the budget: do not wait for it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)
