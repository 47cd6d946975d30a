r"""Benchmarks of jitted train and inference steps: dense ViT vs MoE ViTs, per router.

The default case is the CPU case the README reports: width 192, depth 6,
3 heads, MLP 768, patch 4 on 32x32 images, batch 128, MoE in every other
block, top-1 ('topk', K=1), capacity 1.25, float32:

  python -m vmoe_jax.bench --experts=8,32,64 [--json=bench_cpu.json]

One interleaved run, a row per (router, E) and the dense row:

  python -m vmoe_jax.bench --router=topk,expert_choice,soft,image_topk,dropless --experts=8,32,64

Wider sweeps (E, K, capacity factors, dispatch implementations, modes), and
the expert MLPs' six matmuls alone on the capacity buffers:

  python -m vmoe_jax.bench --experts=8,32,64,128 --num_selected=1,2 \
      --capacity_factors=1.0,1.25 --dispatch=indices,einsum --modes=train,inference --nointerleave
  python -m vmoe_jax.bench --expert_matmuls --experts=8,32,64 --steps=15

Prints a markdown table; writes nothing unless --json=FILE is given. Soft MoE
routes groups of one image unless --group_size is given (see
`vmoe_jax.tools.benchmark`, where everything but the flags lives).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from vmoe_jax.errors import UserError
from vmoe_jax.moe import routers
from vmoe_jax.moe.spec import DISPATCHES
from vmoe_jax.runtime import host_malloc
from vmoe_jax.tools import benchmark
from vmoe_jax.tools import expert_matmuls

FLAGS = flags.FLAGS


def _all(parse, ok):
  """A validator: every item of a list flag parses and passes `ok`."""

  def check(values):
    try:
      return bool(values) and all(ok(parse(v)) for v in values)
    except ValueError:
      return False

  return check


def define_model_flags() -> None:
  """The cases and the model (shared with `vmoe_jax.profile_moe`)."""
  d = benchmark.BenchSettings()
  flags.DEFINE_list('router', ['topk'], f'Routers, from {sorted(routers.ROUTERS)}.')
  flags.DEFINE_list('experts', ['8', '32', '64'], 'Expert counts (a dense ViT is added).')
  flags.DEFINE_list('num_selected', ['1'], 'K values (top-k, image-level and dropless routers).')
  flags.DEFINE_list('capacity_factors', ['1.25'], 'Capacity factors (Soft MoE: its slots).')
  flags.DEFINE_list('dispatch', ['indices'], "'indices' and/or 'einsum'.")
  flags.DEFINE_integer('batch_size', d.batch_size, 'Global batch size.')
  flags.DEFINE_integer('image_size', d.image_size, 'Square image side.')
  flags.DEFINE_integer('width', d.width, 'Model width.')
  flags.DEFINE_integer('depth', d.depth, 'Blocks.')
  flags.DEFINE_integer('num_heads', d.num_heads, 'Attention heads.')
  flags.DEFINE_integer('mlp_dim', d.mlp_dim, 'MLP (and expert) hidden width.')
  flags.DEFINE_integer('patch_size', d.patch_size, 'Patch size.')
  flags.DEFINE_string('moe_layers', d.moe_layers, 'Which blocks are MoE.')
  flags.DEFINE_integer(
    'group_size', None, 'Images per routing group (0: per device); default 0, Soft MoE 1.'
  )
  flags.DEFINE_string('dtype', d.dtype, 'Compute dtype.')
  flags.DEFINE_string('optimizer', d.optimizer, 'Optimizer of the train step.')
  flags.DEFINE_integer('expert_axis', d.expert_axis, 'Size of the expert mesh axis.')
  flags.DEFINE_integer('cpu_devices', 0, 'Fake CPU devices (0: leave as is).')
  names = sorted(routers.ROUTERS)
  checks = [
    ('router', str, lambda r: r in routers.ROUTERS, f'must be routers from {names}'),
    ('experts', int, lambda e: e > 0, 'must be positive integers, e.g. --experts=8,32,64'),
    ('num_selected', int, lambda k: k > 0, 'must be positive integers, e.g. --num_selected=1,2'),
    ('capacity_factors', float, lambda c: c > 0, 'must be positive numbers, e.g. 1.0,1.25'),
    ('dispatch', str, lambda v: v in DISPATCHES, "must be 'indices' and/or 'einsum'"),
  ]
  for name, parse, ok, message in checks:
    flags.register_validator(name, _all(parse, ok), message)


def define_flags() -> None:
  define_model_flags()
  d = benchmark.BenchSettings()
  flags.DEFINE_list('modes', ['train'], "'train' and/or 'inference'.")
  flags.DEFINE_integer('steps', d.steps, 'Timed steps per case.')
  flags.DEFINE_integer('warmup', d.warmup, 'Untimed steps after compilation.')
  flags.DEFINE_bool(
    'interleave', True, 'Time all cases of a mode in rounds; --nointerleave: one case at a time.'
  )
  flags.DEFINE_string('json', None, 'Also write rows and environment to this file.')
  flags.DEFINE_bool('expert_matmuls', False, "Time one MoE layer's six expert matmuls instead.")
  ok = _all(str, lambda m: m in benchmark.MODES)
  flags.register_validator('modes', ok, "must be 'train' and/or 'inference'")


def settings_from_flags() -> benchmark.BenchSettings:
  names = [f.name for f in dataclasses.fields(benchmark.BenchSettings)]
  return benchmark.BenchSettings(**{n: FLAGS[n].value for n in names if n in FLAGS})


def cases_from_flags() -> list[benchmark.Case]:
  return benchmark.bench_cases(
    FLAGS.router, FLAGS.experts, FLAGS.num_selected, FLAGS.capacity_factors, FLAGS.dispatch
  )


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('vmoe_jax').setLevel(logging.INFO)  # Progress lines on stderr.
  benchmark.use_cpu_devices(FLAGS.cpu_devices)
  settings, cases = settings_from_flags(), cases_from_flags()
  try:
    benchmark.check_cases(settings, cases)
    if FLAGS.expert_matmuls:
      rows, table = expert_matmuls.time_expert_matmuls(settings, cases[1:])
      out = {'expert_matmuls': rows, 'table': table}
    else:
      rows = benchmark.run_benchmark(settings, cases, FLAGS.modes)
      table = benchmark.format_table(rows)
      out = {'environment': benchmark.environment(settings), 'rows': rows, 'table': table}
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(table)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(out, f, indent=2)
    print(f'\nWritten to {FLAGS.json}', file=sys.stderr)


if __name__ == '__main__':
  host_malloc.maybe_reexec()  # CPU hosts: restart with glibc tunables, see host_malloc.
  define_flags()
  app.run(main)
