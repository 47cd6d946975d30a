r"""Router-dispatch profiling on a device mesh.

  python -m vmoe_jax.profile --mesh=data=2,expert=4 --cpu_devices=8 --workdir=/tmp/prof

1. Runs `--profile_steps` training steps of the benchmark model (flags as in
   `vmoe_jax.bench`; `--experts` takes one value here) under
   `jax.profiler.trace`, writing a TensorBoard / Perfetto trace into
   `workdir/profile` (open with `tensorboard --logdir` or ui.perfetto.dev).
   The MoE phases carry named scopes: moe_route, moe_dispatch,
   moe_all_to_all, moe_experts, moe_combine.
2. Times each phase of one MoE layer's forward pass in isolation, on the same
   mesh (each phase its own jitted shard_map, inputs made by the phase
   before), and prints the breakdown.
3. Reads the all_to_all operations of the compiled train step and compares
   their bytes with the capacity buffers: per device and exchange,
   E x (G_l x C) x D elements, G_l groups per device, C = capacity.

The same trace can be taken during training: --config.profile.start_step=N.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import time

import jax
from absl import app
from absl import flags
from jax.sharding import PartitionSpec as P

from vmoe_jax import bench
from vmoe_jax import host_malloc
from vmoe_jax.errors import UserError
from vmoe_jax.moe import layer
from vmoe_jax.moe import routing as routing_lib

_MESH = flags.DEFINE_string('mesh', '', "Mesh shape, e.g. 'data=2,expert=4' (default: auto).")
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the trace and phases.json go.')
_PROFILE_STEPS = flags.DEFINE_integer('profile_steps', 3, 'Training steps inside the trace.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed repeats of every phase.')
_LAYER = flags.DEFINE_integer('layer', -1, 'Which MoE block to time (-1: the first).')
FLAGS = flags.FLAGS

_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'f64': 8}


def parse_mesh(spec: str, num_devices: int) -> int:
  """'data=2,expert=4' -> expert axis size, checked against the device count."""
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


def _median_seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_phases(case: dict, block: int) -> tuple[list[dict], dict]:
  """Forward phases of MoE block `block`, each timed alone on the case's mesh."""
  mesh, model = case['mesh'], case['model']
  cfg = layer.RoutingConfig(
    num_experts=model.moe['num_experts'],
    num_selected=model.moe['num_selected'],
    capacity_factor=model.moe['capacity_factor'],
    capacity_multiple=model.moe.get('capacity_multiple', 1),
    batch_priority=model.moe['batch_priority'],
    renormalize=model.moe['renormalize'],
    group_size=model.moe['group_size'],
    dispatch=model.moe['dispatch'],
    noise_std=0.0,
    dropout_rate=0.0,
    dtype=model.dtype,
  )
  params = case['state'].params[f'block_{block:02d}']['moe']
  shards = mesh.shape['expert']
  batch = case['batch']['image'].shape[0]
  tokens = (case['image_shape'][0] // model.patch_size) ** 2 + (model.classifier == 'token')
  x = jax.device_put(
    jax.random.normal(jax.random.key(0), (batch, tokens, model.width), model.dtype),
    jax.sharding.NamedSharding(mesh, P(layer.BATCH_AXES)),
  )
  spec, expert_spec = P(layer.BATCH_AXES), P(layer.EXPERT_AXIS)
  # Expert buffers (E, G_l*C, D) are laid out per device along their second axis.
  buffer_spec = P(None, layer.BATCH_AXES)
  received_spec = P(layer.EXPERT_AXIS, layer.DATA_AXIS)

  def mapped(fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

  def route(x, router):
    xg = layer.group_tokens(x, cfg.group_size)
    _, _, _, routing, _ = layer.route_groups(xg, router, None, cfg)
    return routing

  xg_local_tokens = x.shape[1] * (cfg.group_size or batch // mesh.size)
  capacity = routing_lib.compute_capacity(
    xg_local_tokens,
    cfg.num_experts,
    cfg.num_selected,
    cfg.capacity_factor,
    cfg.capacity_multiple,
  )
  routing_spec = routing_lib.Routing(spec, spec, spec)
  phases = [
    ('route', mapped(route, (spec, P()), routing_spec), lambda: (x, params['router'])),
  ]
  route_fn = phases[0][1]
  routing = route_fn(x, params['router'])

  def dispatch(x, routing):
    return layer.dispatch_to_buffers(layer.group_tokens(x, cfg.group_size), routing, cfg, capacity)

  dispatch_fn = mapped(dispatch, (spec, routing_spec), buffer_spec)
  buffers = dispatch_fn(x, routing)
  to_experts = mapped(lambda b: layer.exchange(b, shards, True), buffer_spec, received_spec)
  received = to_experts(buffers)
  expert_params = {k: params[k] for k in ('wi', 'bi', 'wo', 'bo')}
  param_specs = {k: expert_spec for k in expert_params}
  experts_fn = mapped(
    lambda b, p: layer.expert_mlp(b, p, None, 0.0, cfg.dtype),
    (received_spec, param_specs),
    received_spec,
  )
  out = experts_fn(received, expert_params)
  back = mapped(lambda b: layer.exchange(b, shards, False), received_spec, buffer_spec)
  returned = back(out)
  groups_local = batch // mesh.size // (cfg.group_size or batch // mesh.size)
  combine_fn = mapped(
    lambda o, r: layer.combine_from_buffers(o, r, cfg, groups_local),
    (buffer_spec, routing_spec),
    spec,
  )
  timings = [
    ('route', _median_seconds(route_fn, x, params['router'])),
    ('dispatch', _median_seconds(dispatch_fn, x, routing)),
    ('all_to_all (to experts)', _median_seconds(to_experts, buffers)),
    ('expert MLPs', _median_seconds(experts_fn, received, expert_params)),
    ('all_to_all (back)', _median_seconds(back, out)),
    ('combine', _median_seconds(combine_fn, returned, routing)),
  ]
  total = sum(t for _, t in timings)
  rows = [{'phase': name, 'ms': 1000 * t, 'share': t / total} for name, t in timings]
  local_buffer = buffers.addressable_shards[0].data
  info = {
    'capacity': capacity,
    'groups_per_device': groups_local,
    'buffer_shape_per_device': list(local_buffer.shape),
    'buffer_bytes_per_device': int(local_buffer.size * local_buffer.dtype.itemsize),
    'mesh': dict(mesh.shape),
  }
  return rows, info


def main(argv):
  del argv
  bench.use_cpu_devices(FLAGS.cpu_devices)
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required.')
  try:
    expert_axis = parse_mesh(_MESH.value, jax.device_count())
    num_experts = int(FLAGS.experts[0])
    case = bench.build_case(
      num_experts,
      int(FLAGS.num_selected[0]),
      float(FLAGS.capacity_factors[0]),
      FLAGS.dispatch[0],
      expert_axis=expert_axis,
    )
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if not num_experts:
    raise app.UsageError('--experts must be > 0 to profile MoE dispatch.')
  os.makedirs(_WORKDIR.value, exist_ok=True)
  trace_dir = os.path.join(_WORKDIR.value, 'profile')
  step, state, batch = case['train_step'], case['state'], case['batch']
  compiled = step.lower(state, batch).compile()
  for _ in range(2):  # Warm up.
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(_PROFILE_STEPS.value):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
  print(f'Trace of {_PROFILE_STEPS.value} steps written to {trace_dir}', file=sys.stderr)
  case['state'] = state

  model = case['model']
  block = model.moe_layers[0] if _LAYER.value < 0 else _LAYER.value
  rows, info = time_phases(case, block)
  exchanged = all_to_all_bytes(compiled.as_text())
  num_moe = len(model.moe_layers)
  print(
    f'\nMoE block {block} forward, mesh {info["mesh"]}, E={num_experts}, '
    f'capacity C={info["capacity"]}, {info["groups_per_device"]} group(s) per device'
  )
  print('| phase | ms | share |\n| --- | ---: | ---: |')
  for r in rows:
    print(f'| {r["phase"]} | {r["ms"]:.2f} | {100 * r["share"]:.1f}% |')
  expected = info['buffer_bytes_per_device']
  shape = info['buffer_shape_per_device']
  print(
    f'\nall_to_all per device and exchange: E x (G_l x C) x D x bytes = '
    f'{shape[0]} x {shape[1]} x {shape[2]} x {expected // math.prod(shape)} = {expected:,} B'
  )
  if exchanged:
    print(
      f'compiled train step: {len(exchanged)} all-to-all ops for {num_moe} MoE layers '
      f'(forward + backward: {4 * num_moe} expected); sizes (B): '
      f'{sorted(set(exchanged))}'
    )
  else:
    print('compiled train step: no all-to-all (one expert shard: experts are local).')
  with open(os.path.join(_WORKDIR.value, 'phases.json'), 'w') as f:
    json.dump(
      {
        'phases': rows,
        **info,
        'all_to_all_bytes': exchanged,
        'expected_all_to_all_bytes': expected,
        'trace_dir': trace_dir,
      },
      f,
      indent=2,
    )


if __name__ == '__main__':
  host_malloc.maybe_reexec()  # CPU hosts: restart with glibc tunables, see host_malloc.
  app.run(main)
