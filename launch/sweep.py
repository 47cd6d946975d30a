#!/usr/bin/env python3
r"""Sweeps: one config, lists of override values, one run per combination, one table.

  python launch/sweep.py --config=configs/digits_switch.py \
      --sweep model.moe.num_experts=4,8,16 --sweep model.moe.num_selected=1,2 \
      --workdir=/tmp/sweeps/digits_switch --config.train.num_steps=500

Every combination of the swept values (`--sweep key=v1,v2,...`, repeatable)
is a run of `python -m vmoe_jax.main --config=CONFIG --config.key=value ...`
in its own workdir, WORKDIR/<key>=<value>,... (the last part of each key
when that is unambiguous). Other `--config.key=value` arguments apply to every
run. How the runs are started (--launcher):

  local              one after another on this machine (default);
  local_multiprocess one after another, each as N local processes (launch/local.py);
  slurm              one SLURM job each (launch/slurm.sh); returns once submitted;
  tpu_pod            one after another on a Cloud TPU pod (launch/tpu_pod.sh);
  print              print the commands, run nothing.

--launcher_args='--nodes=4 --partition=gpu' go to the launch script,
--dry_run makes it print its commands. A run whose workdir already holds
results.json is skipped (--force runs it again; an unfinished run resumes
from its checkpoint). Afterwards (or with --aggregate_only, e.g. once the
SLURM jobs are done) the finished runs are gathered into WORKDIR/results.md
and results.csv (model, experts, parameters, test accuracy, training time
per epoch, step time, inference time) and WORKDIR/results.png (test accuracy
and step time against the number of experts, one line per setting of the
other swept keys).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
import time

from vmoe_jax.tools import run_logs

LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
EXPERTS_KEY = 'model.moe.num_experts'
LAUNCHERS = ('local', 'local_multiprocess', 'slurm', 'tpu_pod', 'print')


class SweepError(ValueError):
  """A bad sweep argument; printed as one line, exit status 2."""


@dataclasses.dataclass
class Run:
  name: str
  workdir: str
  overrides: dict[str, str]  # Swept key -> value, in sweep order.


def parse_sweep(specs: list[str]) -> dict[str, list[str]]:
  """['model.moe.num_experts=4,8', ...] -> {'model.moe.num_experts': ['4', '8'], ...}."""
  from vmoe_jax.schema import defaults  # pylint: disable=g-import-not-at-top

  known = defaults.all_keys()
  sweep = {}
  for spec in specs:
    key, sep, values = spec.partition('=')
    key = key.strip().removeprefix('--').removeprefix('config.')
    if not sep or not key or not values.strip():
      raise SweepError(f'--sweep {spec!r} is not key=v1,v2,...; e.g. {EXPERTS_KEY}=4,8,16.')
    if key not in known:
      raise SweepError(defaults.unknown_key_message(key, known))
    if key in sweep:
      raise SweepError(f'--sweep names {key} twice; give all its values in one list.')
    sweep[key] = [v.strip() for v in values.split(',') if v.strip()]
  if not sweep:
    raise SweepError(f'nothing to sweep; add --sweep key=v1,v2,... (e.g. {EXPERTS_KEY}=4,8,16).')
  return sweep


def _short_names(keys: list[str]) -> dict[str, str]:
  """The last part of each key, or the whole key where last parts collide."""
  last = [k.rsplit('.', 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def expand(sweep: dict[str, list[str]], root: str) -> list[Run]:
  """Every combination of the swept values, in order (the last key varies fastest)."""
  names = _short_names(list(sweep))
  runs = []
  for values in itertools.product(*sweep.values()):
    overrides = dict(zip(sweep, values))
    name = ','.join(f'{names[k]}={v}' for k, v in overrides.items())
    runs.append(Run(name=name, workdir=os.path.join(root, name), overrides=overrides))
  return runs


def main_args(config: str, run: Run, fixed: list[str]) -> list[str]:
  """Arguments of vmoe_jax.main for one run (the swept values come last, so they win)."""
  return [
    f'--config={config}',
    f'--workdir={run.workdir}',
    *fixed,
    *(f'--config.{k}={v}' for k, v in run.overrides.items()),
  ]


def command(args, run: Run, fixed: list[str]) -> list[str]:
  """The command that starts `run` with the chosen launcher."""
  extra = shlex.split(args.launcher_args) + (['--dry_run'] if args.dry_run else [])
  run_args = main_args(args.config, run, fixed)
  if args.launcher in ('local', 'print'):
    return [sys.executable, '-m', 'vmoe_jax.main', *run_args]
  if args.launcher == 'local_multiprocess':
    return [sys.executable, os.path.join(LAUNCH_DIR, 'local.py'), *extra, '--', *run_args]
  script = {'slurm': 'slurm.sh', 'tpu_pod': 'tpu_pod.sh'}[args.launcher]
  return ['bash', os.path.join(LAUNCH_DIR, script), *extra, '--', *run_args]


def _done(run: Run) -> bool:
  return os.path.exists(os.path.join(run.workdir, 'results.json'))


def launch(args, runs: list[Run], fixed: list[str]) -> list[str]:
  """Starts the runs one after another; returns the names of those that failed."""
  failed = []
  for i, run in enumerate(runs, 1):
    cmd = command(args, run, fixed)
    if args.launcher == 'print' or (args.launcher == 'local' and args.dry_run):
      print(shlex.join(cmd))
      continue
    if _done(run) and not args.force:
      print(f'[{i}/{len(runs)}] {run.name}: done already (--force to run it again)')
      continue
    start = time.perf_counter()
    if args.launcher == 'local':
      os.makedirs(run.workdir, exist_ok=True)
      log_path = os.path.join(run.workdir, 'train.log')
      log_start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
      print(f'[{i}/{len(runs)}] {run.name}: training (log: {log_path})', flush=True)
      code = run_logs.run_logged(cmd, log_path, prefix=f'[{i}/{len(runs)}] {run.name}:')
    else:
      print(f'[{i}/{len(runs)}] {run.name}: {shlex.join(cmd)}', flush=True)
      code = subprocess.call(cmd)
    seconds = time.perf_counter() - start
    if code != 0:
      failed.append(run.name)
      hint = ''
      if args.launcher == 'local':
        reason = run_logs.failure_line(log_path, log_start)
        hint = f': {reason} (log: {log_path})' if reason else f'; see {log_path}'
      print(f'[{i}/{len(runs)}] {run.name}: FAILED (exit status {code}){hint}', flush=True)
    elif args.launcher != 'slurm' and not args.dry_run:
      print(f'[{i}/{len(runs)}] {run.name}: finished in {seconds:.0f}s', flush=True)
  return failed


# --------------------------------------------------------------------------- aggregation


def collect(sweep: dict[str, list[str]], runs: list[Run]) -> list[dict]:
  """Result rows of the finished runs, labelled by the swept values other than experts."""
  from vmoe_jax.storage import results  # pylint: disable=g-import-not-at-top

  names = _short_names(list(sweep))
  order = {k: {v: i for i, v in enumerate(values)} for k, values in sweep.items()}
  rows = []
  for run in runs:
    if not _done(run):
      continue
    row = results.summarize(run.workdir)
    others = {k: v for k, v in run.overrides.items() if k != EXPERTS_KEY}
    row['series'] = ', '.join(f'{names[k]}={v}' for k, v in others.items())
    # The model column names K and the MoE layers; other swept keys are added to it.
    shown = {k: v for k, v in others.items() if k not in ('model.moe.num_selected',)}
    if shown:
      row['model'] += ' (' + ', '.join(f'{names[k]}={v}' for k, v in shown.items()) + ')'
    row['sort'] = (tuple(order[k][v] for k, v in others.items()), row['experts'])
    rows.append(row)
  return sorted(rows, key=lambda r: r['sort'])


def plot(rows: list[dict], path: str, title: str = 'sweep') -> None:
  """Test accuracy and step time against the number of experts, one line per series."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
  series = {}
  for row in rows:
    series.setdefault(row['series'], []).append(row)
  experts = sorted({r['experts'] for r in rows})
  for label, members in series.items():
    members = sorted(members, key=lambda r: r['experts'])
    x = [r['experts'] for r in members]
    ax_acc.plot(x, [100 * r['test_accuracy'] for r in members], 'o-', label=label or None)
    timed = [r for r in members if r['step_seconds'] is not None]
    ax_time.plot(
      [r['experts'] for r in timed], [1000 * r['step_seconds'] for r in timed], 'o-', label=label
    )
  for ax, ylabel in ((ax_acc, 'test accuracy (%)'), (ax_time, 'training step time (ms)')):
    if experts and min(experts) > 0:
      ax.set_xscale('log', base=2)
    ax.set_xticks(experts, [str(e) for e in experts])
    ax.set_xlabel('experts per MoE layer')
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
  if any(series):
    ax_acc.legend()
  fig.suptitle(title)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def aggregate(
  sweep: dict[str, list[str]], runs: list[Run], root: str, title: str = 'sweep'
) -> list[dict]:
  """Writes results.md, results.csv and results.png in `root`; returns the rows."""
  from vmoe_jax.storage import results  # pylint: disable=g-import-not-at-top

  rows = collect(sweep, runs)
  if not rows:
    return rows
  table = results.markdown_table(rows)
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write(table)
  results.write_csv(rows, os.path.join(root, 'results.csv'))
  plot(rows, os.path.join(root, 'results.png'), title)
  return rows


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]):
  parser = argparse.ArgumentParser(
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    usage='launch/sweep.py --config=CONFIG --sweep key=v1,v2 [--sweep ...] [options] '
    '[--config.key=value ...]',
  )
  parser.add_argument('--config', required=True, help='config file, e.g. configs/digits_switch.py')
  parser.add_argument(
    '--sweep', action='append', default=[], metavar='KEY=V1,V2', help='a swept key (repeatable)'
  )
  parser.add_argument('--workdir', help='root of the run workdirs (/tmp/sweeps/<config name>)')
  parser.add_argument('--launcher', default='local', choices=LAUNCHERS)
  parser.add_argument('--launcher_args', default='', help='options for the launch script')
  parser.add_argument('--dry_run', action='store_true', help='the launch script prints only')
  parser.add_argument('--force', action='store_true', help='run finished runs again')
  parser.add_argument('--aggregate_only', action='store_true', help='only gather results')
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    parser.error(f'unknown arguments {unknown}; overrides for every run look like --config.a.b=v.')
  if not os.path.exists(args.config.split(':')[0]):
    raise SweepError(
      f'config file {args.config!r} does not exist; pass --config=configs/<name>.py.'
    )
  if args.workdir is None:
    name = os.path.splitext(os.path.basename(args.config.split(':')[0]))[0]
    args.workdir = os.path.join('/tmp/sweeps', name)
  args.workdir = os.path.abspath(args.workdir)
  return args, rest


