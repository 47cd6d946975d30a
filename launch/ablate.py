#!/usr/bin/env python3
r"""Which blocks' MLPs a trained model relies on: test accuracy with some removed.

  python launch/ablate.py --workdir=/tmp/fashion_table/main/dense_vit/seed=0
  python launch/ablate.py --workdir=RUN --blocks='none;0;1,3' [--step=N] [--output_dir=DIR]
  python launch/ablate.py --workdir=RUN --blocks=none --split='train[:10000]'   # train accuracy

For each set of blocks (default: none, every block alone, the MoE blocks and
the dense blocks together), the MLP of those blocks (dense or MoE: its second
linear layer, every expert's) is set to zero and the run's test split is
evaluated with the trained weights otherwise untouched. Prints the table and
writes ablation.md and ablation.json into OUTPUT_DIR (default WORKDIR/eval).
`--split` evaluates another split of the run's dataset (files
ablation_<split>.md/json): on training images, the generalisation gap.
Trains nothing: `vmoe_jax.evaluation.ablation`.
"""

from __future__ import annotations

import argparse
import sys

from vmoe_jax.errors import UserError
from vmoe_jax.evaluation import ablation


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='The --workdir of a training run.')
  parser.add_argument(
    '--blocks', default=None, help="Sets of blocks separated by ';', e.g. 'none;0;1,3'."
  )
  parser.add_argument('--step', type=int, default=None, help='Checkpoint; default the latest.')
  parser.add_argument('--output_dir', default=None, help='Default WORKDIR/eval.')
  parser.add_argument(
    '--split',
    default=None,
    help="A split to evaluate, e.g. 'train[:10000]'; default the test split.",
  )
  args = parser.parse_args(argv)
  try:
    sets = ablation.parse_block_sets(args.blocks) if args.blocks is not None else None
    report = ablation.run(
      args.workdir, sets, step=args.step, output_dir=args.output_dir, split=args.split
    )
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  base = next((r['accuracy'] for r in report['rows'] if not r['blocks']), None)
  print(ablation.markdown(report, base), end='')
  print(f'wrote {" and ".join(report["files"])} to {report["output_dir"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
