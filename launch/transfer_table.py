#!/usr/bin/env python3
r"""The transfer flows on real data, one command: fine-tuning, upcycling, distillation.

  python launch/transfer_table.py --upstream=/tmp/fashion_table/main/dense_vit/seed=0 \
      [--teacher=/tmp/fashion_table/main/switch_vit__top_1/seed=0] [--workdir=/tmp/transfer] \
      [--flows=finetune,upcycle,distill]

--upstream is a trained configs/fashion_vit.py run, --teacher a trained
configs/fashion_switch.py run (only for 'distill'). Runs, each in
WORKDIR/<name> (a finished run is not trained again):

  finetune: configs/digits_finetune.py from the upstream and from scratch, on
            all digits train images and at 10 images per class (:10shot);
  upcycle:  configs/fashion_upcycle.py (the upstream as a Switch-ViT) and
            :dense (the upstream continued as it is), same steps;
  distill:  configs/fashion_distill.py with the teacher, against the
            upstream itself (the same dense recipe and steps, no teacher).

Writes WORKDIR/transfer.md and transfer.json: per run, test accuracy at step
0 (the transferred parameters before any update), at every evaluation and at
the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vmoe_jax.tools import run_logs

# The repository: the configs' paths are relative to it.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOWS = ('finetune', 'upcycle', 'distill')


def runs_of(flow: str, upstream: str, teacher: str | None) -> list[tuple[str, list[str]]]:
  """(name, main arguments) of the runs of one flow."""
  init = [f'--config.init_from={upstream}']
  if flow == 'finetune':
    return [
      ('digits, fine-tuned', ['--config=configs/digits_finetune.py', *init]),
      ('digits, from scratch', ['--config=configs/digits_finetune.py']),
      ('digits 10/class, fine-tuned', ['--config=configs/digits_finetune.py:10shot', *init]),
      ('digits 10/class, from scratch', ['--config=configs/digits_finetune.py:10shot']),
    ]
  if flow == 'upcycle':
    return [
      ('upcycled to Switch-ViT', ['--config=configs/fashion_upcycle.py', *init]),
      ('dense, continued', ['--config=configs/fashion_upcycle.py:dense', *init]),
    ]
  if not teacher:
    raise SystemExit('error: --flows=distill needs --teacher=WORKDIR of a trained Switch-ViT.')
  return [
    (
      'dense student of the Switch-ViT',
      ['--config=configs/fashion_distill.py', f'--config.distill.teacher={teacher}'],
    )
  ]


def accuracies(workdir: str) -> list[tuple[int, float]]:
  """(step, test accuracy) of every evaluation in the run's metrics.jsonl, once per step."""
  seen = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'test/accuracy' in record:
        seen[int(record['step'])] = record['test/accuracy']
  return sorted(seen.items())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--upstream', required=True, help='workdir of a trained fashion_vit run')
  parser.add_argument('--teacher', default=None, help='workdir of a trained fashion_switch run')
  parser.add_argument('--workdir', default='/tmp/transfer')
  parser.add_argument('--flows', default='finetune,upcycle')
  args, fixed = parser.parse_known_args(argv)
  flows = [f for f in args.flows.split(',') if f]
  bad = [f for f in flows + [a for a in fixed if not a.startswith('--config.')] if f not in FLOWS]
  if bad:
    parser.error(f'unknown flows or arguments {bad}; flows are {",".join(FLOWS)}.')
  if not os.path.exists(os.path.join(args.upstream, 'results.json')):
    parser.error(f'--upstream={args.upstream} holds no finished run (results.json).')
  root = os.path.abspath(args.workdir)
  rows = []
  for flow in flows:
    for name, main_args in runs_of(flow, os.path.abspath(args.upstream), args.teacher):
      workdir = os.path.join(root, flow, ''.join(c if c.isalnum() else '_' for c in name))
      os.makedirs(workdir, exist_ok=True)
      if not os.path.exists(os.path.join(workdir, 'results.json')):
        cmd = [sys.executable, '-m', 'vmoe_jax.main', *main_args, f'--workdir={workdir}', *fixed]
        code = run_logs.run_logged(cmd, os.path.join(workdir, 'train.log'), f'{name}:', REPO)
        if code:
          print(f'{name}: FAILED: {run_logs.failure_line(os.path.join(workdir, "train.log"))}')
          continue
      with open(os.path.join(workdir, 'results.json')) as f:
        results = json.load(f)
      evals = accuracies(workdir)
      rows.append(
        dict(
          flow=flow,
          name=name,
          workdir=workdir,
          accuracy=results['test/accuracy'],
          evaluations=evals,
          train_seconds=results['train_seconds'],
        )
      )
  lines = [
    '| flow | run | test accuracy | at step 0 | evaluations (step: accuracy) |',
    '| --- | --- | ---: | ---: | --- |',
  ]
  for r in rows:
    first = dict(r['evaluations']).get(0)
    evals = ', '.join(f'{s}: {100 * a:.2f}' for s, a in r['evaluations'])
    lines.append(
      f'| {r["flow"]} | {r["name"]} | {100 * r["accuracy"]:.2f}% | '
      f'{"-" if first is None else f"{100 * first:.2f}%"} | {evals} |'
    )
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(root, 'transfer.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(root, 'transfer.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  print(text, end='')
  return 0


if __name__ == '__main__':
  sys.exit(main())