def main(argv: list[str]) -> int:
  try:
    args, fixed = parse_args(argv)
    sweep = parse_sweep(args.sweep)
  except SweepError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  runs = expand(sweep, args.workdir)
  failed = []
  start = time.perf_counter()
  if not args.aggregate_only:
    if args.launcher != 'print' and not args.dry_run:
      os.makedirs(args.workdir, exist_ok=True)
      with open(os.path.join(args.workdir, 'sweep.json'), 'w') as f:
        spec = {'config': args.config, 'sweep': sweep, 'fixed': fixed}
        json.dump({**spec, 'runs': [r.name for r in runs]}, f, indent=2)
    print(f'{len(runs)} runs in {args.workdir} ({args.launcher})', flush=True)
    failed = launch(args, runs, fixed)
    if args.launcher in ('print', 'slurm') or args.dry_run:  # Nothing finished yet.
      if args.launcher == 'slurm' and not args.dry_run:
        print('Submitted; once the jobs finish, run the same command with --aggregate_only.')
      return 1 if failed else 0
  title = f'{args.config}: ' + ', '.join(_short_names(list(sweep)).values())
  rows = aggregate(sweep, runs, args.workdir, title)
  if rows:
    from vmoe_jax.storage import results  # pylint: disable=g-import-not-at-top

    print()
    print(results.markdown_table(rows), end='')
    print(f'\n{len(rows)} of {len(runs)} runs finished; table, CSV and plot in {args.workdir}/')
  else:
    print(f'no finished runs in {args.workdir} yet.')
  if not args.aggregate_only:
    print(f'sweep wall time {time.perf_counter() - start:.0f}s')
  if failed:
    print(f'failed: {", ".join(failed)}', file=sys.stderr)
  return 1 if failed or not rows else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
