#!/usr/bin/env python3
r"""Regenerates the README's digits figures from the README's own commands.

  python launch/readme_figures.py [--workdir=/tmp/readme_figures] [--sweep]

Runs, in a fresh WORKDIR (an existing one is refused, so nothing is
overwritten):
  1. the quick start: `vmoe_jax.main --config=configs/digits_switch.py`;
  2. `vmoe_jax.evaluate` on it at C = 0.25, 0.5, 1.0, 2.0 (vanilla and BPR)
     with few-shot (the "Evaluation and routing analysis" table and the
     few-shot figures);
  3. with --sweep, the README's `launch/sweep.py ... num_experts=4,8,16`.
Then prints the README's tables in its format and writes them, with the
machine they were measured on, to WORKDIR/readme_figures.md.

Every figure depends on the machine, not only on the versions: XLA's CPU
code depends on the instruction set (AVX-512, AMX, ...) and splits its sums
by the number of threads, so other machines round differently and, after
1,500 steps, reach other accuracies (the quick start's test accuracy has
been 96.94% and 98.61% on two 2-core machines with the same versions). The
output therefore names the machine (CPU model, cores), the JAX version and
the date; times and images/s depend on the machine and its load as well.
The README's figures were measured on 2 cores with one device (no
XLA_FLAGS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from vmoe_jax.evaluation import ledger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPACITIES = '0.25,0.5,1.0,2.0'


def run(cmd: list[str], log_path: str) -> None:
  """Runs cmd from the repository root, its output into log_path; exits on failure."""
  print('+', ' '.join(cmd), flush=True)
  start = time.perf_counter()
  with open(log_path, 'w') as log:
    code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
  if code:
    with open(log_path) as log:
      tail = log.read().strip().splitlines()[-1:]
    sys.exit(f'error: {" ".join(cmd[:4])} ... failed (exit status {code}): {tail}; see {log_path}.')
  print(f'  {time.perf_counter() - start:.0f}s', flush=True)


def eval_table(report: dict) -> str:
  rows = {}
  for s in report['settings']:
    rows.setdefault(s['capacity_factor'], {})[bool(s['batch_priority'])] = s
  lines = [
    '| C | vanilla | BPR | kept share | expert MFLOPs/image |',
    '| ---: | ---: | ---: | ---: | ---: |',
  ]
  for c in sorted(rows):
    vanilla, bpr = rows[c].get(False), rows[c].get(True)
    if vanilla is None or bpr is None:
      continue
    lines.append(
      f'| {c:g} | {100 * vanilla["accuracy"]:.2f}% | {100 * bpr["accuracy"]:.2f}% | '
      f'{100 * vanilla["kept_share"]:.0f}% | {bpr["expert_flops_per_image"] / 1e6:.2f} |'
    )
  return '\n'.join(lines)


def fewshot_line(report: dict) -> str:
  shots = (report.get('fewshot') or {}).get('shots', {})
  return ', '.join(f'{100 * r["accuracy"]:.1f}% ({k}-shot)' for k, r in shots.items())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--workdir', default='/tmp/readme_figures')
  parser.add_argument('--sweep', action='store_true', help='also the README sweep (3 runs)')
  args = parser.parse_args(argv)
  root = os.path.abspath(args.workdir)
  if os.path.exists(root):
    parser.error(f'--workdir={root} exists; pass a new directory (nothing is overwritten).')
  os.makedirs(root)
  run_dir = os.path.join(root, 'digits_switch')
  python = sys.executable
  start = time.perf_counter()
  run(
    [python, '-m', 'vmoe_jax.main', '--config=configs/digits_switch.py', f'--workdir={run_dir}'],
    os.path.join(root, 'quickstart.log'),
  )
  quickstart_seconds = time.perf_counter() - start
  eval_dir = os.path.join(root, 'eval')
  run(
    [
      python,
      '-m',
      'vmoe_jax.evaluate',
      f'--workdir={run_dir}',
      f'--capacity_factors={CAPACITIES}',
      f'--output_dir={eval_dir}',
    ],
    os.path.join(root, 'evaluate.log'),
  )
  with open(os.path.join(eval_dir, 'eval.json')) as f:
    report = json.load(f)
  with open(os.path.join(run_dir, 'results.json')) as f:
    results = json.load(f)
  import jax  # pylint: disable=g-import-not-at-top  (after the runs: their output first)

  text = [
    f'Measured {time.strftime("%Y-%m-%d")} on {platform.node()}: {ledger.cpu_model()}, '
    f'{os.cpu_count()} CPUs, JAX {jax.__version__}, Python {platform.python_version()}, '
    f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}.',
    '',
    f'Quick start: test accuracy {100 * results["test/accuracy"]:.2f}% at step {results["step"]}, '
    f'{quickstart_seconds:.0f}s for the command ({results["train_seconds"]:.0f}s training).',
    '',
    eval_table(report),
    '',
    f'Few-shot: {fewshot_line(report)}.',
  ]
  if args.sweep:
    sweep_root = os.path.join(root, 'sweep')
    run(
      [
        python,
        'launch/sweep.py',
        '--config=configs/digits_switch.py',
        '--sweep',
        'model.moe.num_experts=4,8,16',
        f'--workdir={sweep_root}',
      ],
      os.path.join(root, 'sweep.log'),
    )
    with open(os.path.join(sweep_root, 'results.md')) as f:
      text += ['', 'Sweep:', '', f.read().strip()]
  out = '\n'.join(text) + '\n'
  with open(os.path.join(root, 'readme_figures.md'), 'w') as f:
    f.write(out)
  print(out, end='')
  print(f'written to {root}/readme_figures.md')
  return 0


if __name__ == '__main__':
  sys.exit(main())
