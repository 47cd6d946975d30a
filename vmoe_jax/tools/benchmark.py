"""Benchmarks of jitted train and inference steps: a dense ViT against MoE ViTs per router.

The library of `python -m vmoe_jax.bench`. A frozen `BenchSettings` holds the
model and the timing; a `Case` is one model (dense, or a router with E
experts, K, a capacity factor and a dispatch implementation):

  settings = BenchSettings(width=192, depth=6, steps=5)
  cases = bench_cases(['topk', 'soft'], [8, 32], [1], [1.25], ['indices'])
  rows = run_benchmark(settings, cases, modes=['train'])
  print(format_table(rows))

Every case is built as training builds its model: `schema.defaults` ->
`factory.moe_spec` -> `factory.create_model` -> `steps.create_train_state`.
Routing groups hold `settings.group_size` images; by default all images of a
device (0), except for Soft MoE, whose slot count must not follow the device
batch (the schema refuses group_size 0 without slots_per_expert): one image per
group, as Puigcerver et al. 2023 route each sequence on its own.

Timing: every case is compiled and run `warmup` times; then `steps` rounds
time one step of every case, in turn (each step waited for), so that changes
in the machine's load fall on all cases alike; rows hold medians. FLOPs are
analytic (`vmoe_jax.models.flops.forward_flops`: the router's active FLOPs at the
training capacity, forward pass; a train step counts 3x).

The expert MLPs' matmuls alone: `vmoe_jax.tools.expert_matmuls`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from vmoe_jax import steps as train_steps
from vmoe_jax.errors import UserError
from vmoe_jax.models import factory
from vmoe_jax.models import flops
from vmoe_jax.optim import optimizers
from vmoe_jax.optim import schedules
from vmoe_jax.runtime import sharding
from vmoe_jax.schema import defaults
from vmoe_jax.schema import validation

log = logging.getLogger(__name__)

MODES = ('train', 'inference')
NUM_CLASSES = 10
SOFT_GROUP_SIZE = 1  # Images per Soft MoE routing group unless settings.group_size is set.

# The case fields each router reads: K (experts per token, or per image), the
# capacity factor (Soft MoE: its slots per expert) and the dispatch of slot
# plans ('indices' or the one-hot 'einsum'). Other fields are left out of the
# case's label and row, and cases that differ only there are run once.
ROUTER_FIELDS = {
  'topk': ('num_selected', 'capacity_factor', 'dispatch'),
  'image_topk': ('num_selected', 'capacity_factor', 'dispatch'),
  'expert_choice': ('capacity_factor', 'dispatch'),
  'soft': ('capacity_factor',),
  'dropless': ('num_selected',),
}

# Dense peak FLOP/s of one device by device kind and compute dtype (vendor
# figures, no sparsity). `peak_flops` takes the first kind that is a substring
# of `jax.Device.device_kind`, so the specific kinds come before 'H100'.
PEAK_FLOPS = {
  ('H100 PCIe', 'bfloat16'): 756e12,
  ('H100 PCIe', 'float32'): 378e12,
  ('H100 NVL', 'bfloat16'): 835e12,
  ('H100 NVL', 'float32'): 418e12,
  ('H200 NVL', 'bfloat16'): 835e12,
  ('H200 NVL', 'float32'): 418e12,
  ('H100', 'bfloat16'): 989e12,  # SXM: 'NVIDIA H100 80GB HBM3'.
  ('H100', 'float32'): 494e12,  # TF32 tensor cores, XLA's default for float32 dots.
  ('H200', 'bfloat16'): 989e12,
  ('H200', 'float32'): 494e12,
  ('A100', 'bfloat16'): 312e12,
  ('A100', 'float32'): 156e12,
  ('TPU v4', 'bfloat16'): 275e12,
  ('TPU v5 lite', 'bfloat16'): 197e12,  # v5e.
  ('TPU v5p', 'bfloat16'): 459e12,
  ('TPU v5', 'bfloat16'): 459e12,  # v5p reports 'TPU v5'.
  ('TPU v6 lite', 'bfloat16'): 918e12,  # v6e.
}


@dataclasses.dataclass(frozen=True)
class BenchSettings:
  """The benchmark model (shared by every case) and the timing.

  group_size: images per routing group; None: 0 (all images of a device),
  or `SOFT_GROUP_SIZE` for Soft MoE. expert_axis: size of the expert mesh
  axis (-1: the largest that fits).
  """

  width: int = 192
  depth: int = 6
  num_heads: int = 3
  mlp_dim: int = 768
  patch_size: int = 4
  image_size: int = 32
  batch_size: int = 128
  moe_layers: str = 'every_2'
  group_size: int | None = None
  dtype: str = 'float32'
  optimizer: str = 'adafactor'
  expert_axis: int = -1
  steps: int = 5
  warmup: int = 2
  interleave: bool = True

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  def group_size_for(self, router: str) -> int:
    if self.group_size is not None:
      return self.group_size
    return SOFT_GROUP_SIZE if router == 'soft' else 0


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked model: a dense ViT when num_experts == 0."""

  num_experts: int = 0
  router: str = 'topk'
  num_selected: int = 1
  capacity_factor: float = 1.25
  dispatch: str = 'indices'

  def reads(self, field: str) -> bool:
    return self.num_experts > 0 and field in ROUTER_FIELDS[self.router]

  def normalized(self) -> Case:
    """The same case with the fields its router does not read at their defaults."""
    if not self.num_experts:
      return Case()
    default = Case(self.num_experts, self.router)
    return dataclasses.replace(default, **{f: getattr(self, f) for f in ROUTER_FIELDS[self.router]})

  @property
  def label(self) -> str:
    """'dense', or the router and the fields it reads: 'topk E=8 K=1 cf=1.25 indices'."""
    if not self.num_experts:
      return 'dense'
    parts = [self.router, f'E={self.num_experts}']
    if self.reads('num_selected'):
      parts.append(f'K={self.num_selected}')
    if self.reads('capacity_factor'):
      parts.append(f'cf={self.capacity_factor:g}')
    if self.reads('dispatch'):
      parts.append(self.dispatch)
    return ' '.join(parts)


