r"""Benchmarks of jitted train and inference steps: dense ViT vs MoE ViTs.

The default case is the CPU case the README reports: width 192, depth 6,
3 heads, MLP 768, patch 4 on 32x32 images, batch 128, MoE in every other
block, K=1, capacity 1.25, float32:

  python -m vmoe_jax.bench --experts=8,32,64 --json=bench_cpu.json

Wider sweeps (E, K, capacity factors, dispatch implementations, modes):

  python -m vmoe_jax.bench --experts=8,32,64,128 --num_selected=1,2 \
      --capacity_factors=1.0,1.25 --dispatch=indices,einsum --modes=train,inference \
      --nointerleave

Every case is compiled and run `--warmup` times; then `--steps` rounds each
time one step of every case, in turn (each step waited for), so that changes
in the machine's load fall on all cases alike; the table shows medians.
`--nointerleave` compiles and times one case at a time instead (less memory,
and the device's peak memory per case). FLOPs are analytic
(`vmoe_jax.flops`: active FLOPs, K experts per token, forward pass; training
counts 3x); MFU is shown on accelerators with a known peak.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

from vmoe_jax import config_defaults
from vmoe_jax import flops
from vmoe_jax import host_malloc
from vmoe_jax import optim
from vmoe_jax import schedules
from vmoe_jax import sharding
from vmoe_jax import train
from vmoe_jax.moe import routing as routing_lib

_EXPERTS = flags.DEFINE_list('experts', ['8', '32', '64'], 'Expert counts (a dense ViT is added).')
_NUM_SELECTED = flags.DEFINE_list('num_selected', ['1'], 'K values.')
_CAPACITY = flags.DEFINE_list('capacity_factors', ['1.25'], 'Capacity factors.')
_DISPATCH = flags.DEFINE_list('dispatch', ['indices'], "'indices' and/or 'einsum'.")
_MODES = flags.DEFINE_list('modes', ['train'], "'train' and/or 'inference'.")
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
_IMAGE = flags.DEFINE_integer('image_size', 32, 'Square image side.')
_WIDTH = flags.DEFINE_integer('width', 192, 'Model width.')
_DEPTH = flags.DEFINE_integer('depth', 6, 'Blocks.')
_HEADS = flags.DEFINE_integer('num_heads', 3, 'Attention heads.')
_MLP = flags.DEFINE_integer('mlp_dim', 768, 'MLP (and expert) hidden width.')
_PATCH = flags.DEFINE_integer('patch_size', 4, 'Patch size.')
_LAYERS = flags.DEFINE_string('moe_layers', 'every_2', 'Which blocks are MoE.')
_GROUP = flags.DEFINE_integer('group_size', 0, 'Images per routing group (0: per device).')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Compute dtype.')
_OPTIMIZER = flags.DEFINE_string('optimizer', 'adafactor', 'Optimizer of the train step.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per case.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_INTERLEAVE = flags.DEFINE_bool(
  'interleave',
  True,
  'Compile all cases of a mode, then time them in rounds (one step of each case per '
  'round); --nointerleave runs one case at a time (less memory).',
)
_EXPERT_AXIS = flags.DEFINE_integer('expert_axis', -1, 'Size of the expert mesh axis.')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0, 'Fake CPU devices (0: leave as is).')
_JSON = flags.DEFINE_string('json', 'bench.json', 'Where to write the results.')
_EXPERT_MATMULS = flags.DEFINE_bool(
  'expert_matmuls',
  False,
  "Instead of steps, time the six matmuls of one MoE layer's expert MLPs (forward, "
  'input and weight gradients) on its capacity buffers, at each --experts.',
)


def _all(parse, ok):
  """A validator: every item of a list flag parses and passes `ok`."""

  def check(values):
    try:
      return bool(values) and all(ok(parse(v)) for v in values)
    except ValueError:
      return False

  return check


flags.register_validator(
  'experts', _all(int, lambda e: e > 0), 'must be positive integers, e.g. --experts=8,32,64'
)
flags.register_validator(
  'num_selected', _all(int, lambda k: k > 0), 'must be positive integers, e.g. --num_selected=1,2'
)
flags.register_validator(
  'capacity_factors',
  _all(float, lambda c: c > 0),
  'must be positive numbers, e.g. --capacity_factors=1.0,1.25',
)
flags.register_validator(
  'dispatch', _all(str, lambda d: d in ('indices', 'einsum')), "must be 'indices' and/or 'einsum'"
)
flags.register_validator(
  'modes', _all(str, lambda m: m in ('train', 'inference')), "must be 'train' and/or 'inference'"
)

# Dense peak FLOP/s by device kind and compute dtype (vendor figures, no sparsity).
PEAK_FLOPS = {
  ('H100', 'bfloat16'): 989e12,
  ('H100', 'float32'): 494e12,  # TF32 tensor cores, XLA's default for float32 dots.
  ('H200', 'bfloat16'): 989e12,
  ('H200', 'float32'): 494e12,
  ('A100', 'bfloat16'): 312e12,
  ('A100', 'float32'): 156e12,
  ('TPU v4', 'bfloat16'): 275e12,
  ('TPU v5 lite', 'bfloat16'): 197e12,
  ('TPU v5p', 'bfloat16'): 459e12,
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  for (kind, kind_dtype), value in PEAK_FLOPS.items():
    if kind in device_kind and kind_dtype == dtype:
      return value
  return None


def _config(num_experts, num_selected, capacity_factor, dispatch):

  config = config_defaults.get_config()
  config.model.update(
    dict(
      width=_WIDTH.value,
      depth=_DEPTH.value,
      num_heads=_HEADS.value,
      mlp_dim=_MLP.value,
      patch_size=_PATCH.value,
      dtype=_DTYPE.value,
      dropout=0.0,
    )
  )
  moe = config.model.moe
  moe.update(
    dict(
      num_experts=num_experts,
      num_selected=num_selected,
      capacity_factor=capacity_factor,
      eval_capacity_factor=capacity_factor,
      dispatch=dispatch,
      layers=_LAYERS.value,
      group_size=_GROUP.value,
    )
  )
  config.input.batch_size = _BATCH.value
  config.optimizer.name = _OPTIMIZER.value
  config.mesh.expert = _EXPERT_AXIS.value
  return config


def _time_once(run_once) -> float:
  start = time.perf_counter()
  jax.block_until_ready(run_once())
  return time.perf_counter() - start


def time_cases(run_fns: list, steps: int, warmup: int, interleave: bool) -> list[list[float]]:
  """Seconds of `steps` waited-for calls of every function, after `warmup` calls each.

  Interleaved: round r calls every function once, in turn, so that a change in
  the machine's load (other processes, clock speed) falls on all cases alike
  instead of on whichever case was running then.
  """
  for run_once in run_fns:
    for _ in range(warmup):
      jax.block_until_ready(run_once())
  if not interleave:
    return [[_time_once(f) for _ in range(steps)] for f in run_fns]
  times = [[] for _ in run_fns]
  for _ in range(steps):
    for i, run_once in enumerate(run_fns):
      times[i].append(_time_once(run_once))
  return times


def build_case(num_experts, num_selected, capacity_factor, dispatch, expert_axis=None):
  """Model, optimizer, initial state and a random batch of one benchmark case."""
  config = _config(num_experts, num_selected, capacity_factor, dispatch)
  if expert_axis is not None:
    config.mesh.expert = expert_axis
  mesh = sharding.create_mesh(config.mesh.expert, num_experts)
  image_shape = (_IMAGE.value, _IMAGE.value, 3)
  model = train.create_model(config, 10, mesh)
  schedule = schedules.create_learning_rate_schedule(peak_value=1e-3, total_steps=10**6)
  tx, init_fn, _, shardings = train.create_train_state(
    config, model, lambda p, m: optim.create_optimizer(config, schedule, p, m), mesh, image_shape
  )
  rng = np.random.default_rng(0)
  batch = sharding.global_batch(
    {
      'image': rng.normal(size=(_BATCH.value, *image_shape)).astype(np.float32),
      'label': rng.integers(0, 10, size=_BATCH.value).astype(np.int32),
    },
    mesh,
  )
  step = jax.jit(
    functools.partial(train.train_step, model=model, tx=tx, schedule=schedule),
    donate_argnums=0,
    out_shardings=(shardings, None),
  )
  return dict(
    config=config,
    mesh=mesh,
    model=model,
    state=init_fn(0),
    batch=batch,
    train_step=step,
    image_shape=image_shape,
  )


def prepare_case(num_experts, num_selected, capacity_factor, dispatch, mode) -> dict:
  """Builds and compiles one case: its `run_once` (one step) and what its row needs."""
  case = build_case(num_experts, num_selected, capacity_factor, dispatch)
  model, state, batch = case['model'], case['state'], case['batch']
  start = time.perf_counter()
  if mode == 'train':
    compiled = case['train_step'].lower(state, batch).compile()
    holder = [state]

    def run_once():
      holder[0], metrics = compiled(holder[0], batch)
      return metrics['train/loss']

  else:
    forward = jax.jit(
      lambda params, images: model.apply({'params': params}, images, train=False)[0]
    )
    compiled = forward.lower(state.params, batch['image']).compile()
    run_once = functools.partial(compiled, state.params, batch['image'])
  return dict(
    key=(num_experts, num_selected, capacity_factor, dispatch, mode),
    mesh=case['mesh'],
    model=model,
    image_shape=case['image_shape'],
    compiled=compiled,
    compile_seconds=time.perf_counter() - start,
    run_once=run_once,
  )


def _label(num_experts, num_selected, capacity_factor, dispatch) -> str:
  if not num_experts:
    return 'dense'
  return f'moe E={num_experts} K={num_selected} cf={capacity_factor} {dispatch}'


def case_row(prepared: dict, times: list[float], alone: bool) -> dict:
  """The row of a prepared case timed `times` (seconds per step).

  `alone`: the case ran by itself, so the device's peak memory is its own.
  """
  num_experts, num_selected, capacity_factor, dispatch, mode = prepared['key']
  memory = prepared['compiled'].memory_analysis()
  xla_bytes = None
  if memory is not None:
    xla_bytes = (
      memory.temp_size_in_bytes
      + memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      - memory.alias_size_in_bytes
    )
  device = jax.devices()[0]
  peak_in_use = None
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if alone and stats and 'peak_bytes_in_use' in stats:
    peak_in_use = stats['peak_bytes_in_use']
  fwd = flops.forward_flops(prepared['model'], prepared['image_shape'])['total']
  step_flops = (3 if mode == 'train' else 1) * fwd * _BATCH.value
  median = statistics.median(times)
  peak = peak_flops(device.device_kind, _DTYPE.value)
  return {
    'case': _label(num_experts, num_selected, capacity_factor, dispatch),
    'mode': mode,
    'num_experts': num_experts,
    'num_selected': num_selected if num_experts else None,
    'capacity_factor': capacity_factor if num_experts else None,
    'dispatch': dispatch if num_experts else None,
    'step_seconds_median': median,
    'step_seconds_all': times,
    'images_per_sec': _BATCH.value / median,
    'compile_seconds': prepared['compile_seconds'],
    'xla_memory_bytes': xla_bytes,
    'device_peak_bytes_in_use': peak_in_use,
    'gflops_per_image_fwd': fwd / 1e9,
    'mfu': step_flops / median / peak if peak else None,
    'mesh': dict(prepared['mesh'].shape),
  }


def run_cases(cases: list[tuple], mode: str, interleave: bool) -> list[dict]:
  """Rows of `cases` in `mode`: all compiled and timed together when interleaved."""
  groups = [cases] if interleave else [[case] for case in cases]
  rows = []
  for group in groups:
    prepared = []
    for case in group:
      prepared.append(prepare_case(*case, mode))
      print(
        f'compiled {_label(*case)} {mode} in {prepared[-1]["compile_seconds"]:.1f}s',
        file=sys.stderr,
        flush=True,
      )
    times = time_cases([p['run_once'] for p in prepared], _STEPS.value, _WARMUP.value, interleave)
    for p, t in zip(prepared, times):
      rows.append(case_row(p, t, alone=not interleave))
      print(
        f'{rows[-1]["case"]} {mode}: {1000 * rows[-1]["step_seconds_median"]:.1f} ms/step',
        file=sys.stderr,
        flush=True,
      )
    del prepared
    jax.clear_caches()
  return rows


# The matmuls of an expert MLP y = gelu(x W_in) W_out and of its backward pass,
# batched over experts: (einsum, lhs, rhs); x, dy: (E, C, D), h, dh: (E, C, H).
EXPERT_MATMULS = {
  'x · W_in': ('ecd,edh->ech', 'x', 'w_in'),
  'h · W_out': ('ech,ehd->ecd', 'h', 'w_out'),
  'dy · W_out^T': ('ecd,ehd->ech', 'dy', 'w_out'),
  'dh · W_in^T': ('ech,edh->ecd', 'dh', 'w_in'),
  'x^T · dh (dW_in)': ('ecd,ech->edh', 'x', 'dh'),
  'h^T · dy (dW_out)': ('ech,ecd->ehd', 'h', 'dy'),
}


def expert_matmul_operands(
  num_experts: int, capacity: int, width: int, mlp_dim: int, dtype: str = 'float32'
) -> dict:
  """Random operands of `EXPERT_MATMULS` for E experts of `capacity` rows each."""
  rng = np.random.default_rng(0)
  shapes = {
    'x': (num_experts, capacity, width),
    'dy': (num_experts, capacity, width),
    'h': (num_experts, capacity, mlp_dim),
    'dh': (num_experts, capacity, mlp_dim),
    'w_in': (num_experts, width, mlp_dim),
    'w_out': (num_experts, mlp_dim, width),
  }
  return {k: jax.numpy.asarray(rng.normal(size=v), dtype) for k, v in shapes.items()}


def time_expert_matmuls(expert_counts: list[int]) -> tuple[list[dict], str]:
  """Rows and a table: median ms of every expert matmul at each E, interleaved.

  The buffers are those of the benchmark case: C = capacity of one routing
  group of all `--batch_size` images (or `--group_size`) for K and the first
  capacity factor, so E x C stays about the same while C shrinks with E.
  """
  patches = (_IMAGE.value // _PATCH.value) ** 2
  tokens = patches + (config_defaults.get_config().model.classifier == 'token')
  group = (_GROUP.value or _BATCH.value) * tokens
  num_selected, capacity_factor = int(_NUM_SELECTED.value[0]), float(_CAPACITY.value[0])
  cases, runs = [], []
  for num_experts in expert_counts:
    capacity = routing_lib.compute_capacity(group, num_experts, num_selected, capacity_factor)
    operands = expert_matmul_operands(num_experts, capacity, _WIDTH.value, _MLP.value, _DTYPE.value)
    for name, (spec, lhs, rhs) in EXPERT_MATMULS.items():
      fn = jax.jit(functools.partial(jax.numpy.einsum, spec))
      cases.append((num_experts, capacity, name))
      runs.append(functools.partial(fn, operands[lhs], operands[rhs]))
  times = time_cases(runs, _STEPS.value, _WARMUP.value, interleave=True)
  rows = [
    dict(num_experts=e, capacity=c, matmul=n, seconds_median=statistics.median(t), seconds_all=t)
    for (e, c, n), t in zip(cases, times)
  ]
  ms = {(r['num_experts'], r['matmul']): 1000 * r['seconds_median'] for r in rows}
  capacities = {r['num_experts']: r['capacity'] for r in rows}
  header = ' | '.join(f'E={e} (C={capacities[e]})' for e in expert_counts)
  lines = [f'| matmul (ms) | {header} |', '| --- |' + ' ---: |' * len(expert_counts)]
  for name in [*EXPERT_MATMULS, 'sum']:
    if name == 'sum':
      values = [sum(ms[(e, n)] for n in EXPERT_MATMULS) for e in expert_counts]
    else:
      values = [ms[(e, name)] for e in expert_counts]
    lines.append(f'| {name} | ' + ' | '.join(f'{v:.1f}' for v in values) + ' |')
  return rows, '\n'.join(lines)


def format_table(rows: list[dict]) -> str:
  """Markdown table; 'vs dense' compares with the dense row of the same mode."""
  dense = {r['mode']: r['step_seconds_median'] for r in rows if r['num_experts'] == 0}
  lines = [
    '| case | mode | step (ms) | images/s | vs dense | XLA memory (MB) | GFLOP/img (fwd) | MFU |',
    '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for r in rows:
    ratio = r['step_seconds_median'] / dense[r['mode']] if r['mode'] in dense else None
    memory, mfu = r['xla_memory_bytes'], r['mfu']
    cells = [
      r['case'],
      r['mode'],
      f'{1000 * r["step_seconds_median"]:.1f}',
      f'{r["images_per_sec"]:.1f}',
      f'{ratio:.3f}' if ratio else '-',
      f'{memory / 2**20:.0f}' if memory else '-',
      f'{r["gflops_per_image_fwd"]:.3f}',
      f'{100 * mfu:.1f}%' if mfu else '-',
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def use_cpu_devices(count: int) -> None:
  """Asks for `count` fake CPU devices; must run before JAX creates its backends."""
  if count:
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={count}'
    )


def main(argv):
  del argv
  use_cpu_devices(_CPU_DEVICES.value)
  if _EXPERT_MATMULS.value:
    rows, table = time_expert_matmuls([int(e) for e in _EXPERTS.value])
    print(table)
    with open(_JSON.value, 'w') as f:
      json.dump({'expert_matmuls': rows, 'table': table}, f, indent=2)
    print(f'\nWritten to {_JSON.value}', file=sys.stderr)
    return

  cases = [(0, 1, 1.0, 'indices')]
  for e, k, cf, d in itertools.product(
    _EXPERTS.value, _NUM_SELECTED.value, _CAPACITY.value, _DISPATCH.value
  ):
    cases.append((int(e), int(k), float(cf), d))
  rows = []
  for mode in _MODES.value:
    rows += run_cases(cases, mode, _INTERLEAVE.value)
  table = format_table(rows)
  print(table)
  env = {
    'jax': jax.__version__,
    'backend': jax.default_backend(),
    'device_kind': jax.devices()[0].device_kind,
    'device_count': jax.device_count(),
    'python': platform.python_version(),
    'cpu_count': os.cpu_count(),
    'model': dict(
      width=_WIDTH.value,
      depth=_DEPTH.value,
      num_heads=_HEADS.value,
      mlp_dim=_MLP.value,
      patch_size=_PATCH.value,
      image_size=_IMAGE.value,
      batch_size=_BATCH.value,
      dtype=_DTYPE.value,
      moe_layers=_LAYERS.value,
    ),
  }
  with open(_JSON.value, 'w') as f:
    json.dump({'environment': env, 'rows': rows, 'table': table}, f, indent=2)
  print(f'\nWritten to {_JSON.value}', file=sys.stderr)


if __name__ == '__main__':
  host_malloc.maybe_reexec()  # CPU hosts: restart with glibc tunables, see host_malloc.
  app.run(main)
