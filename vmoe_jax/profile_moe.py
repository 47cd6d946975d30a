r"""Profiling of MoE dispatch on a device mesh: a trace, phase timings, all_to_all bytes.

  python -m vmoe_jax.profile_moe --cpu_devices=8 --mesh=data=2,expert=4 --experts=32 \
      --workdir=/tmp/prof [--router=expert_choice]

The model flags are those of `vmoe_jax.bench`, each with one value here
(--router, --experts, --num_selected, --capacity_factors, --dispatch). Writes
a TensorBoard / Perfetto trace of `--profile_steps` train steps into
WORKDIR/profile and the phase table into WORKDIR/phases.json, and prints the
table and the all_to_all check (see `vmoe_jax.tools.profiling`). The same
trace can be taken during training: --config.profile.start_step=N.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app
from absl import flags

from vmoe_jax import bench
from vmoe_jax.errors import UserError
from vmoe_jax.runtime import host_malloc
from vmoe_jax.tools import benchmark
from vmoe_jax.tools import profiling

FLAGS = flags.FLAGS
ONE_VALUE = ('router', 'experts', 'num_selected', 'capacity_factors', 'dispatch')


def define_flags() -> None:
  bench.define_model_flags()
  flags.DEFINE_string('mesh', '', "Mesh shape, e.g. 'data=2,expert=4' (default: --expert_axis).")
  flags.DEFINE_string('workdir', None, 'Where the trace and phases.json go.')
  flags.DEFINE_integer('profile_steps', 3, 'Training steps inside the trace.')
  flags.DEFINE_integer('repeats', 10, 'Timed repeats of every phase.')
  flags.DEFINE_integer('layer', -1, 'Which MoE block to time (-1: the first).')


def main(argv) -> None:
  del argv
  benchmark.use_cpu_devices(FLAGS.cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top  (after the fake CPU devices are asked for)

  try:
    if not FLAGS.workdir:
      raise UserError('--workdir=DIR is needed (the trace and phases.json go there).')
    for name in ONE_VALUE:
      if len(FLAGS[name].value) != 1:
        raise UserError(
          f'--{name}={",".join(FLAGS[name].value)}: the profiler takes one value, '
          f'e.g. --{name}={FLAGS[name].value[0]}.'
        )
    settings = bench.settings_from_flags()
    if FLAGS.mesh:
      expert_axis = profiling.parse_mesh(FLAGS.mesh, jax.device_count())
      settings = dataclasses.replace(settings, expert_axis=expert_axis)
    case = bench.cases_from_flags()[1]
    report = profiling.profile_moe(
      settings, case, FLAGS.workdir, FLAGS.profile_steps, FLAGS.repeats, FLAGS.layer
    )
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'Trace of {FLAGS.profile_steps} steps written to {report["trace_dir"]}', file=sys.stderr)
  print(profiling.format_report(report))


if __name__ == '__main__':
  host_malloc.maybe_reexec()  # CPU hosts: restart with glibc tunables, see host_malloc.
  define_flags()
  app.run(main)