def bench_cases(
  router_names, expert_counts, num_selected, capacity_factors, dispatch
) -> list[Case]:
  """The dense case, then every (router, E, K, cf, dispatch), each distinct case once."""
  cases = [Case()]
  for router in router_names:
    for e in expert_counts:
      for k in num_selected:
        for cf in capacity_factors:
          for d in dispatch:
            case = Case(int(e), router, int(k), float(cf), d).normalized()
            if case not in cases:
              cases.append(case)
  return cases


def peak_flops(device_kind: str, dtype: str) -> float | None:
  for (kind, kind_dtype), value in PEAK_FLOPS.items():
    if kind in device_kind and kind_dtype == dtype:
      return value
  return None


def tokens_per_image(settings: BenchSettings) -> int:
  classifier = defaults.get_config().model.classifier
  return (settings.image_size // settings.patch_size) ** 2 + (classifier == 'token')


def case_config(settings: BenchSettings, case: Case):
  """The training config of a case (the schema of `vmoe_jax.schema.defaults`)."""
  config = defaults.get_config()
  config.model.update(
    dict(
      width=settings.width,
      depth=settings.depth,
      num_heads=settings.num_heads,
      mlp_dim=settings.mlp_dim,
      patch_size=settings.patch_size,
      dtype=settings.dtype,
      dropout=0.0,
    )
  )
  config.model.moe.update(
    dict(
      num_experts=case.num_experts,
      router=case.router,
      num_selected=case.num_selected,
      capacity_factor=case.capacity_factor,
      eval_capacity_factor=case.capacity_factor,  # Inference runs at the same capacity.
      dispatch=case.dispatch,
      layers=settings.moe_layers,
      group_size=settings.group_size_for(case.router),
    )
  )
  # Random images of the benchmark's size (no dataset is read).
  config.input.dataset = 'random'
  config.input.image_size = settings.image_size
  config.input.batch_size = settings.batch_size
  config.input.eval_batch_size = settings.batch_size
  config.optimizer.name = settings.optimizer
  config.mesh.expert = settings.expert_axis
  return config


def check_cases(settings: BenchSettings, cases: list[Case]) -> None:
  """Raises the one-line `UserError` of the first case that cannot be built, before any runs."""
  for case in cases:
    if case.router == 'soft' and settings.group_size_for('soft') == 0:
      raise UserError(
        '--group_size=0 (all images of a device) does not fix the Soft MoE slot count; '
        'use --group_size=1 or more, or leave it unset (1 image per group for Soft MoE).'
      )
    validation.validate(case_config(settings, case))
    sharding.create_mesh(settings.expert_axis, case.num_experts)


@dataclasses.dataclass
class BuiltCase:
  """A case ready to run: its model on `mesh`, initial state, a random batch, the step.

  Built with `abstract=True`, `state` and `batch` are their shapes
  (`jax.ShapeDtypeStruct`s with shardings, enough to lower and compile) until
  the caller sets them, e.g. to `init_fn(0)` and `random_batch(settings, mesh)`.
  """

  case: Case
  config: Any
  mesh: jax.sharding.Mesh
  model: Any  # vmoe_jax.models.vit.ViT
  state: train_steps.TrainState
  batch: dict[str, jax.Array]
  train_step: Callable  # Jitted (state, batch) -> (state, metrics); donates the state.
  image_shape: tuple[int, int, int]
  init_fn: Callable | None = None  # Jitted seed (static) -> the initial state on `mesh`.


def random_batch(settings: BenchSettings, mesh) -> dict[str, jax.Array]:
  """A random batch of `settings.batch_size` images and labels, split over `mesh`."""
  rng = np.random.default_rng(0)
  return sharding.global_batch(
    {
      'image': rng.normal(size=(settings.batch_size, *settings.image_shape)).astype(np.float32),
      'label': rng.integers(0, NUM_CLASSES, size=settings.batch_size).astype(np.int32),
    },
    mesh,
  )


def abstract_batch(settings: BenchSettings, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes, dtypes and shardings of `random_batch`."""
  split = sharding.batch_sharding(mesh)
  return {
    'image': jax.ShapeDtypeStruct(
      (settings.batch_size, *settings.image_shape), np.float32, sharding=split
    ),
    'label': jax.ShapeDtypeStruct((settings.batch_size,), np.int32, sharding=split),
  }


def build_case(
  settings: BenchSettings, case: Case, *, config=None, devices=None, abstract: bool = False
) -> BuiltCase:
  """Model, optimizer, initial state and a random batch of one case.

  config: the case's config (default `case_config(settings, case)`); devices:
  those of the mesh (default all); abstract: shapes for the state and the
  batch (see `BuiltCase`), nothing placed on a device.
  """
  config = case_config(settings, case) if config is None else config
  spec = factory.moe_spec(config)
  mesh = sharding.create_mesh(config.mesh.expert, case.num_experts, devices)
  model = factory.create_model(config, NUM_CLASSES, mesh, moe=spec)
  schedule = schedules.create_learning_rate_schedule(peak_value=1e-3, total_steps=10**6)
  tx, init_fn, abstract_state, shardings = train_steps.create_train_state(
    model,
    lambda params, mask: optimizers.create_optimizer(config, schedule, params, mask),
    mesh,
    settings.image_shape,
  )
  step = jax.jit(
    functools.partial(train_steps.train_step, model=model, tx=tx, schedule=schedule),
    donate_argnums=0,
    out_shardings=(shardings, None),
  )
  if abstract:
    state, batch = abstract_state, abstract_batch(settings, mesh)
  else:
    state, batch = init_fn(0), random_batch(settings, mesh)
  return BuiltCase(case, config, mesh, model, state, batch, step, settings.image_shape, init_fn)


def case_flops(settings: BenchSettings, model, num_devices: int) -> dict[str, float]:
  """Forward FLOPs per image of a case's model; groups of 0 images: a device's batch."""
  return flops.forward_flops(
    model, settings.image_shape, images_per_group=max(1, settings.batch_size // num_devices)
  )


@dataclasses.dataclass
class PreparedCase:
  """A built and compiled case: `run_once()` runs one step (train or inference)."""

  case: Case
  mode: str
  mesh: jax.sharding.Mesh
  model: Any
  compiled: Any
  compile_seconds: float
  run_once: Callable[[], Any]


def lower_case(built: BuiltCase, mode: str):
  """The lowered step of a built case in `mode` ('train' or 'inference')."""
  if mode == 'train':
    return built.train_step.lower(built.state, built.batch)
  model = built.model
  forward = jax.jit(lambda params, images: model.apply({'params': params}, images, train=False)[0])
  return forward.lower(built.state.params, built.batch['image'])


def prepared_case(built: BuiltCase, mode: str, compiled, compile_seconds: float) -> PreparedCase:
  """A case with its compiled step: `run_once` runs it on the case's state and batch of the moment.

  Train steps advance `built.state`.
  """
  if mode == 'train':

    def run_once():
      built.state, metrics = compiled(built.state, built.batch)
      return metrics['train/loss']

  else:

    def run_once():
      return compiled(built.state.params, built.batch['image'])

  return PreparedCase(
    built.case, mode, built.mesh, built.model, compiled, compile_seconds, run_once
  )


def prepare_case(built: BuiltCase, mode: str) -> PreparedCase:
  """Compiles a built case in `mode` ('train' or 'inference'); train steps advance its state."""
  start = time.perf_counter()
  compiled = lower_case(built, mode).compile()
  return prepared_case(built, mode, compiled, time.perf_counter() - start)


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


def _xla_bytes(compiled) -> int | None:
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  return (
    memory.temp_size_in_bytes
    + memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
  )


def xla_peak_bytes(compiled) -> int | None:
  """XLA's peak memory of a compiled program (its buffer assignment), where reported."""
  memory = compiled.memory_analysis()
  peak = getattr(memory, 'peak_memory_in_bytes', None) if memory is not None else None
  return int(peak) if peak else None


def case_row(settings: BenchSettings, prepared: PreparedCase, times: list[float], alone: bool):
  """The row of a prepared case timed `times` (seconds per step).

  `alone`: the case ran by itself, so the device's peak memory is its own.
  MFU: the step's analytic FLOPs per second over the peak of the mesh's devices.
  """
  case, mesh = prepared.case, prepared.mesh
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  peak_in_use = stats.get('peak_bytes_in_use') if alone and stats else None
  fwd = case_flops(settings, prepared.model, mesh.size)['total']
  step_flops = (3 if prepared.mode == 'train' else 1) * fwd * settings.batch_size
  median = statistics.median(times)
  peak = peak_flops(device.device_kind, settings.dtype)
  spec = prepared.model.moe
  return {
    'case': case.label,
    'mode': prepared.mode,
    'router': case.router if case.num_experts else None,
    'family': spec.family if spec is not None else 'dense ViT',
    'num_experts': case.num_experts,
    'num_selected': case.num_selected if case.reads('num_selected') else None,
    'capacity_factor': case.capacity_factor if case.reads('capacity_factor') else None,
    'dispatch': case.dispatch if case.reads('dispatch') else None,
    'group_size': spec.group_size if spec is not None else None,
    'step_seconds_median': median,
    'step_seconds_all': times,
    'images_per_sec': settings.batch_size / median,
    'compile_seconds': prepared.compile_seconds,
    'xla_memory_bytes': _xla_bytes(prepared.compiled),
    'xla_peak_bytes': xla_peak_bytes(prepared.compiled),
    'device_peak_bytes_in_use': peak_in_use,
    'gflops_per_image_fwd': fwd / 1e9,
    'mfu': step_flops / median / (peak * mesh.size) if peak else None,
    'mesh': dict(mesh.shape),
  }


def run_benchmark(settings: BenchSettings, cases: list[Case], modes) -> list[dict]:
  """Rows of every case in every mode.

  Interleaved: all cases are built, then per mode compiled and timed in
  rounds; rows are mode-major. Else one case at a time (built, then each
  mode compiled and timed), rows case-major. A case is built once for all
  modes (initialising its state costs more than compiling a step).
  """
  groups = [cases] if settings.interleave else [[case] for case in cases]
  rows = []
  for group in groups:
    built = [build_case(settings, case) for case in group]
    for mode in modes:
      prepared = []
      for b in built:
        prepared.append(prepare_case(b, mode))
        log.info('compiled %s %s in %.1fs', b.case.label, mode, prepared[-1].compile_seconds)
      run_fns = [p.run_once for p in prepared]
      times = time_cases(run_fns, settings.steps, settings.warmup, settings.interleave)
      for p, t in zip(prepared, times):
        rows.append(case_row(settings, p, t, alone=not settings.interleave))
        median = rows[-1]['step_seconds_median']
        log.info('%s %s: %.1f ms/step', p.case.label, mode, 1000 * median)
      del prepared
    del built
    jax.clear_caches()
  return rows


def format_table(rows: list[dict]) -> str:
  """Markdown table; 'vs dense' is the ratio to the dense row of the same mode."""
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
      f'{r["gflops_per_image_fwd"]:.4g}',
      f'{100 * mfu:.1f}%' if mfu else '-',
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def environment(settings: BenchSettings) -> dict:
  """What the numbers depend on: versions, devices, the model and the timing."""
  return {
    'jax': jax.__version__,
    'backend': jax.default_backend(),
    'device_kind': jax.devices()[0].device_kind,
    'device_count': jax.device_count(),
    'python': platform.python_version(),
    'cpu_count': os.cpu_count(),
    'settings': dataclasses.asdict(settings),
  }


def use_cpu_devices(count: int) -> None:
  """Asks for `count` fake CPU devices; must run before JAX creates its backends."""
  if count:
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={count}'
    )
