#!/usr/bin/env python3
r"""Where sparse experts pay on Fashion-MNIST: queues of runs, a results ledger, tables.

  python launch/moe_study.py run --queue=size --jobs=2     # train what the ledger lacks
  python launch/moe_study.py run --queue=size --print      # the commands, and which are done
  python launch/moe_study.py tables                # every table and figure, from the ledger

A queue is a list of runs (config file and argument, overrides, seed, kind).
`run` trains every run whose record is not in the ledger (`--results`,
default results/fashion_mnist/), `--jobs` at a time (each pinned to its own
CPU core when there are several), in WORKDIR/<run id>, and writes the
record of each run as it finishes (`vmoe_jax.evaluation.ledger`): stop it at any
time, start it again tomorrow, and it goes on with what is missing. A run
that depends on another (upcycling and dense continuation start from a dense
run trained for half the steps; distillation from a trained teacher) trains
that one first when its workdir is missing.

`tables` reads the ledger alone and writes docs/experiments/moe_study.md
(every table, with the commands) and the figures under docs/figures/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

from vmoe_jax.evaluation import ledger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'results', 'fashion_mnist')
FULL_STEPS = 5600  # The recipe: 6 epochs of 64 images (configs/fashion_vit.py).
WIDTHS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: `python -m vmoe_jax.main --config=CONFIG --config.k=v ...`."""

  config: str  # 'configs/fashion_vit.py:w32,val'
  overrides: tuple[tuple[str, object], ...] = ()
  seed: int = 0
  kind: str = 'scratch'
  source: Run | None = None  # The run whose workdir init_from / distill.teacher names.

  @property
  def id(self) -> str:
    return ledger.run_id(self.config, dict(self.overrides), self.seed, self.kind)

  def command(self, workdir: str, root: str) -> list[str]:
    args = [
      sys.executable,
      '-m',
      'vmoe_jax.main',
      f'--config={self.config}',
      f'--workdir={workdir}',
      f'--config.seed={self.seed}',
    ]
    args += [f'--config.{k}={_cli(v)}' for k, v in self.overrides]
    if self.source is not None:
      key = 'distill.teacher' if self.kind == 'distilled' else 'init_from'
      args.append(f'--config.{key}={os.path.join(root, self.source.id)}')
    return args


def _cli(value) -> str:
  return str(value)


def with_overrides(run: Run, **overrides) -> Run:
  merged = dict(run.overrides)
  merged.update({k.replace('__', '.'): v for k, v in overrides.items()})
  return dataclasses.replace(run, overrides=tuple(sorted(merged.items())))


# --------------------------------------------------------------------------- the runs

# Recipes: the same for dense and MoE runs. 'r6' is the tuned recipe (6 epochs,
# no augmentation); 'aug' adds flips, 2-pixel random crops and random erasing;
# the length is in epochs of the 54,000 or 60,000 training images.
RECIPES = {
  'r6': {},
  'aug12': {
    'input.flip': True,
    'input.crop_padding': 2,
    'input.random_erase': 0.25,
    'train.num_steps': 2 * FULL_STEPS,
  },
  'aug24': {
    'input.flip': True,
    'input.crop_padding': 2,
    'input.random_erase': 0.25,
    'train.num_steps': 4 * FULL_STEPS,
  },
  'r24': {'train.num_steps': 4 * FULL_STEPS},
}


def moe_variants(width: int) -> dict[str, tuple[str, dict]]:
  """MoE models at the dense model's active FLOPs: name -> (config file, overrides)."""
  hidden = 4 * width
  return {
    'dense': ('fashion_vit.py', {}),
    # Switch: top-1, experts as wide as the dense MLP.
    'top1-e8-02': ('fashion_switch.py', {'model.moe.num_experts': 8}),
    'top1-e32-all': (
      'fashion_switch.py',
      {'model.moe.num_experts': 32, 'model.moe.layers': 'all'},
    ),
    # Top-2 with experts half as wide (V-MoE's K at the dense FLOPs).
    'top2h-e32-all': (
      'fashion_switch.py',
      {
        'model.moe.num_experts': 32,
        'model.moe.layers': 'all',
        'model.moe.num_selected': 2,
        'model.moe.mlp_dim': hidden // 2,
      },
    ),
    'top2h-e32-all-renorm': (
      'fashion_switch.py',
      {
        'model.moe.num_experts': 32,
        'model.moe.layers': 'all',
        'model.moe.num_selected': 2,
        'model.moe.mlp_dim': hidden // 2,
        'model.moe.renormalize': True,
      },
    ),
    # Soft MoE, one image per group: 32 experts of one slot each for 49 tokens
    # (its dispatch and combine cost about a third of the experts' work at
    # width 32, so fewer slots than tokens keep the dense FLOPs).
    'soft-e32-all': (
      'fashion_switch.py',
      {
        'model.moe.router': 'soft',
        'model.moe.num_experts': 32,
        'model.moe.slots_per_expert': 1,
        'model.moe.layers': 'all',
      },
    ),
  }


def make_run(width: int, variant: str, recipe: str, seed: int, split: str) -> Run:
  config_file, overrides = moe_variants(width)[variant]
  arg = f'w{width}' + (',val' if split == 'val' else '')
  merged = {**overrides, **RECIPES[recipe]}
  return Run(f'configs/{config_file}:{arg}', tuple(sorted(merged.items())), seed)


def queue_screen() -> list[Run]:
  """:val, seed 0, width 32: which MoE and which recipe open a gap (the search)."""
  runs = []
  for recipe in ('aug12', 'r6'):
    for variant in moe_variants(32):
      runs.append(make_run(32, variant, recipe, 0, 'val'))
  return runs


QUEUES = {'screen': queue_screen}


# --------------------------------------------------------------------------- running


