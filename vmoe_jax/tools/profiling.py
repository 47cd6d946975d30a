"""Profiling of one MoE layer on a device mesh: a trace, phase timings, all_to_all bytes.

The library of `python -m vmoe_jax.profile_moe`. `profile_moe(settings, case,
workdir, ...)` builds a benchmark case (`vmoe_jax.tools.benchmark`), then

1. runs `profile_steps` training steps under `jax.profiler.trace` into
   `workdir/profile` (TensorBoard / Perfetto); the MoE phases carry the
   named scopes moe_route, moe_dispatch, moe_all_to_all, moe_experts,
   moe_combine (`vmoe_jax.moe.layer`);
2. times each phase of one MoE layer's forward pass alone on the same mesh,
   each its own jitted shard_map of the layer's own functions, its inputs
   made by the phase before (`time_phases`);
3. reads the all_to_all ops of the compiled train step and compares their
   bytes with the buffers the layer exchanges (`all_to_all_bytes`),
and writes `workdir/phases.json`.

Axis letters: B_l images per device, T tokens per image, G_l routing groups
per device, S tokens per group, E experts, n expert shards, C buffer slots
per expert and group, D width, A = G_l * S * K assignments per device.

Capacity-buffer routers (topk, image_topk, expert_choice, soft) exchange
(E, G_l * C, D) per device and exchange. The dropless router has no buffers:
its dispatch, exchange, grouped matmul and combine all run inside
`dropless.forward` (one phase, 'experts (dropless)'), which sends each of
the n shards a fixed-size buffer of A rows: (n, A, D), plus (n, A) int32
expert ids.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time

import einops
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vmoe_jax.errors import UserError
from vmoe_jax.moe import dropless
from vmoe_jax.moe import layer
from vmoe_jax.moe import plans
from vmoe_jax.moe import routers
from vmoe_jax.runtime import sharding
from vmoe_jax.tools import benchmark

BATCH_SPEC = P(sharding.BATCH_AXES)
EXPERT_SPEC = P(sharding.EXPERT_AXIS)
BUFFER_SPEC = P(None, sharding.BATCH_AXES)  # (E, G_l*C, D) per device.
RECEIVED_SPEC = P(sharding.EXPERT_AXIS, sharding.DATA_AXIS)  # (E/n, n*G_l*C, D) per device.


_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'f64': 8}
BUFFER_PHASES = (
  'route',
  'dispatch',
  'all_to_all (to experts)',
  'expert MLPs',
  'all_to_all (back)',
  'combine',
)
DROPLESS_PHASES = ('route', 'experts (dropless)')
DROPLESS_NOTE = (
  'dropless: no capacity buffers; sorting by expert, the fixed-size all_to_all, the grouped '
  'matmul and the weighted sum all run inside dropless.forward, timed as one phase.'
)


def parse_mesh(spec: str, num_devices: int) -> int:
  """'data=2,expert=4' -> expert axis size, checked against the device count ('': -1)."""
  if not spec:
    return -1
  sizes = {}
  for part in spec.split(','):
    name, _, value = part.partition('=')
    if name not in ('data', 'expert') or not value.isdigit():
      raise UserError(f"--mesh={spec!r} not understood; use e.g. 'data=2,expert=4'.")
    sizes[name] = int(value)
  expert = sizes.get('expert', 1)
  data = sizes.get('data', num_devices // expert)
  if data * expert != num_devices:
    raise UserError(
      f'--mesh={spec!r} has {data * expert} devices but {num_devices} are present; use '
      f'--cpu_devices={data * expert} on the CPU, or a mesh of {num_devices} devices.'
    )
  return expert


def all_to_all_bytes(hlo_text: str) -> list[int]:
  """Bytes of the result of every all-to-all in a compiled HLO module (per device).

  XLA may split one all_to_all into a tuple of per-peer pieces; their sizes add up.
  """
  sizes = []
  for line in hlo_text.splitlines():
    if ' all-to-all(' not in line or '=' not in line:
      continue
    result_type = line.split('=', 1)[1].split(' all-to-all(', 1)[0]
    total = 0
    for dtype, dims in re.findall(r'([a-z]+[0-9]*)\[([\d,]*)\]', result_type):
      count = math.prod(int(d) for d in dims.split(',')) if dims else 1
      total += count * _DTYPE_BYTES.get(dtype, 4)
    sizes.append(total)
  return sizes


def median_seconds(fn, args, repeats: int) -> float:
  """Median seconds of `repeats` waited-for calls of fn(*args), after one untimed call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _layer_geometry(built: benchmark.BuiltCase) -> dict:
  """Sizes of one MoE layer's work on every device of the case's mesh."""
  model, mesh = built.model, built.mesh
  height, width = built.image_shape[:2]
  tokens = (height // model.patch_size) * (width // model.patch_size)
  tokens += model.classifier == 'token'
  batch = built.batch['image'].shape[0]
  local = batch // mesh.size
  images_per_group = model.moe.images_per_group(local)
  return dict(
    batch=batch,
    tokens=tokens,
    local_images=local,
    groups=local // images_per_group,
    group_tokens=images_per_group * tokens,
    shards=mesh.shape[sharding.EXPERT_AXIS],
  )


def phase_functions(built: benchmark.BuiltCase, block: int) -> tuple[list, dict]:
  """[(phase, jitted shard_map fn, args)] of MoE block `block`, and its buffer geometry.

  Every phase's inputs are the outputs of the phase before (computed here once).
  """
  model, mesh = built.model, built.mesh
  spec, geo = model.moe, _layer_geometry(built)
  router = routers.get(spec.router)
  params = built.state.params[f'block_{block:02d}']['moe']
  router_params = {k: v for k, v in params.items() if k not in layer.EXPERT_PARAMS}
  expert_params = {k: params[k] for k in layer.EXPERT_PARAMS}
  x = jax.device_put(
    jax.random.normal(jax.random.key(0), (geo['batch'], geo['tokens'], model.width), model.dtype),
    NamedSharding(mesh, BATCH_SPEC),
  )

  def mapped(fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

  def groups(x):
    return layer.group_tokens(x, None, spec.group_size)[0]

  def route(x, rp):
    logits = layer.router_logits(groups(x), rp, router)
    return router.route(routers.RouterInputs(logits, None, None, geo['tokens'], True), spec).plan

  route_fn = mapped(route, (BATCH_SPEC, P()), BATCH_SPEC)
  plan = route_fn(x, router_params)
  phases = [('route', route_fn, (x, router_params))]
  expert_specs = {k: EXPERT_SPEC for k in expert_params}
  if isinstance(plan, dropless.SortedPlan):

    def run_dropless(x, plan, ep):
      y = dropless.forward(
        groups(x), plan, ep, block_size=spec.block_size, dtype=x.dtype, dropout_key=None,
        rate=0.0, num_shards=geo['shards'],
      )  # fmt: skip
      return y.reshape(x.shape)

    fn = mapped(run_dropless, (BATCH_SPEC, BATCH_SPEC, expert_specs), BATCH_SPEC)
    phases.append(('experts (dropless)', fn, (x, plan, expert_params)))
    return phases, _dropless_info(geo, spec, model)
  if spec.dispatch == 'einsum' and isinstance(plan, plans.SlotPlan):
    plan = jax.jit(plans.to_dense, static_argnums=1)(plan, geo['group_tokens'])

  def dispatch(x, plan):
    buffers = plans.dispatch(groups(x), plan)  # (G_l, E, C, D)
    return einops.rearrange(buffers, 'g e c d -> e (g c) d')

  def combine(out, plan):
    out = einops.rearrange(out, 'e (g c) d -> g e c d', g=geo['groups'])
    y = plans.combine(out, plan, geo['group_tokens'])
    return y.reshape(geo['local_images'], geo['tokens'], -1)

  shards = geo['shards']
  dispatch_fn = mapped(dispatch, (BATCH_SPEC, BATCH_SPEC), BUFFER_SPEC)
  to_experts = mapped(lambda b: layer.exchange(b, shards, True), BUFFER_SPEC, RECEIVED_SPEC)
  experts_fn = mapped(
    lambda b, ep: layer.expert_mlp(b, ep, None, 0.0, model.dtype),
    (RECEIVED_SPEC, expert_specs),
    RECEIVED_SPEC,
  )
  back = mapped(lambda b: layer.exchange(b, shards, False), RECEIVED_SPEC, BUFFER_SPEC)
  combine_fn = mapped(combine, (BUFFER_SPEC, BATCH_SPEC), BATCH_SPEC)
  buffers = dispatch_fn(x, plan)
  received = to_experts(buffers)
  out = experts_fn(received, expert_params)
  phases += [
    ('dispatch', dispatch_fn, (x, plan)),
    ('all_to_all (to experts)', to_experts, (buffers,)),
    ('expert MLPs', experts_fn, (received, expert_params)),
    ('all_to_all (back)', back, (out,)),
    ('combine', combine_fn, (back(out), plan)),
  ]
  return phases, _buffer_info(geo, spec, router, buffers)


def _buffer_info(geo: dict, spec, router: routers.Router, buffers) -> dict:
  local = buffers.addressable_shards[0].data
  return {
    'capacity': router.capacity(spec, geo['group_tokens'], geo['tokens'], True),
    'groups_per_device': geo['groups'],
    'buffer_shape_per_device': list(local.shape),
    'expected_all_to_all_bytes': int(local.size * local.dtype.itemsize),
  }


def _dropless_info(geo: dict, spec, model) -> dict:
  """The (n, A, D) rows every device sends per exchange (none with one shard)."""
  assignments = geo['groups'] * geo['group_tokens'] * spec.num_selected
  shape = [geo['shards'], assignments, model.width]
  itemsize = jax.numpy.dtype(model.dtype).itemsize
  return {
    'capacity': None,
    'groups_per_device': geo['groups'],
    'buffer_shape_per_device': shape,
    'expected_all_to_all_bytes': math.prod(shape) * itemsize,
    'note': DROPLESS_NOTE,
  }


def time_phases(built: benchmark.BuiltCase, block: int, repeats: int) -> tuple[list[dict], dict]:
  """Rows {'phase', 'ms', 'share'} of MoE block `block`'s forward, and its buffer info."""
  phases, info = phase_functions(built, block)
  seconds = [(name, median_seconds(fn, args, repeats)) for name, fn, args in phases]
  total = sum(t for _, t in seconds)
  rows = [{'phase': name, 'ms': 1000 * t, 'share': t / total} for name, t in seconds]
  return rows, {**info, 'mesh': dict(built.mesh.shape)}


def trace_steps(built: benchmark.BuiltCase, trace_dir: str, num_steps: int):
  """Compiles the train step, warms it up, and traces `num_steps` steps; the compiled step."""
  state, batch = built.state, built.batch
  compiled = built.train_step.lower(state, batch).compile()
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(num_steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
  built.state = state
  return compiled


def profile_moe(
  settings: benchmark.BenchSettings,
  case: benchmark.Case,
  workdir: str,
  profile_steps: int = 3,
  repeats: int = 10,
  block: int = -1,
) -> dict:
  """The trace, the phases of MoE block `block` (-1: the first) and the all_to_all bytes.

  Writes `workdir/profile` (the trace) and `workdir/phases.json` (the report).
  """
  if not case.num_experts:
    raise UserError('--experts must be > 0 to profile an MoE layer; use e.g. --experts=8.')
  benchmark.check_cases(settings, [case])
  built = benchmark.build_case(settings, case)
  layers = built.model.moe_layers
  block = layers[0] if block < 0 else block
  if block not in layers:
    raise UserError(f'--layer={block} is not an MoE block; use one of {list(layers)}.')
  os.makedirs(workdir, exist_ok=True)
  trace_dir = os.path.join(workdir, 'profile')
  compiled = trace_steps(built, trace_dir, profile_steps)
  rows, info = time_phases(built, block, repeats)
  report = {
    'case': case.label,
    'router': case.router,
    'block': block,
    'num_moe_layers': len(layers),
    'phases': rows,
    **info,
    'all_to_all_bytes': all_to_all_bytes(compiled.as_text()),
    'trace_dir': trace_dir,
  }
  with open(os.path.join(workdir, 'phases.json'), 'w') as f:
    json.dump(report, f, indent=2)
  return report


def format_report(report: dict) -> str:
  """The phase table and the all_to_all check, as printed by `vmoe_jax.profile_moe`."""
  capacity = report['capacity']
  lines = [
    f'MoE block {report["block"]} forward, {report["case"]}, mesh {report["mesh"]}, '
    + (f'capacity C={capacity}, ' if capacity is not None else 'no capacity (dropless), ')
    + f'{report["groups_per_device"]} group(s) per device',
    '| phase | ms | share |',
    '| --- | ---: | ---: |',
  ]
  lines += [f'| {r["phase"]} | {r["ms"]:.2f} | {100 * r["share"]:.1f}% |' for r in report['phases']]
  if report.get('note'):
    lines.append(report['note'])
  expected, shape = report['expected_all_to_all_bytes'], report['buffer_shape_per_device']
  formula = 'n x A x D' if capacity is None else 'E x (G_l x C) x D'
  lines.append(
    f'\nall_to_all per device and exchange: {formula} x bytes = '
    f'{" x ".join(map(str, shape))} x {expected // math.prod(shape)} = {expected:,} B'
  )
  exchanged, num_moe = report['all_to_all_bytes'], report['num_moe_layers']
  if exchanged:
    expected_ops = f'{4 * num_moe} expected: 2 forward + 2 backward per layer'
    if capacity is None:
      expected_ops = 'rows, expert ids and the way back, forward and backward'
    lines.append(
      f'compiled train step: {len(exchanged)} all-to-all ops for {num_moe} MoE layers '
      f'({expected_ops}); sizes (B): {sorted(set(exchanged))}'
    )
  else:
    lines.append('compiled train step: no all-to-all (one expert shard: experts are local).')
  return '\n'.join(lines)
