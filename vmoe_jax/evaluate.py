r"""Evaluation of a trained checkpoint: capacity sweep, routing maps, few-shot.

  python -m vmoe_jax.evaluate --workdir=/tmp/digits_switch \
      [--capacity_factors=0.25,0.5,0.75,1.0,1.25,1.5,2.0] [--step=N] \
      [--output_dir=/tmp/digits_switch/eval] [--example_capacity_factor=0.5] [--nofewshot]

The workdir of a training run (any router) holds everything needed
(config.json, dataset.json, checkpoints/). For every eval capacity factor of
the sweep -- with vanilla routing and with Batch Prioritized Routing for the
top-k routers, without BPR for Expert Choice, not at all for Soft MoE and
dropless, which drop nothing (one row at the trained setting) -- the test set
is run through the model. Into `output_dir` (default `workdir/eval`):
eval.json, eval.md (the table, what each router's rows mean),
accuracy_vs_compute.png (routers with a sweep), expert_load.png,
class_expert.png and examples.png. Prints the table; problems the user can
fix are one line `error: ...`, exit status 2. The library:
`vmoe_jax.evaluation.capacity_sweep` and `vmoe_jax.evaluation.figures`.
"""

from __future__ import annotations

import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from vmoe_jax.errors import UserError
from vmoe_jax.evaluation import capacity_sweep
from vmoe_jax.evaluation import reports
from vmoe_jax.runtime import host_malloc

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'The --workdir of a training run.')
  flags.DEFINE_list(
    'capacity_factors',
    [f'{c:g}' for c in capacity_sweep.DEFAULT_CAPACITY_FACTORS],
    'Eval capacity factors of the sweep (top-k routers: each with and without BPR).',
  )
  flags.DEFINE_integer('step', None, 'Checkpoint to evaluate; default the latest.')
  flags.DEFINE_string('output_dir', None, 'Where the files go; default WORKDIR/eval.')
  flags.DEFINE_float(
    'example_capacity_factor', 0.5, 'Low capacity factor of the example routing maps.'
  )
  flags.DEFINE_integer('num_examples', 6, 'Test images in examples.png (spread over the test set).')
  flags.DEFINE_bool('fewshot', True, 'Run few-shot linear evaluation on pre-logits.')
  flags.DEFINE_float('timing_seconds', 0.5, 'Minimum seconds of timed forward passes per setting.')


def _capacity_factors(values: list[str]) -> list[float]:
  try:
    return [float(c) for c in values]
  except ValueError:
    raise UserError(
      f'--capacity_factors={",".join(values)} is not a list of numbers; '
      'pass e.g. --capacity_factors=0.25,0.5,1,2.'
    ) from None


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('vmoe_jax').setLevel(logging.INFO)
  try:
    if not FLAGS.workdir:
      raise UserError('--workdir=DIR (a training run) is needed.')
    report = capacity_sweep.run(
      FLAGS.workdir,
      _capacity_factors(FLAGS.capacity_factors),
      step=FLAGS.step,
      output_dir=FLAGS.output_dir,
      example_capacity_factor=FLAGS.example_capacity_factor,
      num_examples=FLAGS.num_examples,
      fewshot=FLAGS.fewshot,
      timing_seconds=FLAGS.timing_seconds,
    )
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(reports.header(report))
  print(reports.markdown(report['settings']), end='')
  for k, r in report.get('fewshot', {}).get('shots', {}).items():
    print(
      f'few-shot {k:>2}-shot: {100 * r["accuracy"]:.2f}% +- {100 * r["accuracy_std"]:.2f} '
      f'(L2 chosen on held-out train images; best over the L2 sweep '
      f'{100 * r["best_over_sweep"]:.2f}%)'
    )
  print(f'wrote eval.json, eval.md and the PNGs to {report["output_dir"]}')


if __name__ == '__main__':
  host_malloc.maybe_reexec()  # CPU hosts: restart with glibc tunables, see host_malloc.
  define_flags()
  app.run(main)