def _pin(core: int | None):
  if core is None or not hasattr(os, 'sched_setaffinity'):
    return None
  return lambda: os.sched_setaffinity(0, {core})


def train_one(run: Run, root: str, results: str, core: int | None, label: str) -> bool:
  """Trains `run` (and its source first), writes its record; whether it succeeded."""
  if run.source is not None and not os.path.exists(
    os.path.join(root, run.source.id, 'results.json')
  ):
    if not train_one(run.source, root, results, core, f'{label} (source)'):
      return False
  workdir = os.path.join(root, run.id)
  os.makedirs(workdir, exist_ok=True)
  cmd = run.command(workdir, root)
  log_path = os.path.join(workdir, 'train.log')
  start = time.perf_counter()
  print(f'{label} start: {shlex.join(cmd[2:])}', flush=True)
  with open(log_path, 'a') as log:
    code = subprocess.call(
      cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=_pin(core)
    )
  seconds = time.perf_counter() - start
  if code:
    print(f'{label} FAILED (exit {code}): see {log_path}', flush=True)
    return False
  if ledger.has_record(results, run.id):
    return True  # A source that is also in the ledger.
  record = ledger.make_record(
    workdir,
    config=run.config,
    overrides=dict(run.overrides),
    seed=run.seed,
    kind=run.kind,
    wall_seconds=seconds,
    command=shlex.join(['python', *cmd[1:4], *cmd[5:]]),  # Without the local workdir.
  )
  record['command'] = record['command'].replace(
    f'--config.init_from={root}/', '--config.init_from='
  )
  ledger.write_record(results, record)
  print(
    f'{label} done in {seconds / 60:.1f} min: {run.config} '
    f'test {100 * record["test_accuracy"]:.2f}%'
    f' train {100 * (record["train_accuracy"] or 0):.2f}%',
    flush=True,
  )
  return True


def run_queue(runs: list[Run], root: str, results: str, jobs: int) -> int:
  todo = [r for r in runs if not ledger.has_record(results, r.id)]
  print(f'{len(runs) - len(todo)} of {len(runs)} runs in the ledger; {len(todo)} to train.')
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
  lock = threading.Lock()
  pending = list(todo)
  failures = []
  started = time.perf_counter()
  done = [0]

  def worker(slot: int):
    core = cores[slot % len(cores)] if jobs > 1 and cores else None
    while True:
      with lock:
        if not pending:
          return
        run = pending.pop(0)
        index = len(todo) - len(pending)
      ok = train_one(run, root, results, core, f'[{index}/{len(todo)}]')
      with lock:
        done[0] += 1
        if not ok:
          failures.append(run.id)
        elapsed = time.perf_counter() - started
        left = len(todo) - done[0]
        eta = elapsed / done[0] * left / max(1, min(jobs, left)) * min(jobs, done[0])
        print(f'-- {done[0]}/{len(todo)} finished, ETA {eta / 3600:.1f} h', flush=True)

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(jobs)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if failures:
    print(f'{len(failures)} runs failed: {failures}')
  return 1 if failures else 0


# --------------------------------------------------------------------------- tables


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
  values = [v for v in values if v is not None]
  if not values:
    return float('nan'), float('nan'), 0
  std = statistics.stdev(values) if len(values) > 1 else float('nan')
  return statistics.fmean(values), std, len(values)


def group_key(record: dict) -> tuple:
  """What a row of a table is: everything but the seed."""
  return (record['config'], json.dumps(record['overrides'], sort_keys=True), record['kind'])


def screen_table(records: list[dict]) -> str:
  rows = [r for r in records if r['split'] == 'val']
  lines = [
    '| config | overrides | seed | val | train[:10k] | params | GFLOPs | s/step |',
    '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for r in sorted(rows, key=lambda r: (r['width'], r['config'], str(r['overrides']))):
    overrides = ' '.join(f'{k}={v}' for k, v in sorted(r['overrides'].items()))
    lines.append(
      f'| {r["config"]} | {overrides} | {r["seed"]} | {100 * r["test_accuracy"]:.2f} | '
      f'{100 * (r["train_accuracy"] or float("nan")):.2f} | {r["params"]:,} | '
      f'{r["gflops_per_image"]:.4f} | {r["step_seconds"] or float("nan"):.3f} |'
    )
  return '\n'.join(lines) + '\n'


def write_tables(results: str, out: str) -> str:
  records = ledger.load_records(results)
  text = '## Held-out slice (`:val`) runs\n\n' + screen_table(records)
  os.makedirs(out, exist_ok=True)
  return text


def main(argv) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('action', choices=('run', 'tables'))
  parser.add_argument('--queue', default='screen', choices=sorted(QUEUES))
  parser.add_argument('--results', default=RESULTS, help='the ledger folder')
  parser.add_argument('--workdir', default='/tmp/moe_study', help='root of the run workdirs')
  parser.add_argument('--jobs', type=int, default=1, help='runs at a time (one core each)')
  parser.add_argument('--print', action='store_true', help='print the commands only')
  parser.add_argument('--out', default=os.path.join(REPO, 'docs'), help='tables and figures')
  args = parser.parse_args(argv)
  if args.action == 'tables':
    print(write_tables(args.results, args.out), end='')
    return 0
  runs = QUEUES[args.queue]()
  if args.print:
    for run in runs:
      done = 'done' if ledger.has_record(args.results, run.id) else 'todo'
      cmd = run.command(os.path.join(args.workdir, run.id), args.workdir)
      print(f'{done}  {shlex.join(["python", *cmd[1:]])}')
    return 0
  if args.jobs < 1:
    parser.error(f'--jobs={args.jobs} must be >= 1.')
  return run_queue(runs, os.path.abspath(args.workdir), os.path.abspath(args.results), args.jobs)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
