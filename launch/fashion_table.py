#!/usr/bin/env python3
r"""The Fashion-MNIST results tables: every model, several seeds, one command.

  python launch/fashion_table.py --table=main --seeds=0,1,2 --workdir=/tmp/fashion_table
  python launch/fashion_table.py --table=routers --seeds=0,1
  python launch/fashion_table.py --table=main --print   # the commands only

Each row of the chosen table is a config (with overrides) trained once per
seed (`--config.seed=S`), one run after another, in WORKDIR/<row>/seed=<S>
(a finished run is not trained again; an unfinished one resumes), every row
of the first seed before the next seed. Then:

  * WORKDIR/table.md, table.json: per row, the model, its parameters, active
    GFLOPs per image (`vmoe_jax.models.flops`, forward), test accuracy as mean +-
    standard deviation over the seeds (and each seed's value), the training
    loop's wall time and the whole command's (compilation and evaluation
    included) and training images per second of the first seed's run (the
    runs go seed-major, so later seeds may share the machine with other work
    and their times are not compared), and the test share of dropped
    assignments;
  * for the rows with capacity routing, the V-MoE evaluation sweep of every
    seed (`python -m vmoe_jax.evaluate`, C in --capacity_factors, vanilla and
    BPR) into WORKDIR/capacity.md, capacity.json and accuracy_vs_compute.png
    (mean over the seeds, the spread as error bars). The BPR margin is paired:
    each run's BPR accuracy minus its own vanilla accuracy, mean +- std over
    the runs, and on how many runs BPR was ahead.

Tables (`TABLES`): 'main' is the dense ViT, the Switch-ViT and the V-MoE at
equal active FLOPs (configs/fashion_*.py); 'routers' adds every router of
`vmoe_jax.moe.routers` to the dense and top-k rows; 'heads' the MAP head.
Extra `--config.key=value` arguments apply to every run (e.g. a shorter
`--config.train.num_steps=300` to try the command).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from vmoe_jax.tools import run_logs

# The repository: the configs' paths are relative to it.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Row name -> (config, overrides). Every row trains at equal active FLOPs per
# image except where the name says otherwise (K=2 V-MoE runs two experts of
# the dense MLP's width per token in its MoE layers).
MAIN = {
  'dense ViT': ('configs/fashion_vit.py', []),
  'Switch-ViT (top-1)': ('configs/fashion_switch.py', []),
  'Switch-ViT (top-1, MoE in blocks 1, 3)': (
    'configs/fashion_switch.py',
    ['--config.model.moe.layers=1,3'],
  ),
  'V-MoE (top-2, BPR at eval)': ('configs/fashion_vmoe.py', []),
}
ROUTERS = {
  'dense ViT': ('configs/fashion_vit.py', []),
  'top-1': ('configs/fashion_switch.py', []),
  'top-1, BPR': (
    'configs/fashion_switch.py',
    ['--config.model.moe.batch_priority=True'],
  ),
  'top-2 (experts half as wide)': (
    'configs/fashion_switch.py',
    ['--config.model.moe.num_selected=2', '--config.model.moe.mlp_dim=HALF'],
  ),
  # Expert Choice and Soft MoE process capacity_factor x the group's tokens:
  # at 1.0, E * C = S buffer rows (Expert Choice) and 8 x 6 = 48 slots for
  # 49 tokens (Soft MoE, one image a group), the dense MLP's work.
  'expert_choice': (
    'configs/fashion_switch.py',
    ['--config.model.moe.router=expert_choice', '--config.model.moe.capacity_factor=1.0'],
  ),
  'soft': (
    'configs/fashion_switch.py',
    [
      '--config.model.moe.router=soft',
      '--config.model.moe.group_size=1',
      '--config.model.moe.capacity_factor=1.0',
    ],
  ),
  'image_topk': ('configs/fashion_switch.py', ['--config.model.moe.router=image_topk']),
  'dropless': ('configs/fashion_switch.py', ['--config.model.moe.router=dropless']),
}
HEADS = {
  'dense ViT (GAP)': ('configs/fashion_vit.py', []),
  'dense ViT (MAP head)': ('configs/fashion_vit.py', ['--config.model.classifier=map']),
}
TABLES = {'main': MAIN, 'routers': ROUTERS, 'heads': HEADS}
CAPACITY_ROUTERS = ('topk', 'image_topk', 'expert_choice')


def slug(name: str) -> str:
  return ''.join(c if c.isalnum() else '_' for c in name).strip('_').lower()


def resolve(overrides: list[str], config: str) -> list[str]:
  """Fills in HALF (half the dense MLP width of `config`)."""
  if not any('HALF' in o for o in overrides):
    return overrides
  half = str(_load_config(config).model.mlp_dim // 2)
  return [o.replace('HALF', half) for o in overrides]


def _load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location('table_config', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def train_command(config: str, workdir: str, seed: int, overrides: list[str], fixed: list[str]):
  return [
    sys.executable,
    '-m',
    'vmoe_jax.main',
    f'--config={config}',
    f'--workdir={workdir}',
    f'--config.seed={seed}',
    *resolve(overrides, config),
    *fixed,
  ]


def run_logged(cmd: list[str], workdir: str, label: str) -> tuple[int, float]:
  """Runs a command into workdir/train.log, echoing progress; (exit status, seconds)."""
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  code = run_logs.run_logged(cmd, os.path.join(workdir, 'train.log'), label, REPO)
  return code, time.perf_counter() - start


def train_all(
  table: dict, seeds: list[int], root: str, fixed: list[str], dry: bool, rows: tuple | None = ()
) -> list[dict]:
  """Trains the (row, seed) runs not finished yet, of `rows` (row slugs; () all, None none).

  Returns every run of the table with its workdir, trained now or not.
  """
  runs = []
  total = len(table) * len(seeds)
  for i, ((name, (config, overrides)), seed) in enumerate(
    ((item, seed) for seed in seeds for item in table.items()), 1
  ):
    workdir = os.path.join(root, slug(name), f'seed={seed}')
    cmd = train_command(config, workdir, seed, overrides, fixed)
    runs.append(dict(name=name, seed=seed, workdir=workdir, command=shlex.join(cmd)))
    label = f'[{i}/{total}] {name} seed {seed}:'
    if dry:
      print(shlex.join(cmd))
      continue
    if rows is None or (rows and slug(name) not in rows):
      continue  # Not trained now; its results are used if they exist.
    if os.path.exists(os.path.join(workdir, 'results.json')):
      print(f'{label} done already', flush=True)
      continue
    code, seconds = run_logged(cmd, workdir, label)
    if code:
      reason = run_logs.failure_line(os.path.join(workdir, 'train.log'))
      print(f'{label} FAILED (exit status {code}): {reason}', flush=True)
      continue
    with open(os.path.join(workdir, 'command_seconds.json'), 'w') as f:
      json.dump({'command_seconds': seconds, 'command': runs[-1]['command']}, f)
    print(f'{label} finished in {seconds:.0f}s', flush=True)
  return runs


def run_row(workdir: str) -> dict | None:
  """Figures of one finished run (None if it has not finished)."""
  from vmoe_jax import inference  # pylint: disable=g-import-not-at-top
  from vmoe_jax.models import factory  # pylint: disable=g-import-not-at-top
  from vmoe_jax.models import flops  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    results = json.load(f)
  with open(os.path.join(workdir, 'dataset.json')) as f:
    dataset = json.load(f)
  config = inference.run_config(workdir)
  model = factory.create_model(config, dataset['num_classes'])
  fwd = flops.forward_flops(model, tuple(dataset['image_shape']))
  command = {}
  if os.path.exists(os.path.join(workdir, 'command_seconds.json')):
    with open(os.path.join(workdir, 'command_seconds.json')) as f:
      command = json.load(f)
  step = results.get('step_seconds')
  return {
    'model': _describe(config),
    'router': config.model.moe.router if config.model.moe.num_experts else None,
    'num_params': results['num_params'],
    'gflops_per_image': fwd['total'] / 1e9,
    'accuracy': results['test/accuracy'],
    'dropped': results.get('test/moe_dropped'),
    'train_seconds': results['train_seconds'],
    'command_seconds': command.get('command_seconds'),
    'images_per_sec': config.input.batch_size / step if step else None,
  }


def _describe(config) -> str:
  from vmoe_jax.storage import results  # pylint: disable=g-import-not-at-top

  return results.model_name(json.loads(config.to_json_best_effort()))


def _mean_std(values: list[float]) -> tuple[float, float]:
  values = [v for v in values if v is not None]
  if not values:
    return float('nan'), float('nan')
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict]) -> list[dict]:
  """One row per table row: means and spreads over the seeds."""
  rows = {}
  for run in runs:
    row = run_row(run['workdir'])
    if row is None:
      continue
    rows.setdefault(run['name'], []).append({**row, 'seed': run['seed']})
  table = []
  for name, members in rows.items():
    first = members[0]
    accuracy, spread = _mean_std([m['accuracy'] for m in members])
    table.append(
      {
        'name': name,
        'model': first['model'],
        'router': first['router'],
        'num_params': first['num_params'],
        'gflops_per_image': first['gflops_per_image'],
        'accuracy_mean': accuracy,
        'accuracy_std': spread,
        'accuracy_by_seed': {m['seed']: m['accuracy'] for m in members},
        # Times of the first seed's run: the table's runs go seed-major, so the
        # first seed's are the ones to run alone when later seeds share the machine.
        'time_seed': first['seed'],
        'train_seconds': first['train_seconds'],
        'command_seconds': first['command_seconds'],
        'images_per_sec': first['images_per_sec'],
        'dropped': _mean_std([m['dropped'] for m in members])[0],
        'workdirs': [r['workdir'] for r in runs if r['name'] == name],
      }
    )
  return table


def markdown(table: list[dict]) -> str:
  lines = [
    '| model | parameters | GFLOPs/image | test accuracy | by seed | train (min) | '
    'command (min) | images/s | dropped (test) |',
    '| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |',
  ]
  for r in table:
    seeds = ', '.join(f'{100 * a:.2f}' for _, a in sorted(r['accuracy_by_seed'].items()))
    if len(r['accuracy_by_seed']) == 1:
      accuracy = f'{100 * r["accuracy_mean"]:.2f}% (1 seed)'
    else:
      accuracy = f'{100 * r["accuracy_mean"]:.2f} ± {100 * r["accuracy_std"]:.2f}%'
    dropped = (
      '-' if r['dropped'] is None or r['dropped'] != r['dropped'] else f'{100 * r["dropped"]:.1f}%'
    )
    lines.append(
      f'| {r["name"]} | {r["num_params"] / 1e6:.2f}M | {r["gflops_per_image"]:.4f} | '
      f'{accuracy} | {seeds} | '
      f'{r["train_seconds"] / 60:.1f} | {_minutes(r["command_seconds"])} | '
      f'{r["images_per_sec"]:.0f} | {dropped} |'
    )
  return '\n'.join(lines) + '\n'


def _minutes(seconds) -> str:
  return '-' if seconds is None or seconds != seconds else f'{seconds / 60:.1f}'


def capacity_sweeps(table: list[dict], factors: str, root: str) -> list[dict]:
  """`vmoe_jax.evaluate` on every seed of the capacity-routed rows; the sweep rows."""
  out = []
  for row in table:
    if row['router'] not in CAPACITY_ROUTERS:
      continue
    for workdir in row['workdirs']:
      eval_dir = os.path.join(workdir, 'eval_capacity')
      report = os.path.join(eval_dir, 'eval.json')
      if not os.path.exists(report):
        cmd = [
          sys.executable,
          '-m',
          'vmoe_jax.evaluate',
          f'--workdir={workdir}',
          f'--capacity_factors={factors}',
          '--nofewshot',
          f'--output_dir={eval_dir}',
        ]
        print(f'evaluating {workdir}', flush=True)
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if result.returncode:
          print(f'  FAILED: {result.stderr.strip().splitlines()[-1:]}', flush=True)
          continue
      with open(report) as f:
        for setting in json.load(f)['settings']:
          out.append(
            {
              'name': row['name'],
              'workdir': workdir,
              **{
                k: setting.get(k)
                for k in (
                  'capacity_factor',
                  'batch_priority',
                  'accuracy',
                  'kept_share',
                  'expert_flops_per_image',
                )
              },
            }
          )
  with open(os.path.join(root, 'capacity.json'), 'w') as f:
    json.dump(out, f, indent=2)
  return out


def capacity_table(sweeps: list[dict]) -> tuple[str, dict]:
  """Mean +- std over seeds per (row, C, routing); markdown and the grouped values."""
  grouped = {}
  for s in sweeps:
    key = (s['name'], s['capacity_factor'], bool(s['batch_priority']))
    grouped.setdefault(key, []).append(s)
  lines = [
    '| model | C | vanilla | BPR | BPR - vanilla (paired) | BPR ahead | kept share |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for name in dict.fromkeys(k[0] for k in grouped):
    for c in sorted({k[1] for k in grouped if k[0] == name}):
      vanilla = grouped.get((name, c, False), [])
      bpr = grouped.get((name, c, True), [])
      kept = _mean_std([s['kept_share'] for s in bpr or vanilla])[0]
      gap, ahead = '-', '-'
      diffs = paired_differences(vanilla, bpr)
      if diffs:
        mean, std = _mean_std(diffs)
        gap = f'{100 * mean:+.2f}' + (f' ± {100 * std:.2f}' if len(diffs) > 1 else '')
        ahead = f'{sum(d > 0 for d in diffs)}/{len(diffs)}'
      lines.append(
        f'| {name} | {c:g} | {_accuracy_cell(vanilla)} | {_accuracy_cell(bpr)} | {gap} | '
        f'{ahead} | {100 * kept:.1f}% |'
      )
  return '\n'.join(lines) + '\n', grouped


def paired_differences(vanilla: list[dict], bpr: list[dict]) -> list[float]:
  """BPR minus vanilla accuracy of each trained run (workdir) evaluated both ways.

  Pairing by run takes out what differs between seeds' models, so the spread
  of these differences is the seed-to-seed spread of the BPR margin itself
  (the columns' spreads also hold how good each seed's model is).
  """
  by_run = {s['workdir']: s['accuracy'] for s in vanilla}
  return [s['accuracy'] - by_run[s['workdir']] for s in bpr if s['workdir'] in by_run]


def _accuracy_cell(settings: list[dict]) -> str:
  """Mean +- std over the seeds' runs of one setting; '-' when it was not evaluated."""
  if not settings:
    return '-'
  mean, std = _mean_std([s['accuracy'] for s in settings])
  if len(settings) == 1:
    return f'{100 * mean:.2f}%'
  return f'{100 * mean:.2f} ± {100 * std:.2f}%'


def plot_capacity(grouped: dict, path: str) -> None:
  """Accuracy against expert FLOPs per image, vanilla vs BPR, mean +- std over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
  for name in dict.fromkeys(k[0] for k in grouped):
    for bpr, style in ((False, 'o--'), (True, 's-')):
      keys = sorted(k for k in grouped if k[0] == name and k[2] == bpr)
      if not keys:
        continue
      x = [_mean_std([s['expert_flops_per_image'] for s in grouped[k]])[0] / 1e6 for k in keys]
      stats = [_mean_std([s['accuracy'] for s in grouped[k]]) for k in keys]
      ax.errorbar(
        x,
        [100 * m for m, _ in stats],
        yerr=[100 * s for _, s in stats],
        fmt=style,
        capsize=3,
        label=f'{name}, {"BPR" if bpr else "vanilla"}',
      )
  ax.set_xlabel('expert MFLOPs per image (kept assignments)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title('Fashion-MNIST: accuracy against expert compute at evaluation')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--table', default='main', choices=sorted(TABLES))
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated seeds')
  parser.add_argument('--workdir', default='/tmp/fashion_table', help='root of the runs')
  parser.add_argument('--capacity_factors', default='0.1,0.25,0.5,1.0,2.0')
  parser.add_argument('--print', action='store_true', help='print the commands only')
  parser.add_argument(
    '--train_only', action='store_true', help='train the runs, leave the tables for later'
  )
  parser.add_argument(
    '--aggregate_only', action='store_true', help='train nothing; tables of the finished runs'
  )
  parser.add_argument(
    '--train_rows', default='', help='comma-separated row names (slugs) to train; default all'
  )
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    parser.error(f'unknown arguments {unknown}; overrides for every run look like --config.a.b=v.')
  try:
    args.seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  except ValueError:
    parser.error(f'--seeds={args.seeds!r} is not a list of integers; e.g. --seeds=0,1,2.')
  if not args.seeds:
    parser.error('--seeds names no seed; e.g. --seeds=0,1,2.')
  return args, rest


def main(argv) -> int:
  args, fixed = parse_args(argv)
  root = os.path.abspath(os.path.join(args.workdir, args.table))
  rows = tuple(r for r in args.train_rows.split(',') if r)
  unknown_rows = sorted(set(rows) - {slug(name) for name in TABLES[args.table]})
  if unknown_rows:
    sys.exit(
      f'error: --train_rows names {unknown_rows}, not rows of --table={args.table}; '
      f'use some of {sorted(slug(n) for n in TABLES[args.table])}.'
    )
  if args.aggregate_only:
    rows = None
  runs = train_all(TABLES[args.table], args.seeds, root, fixed, args.print, rows)
  if args.print or args.train_only:
    return 0
  table = aggregate(runs)
  text = markdown(table)
  sweeps = capacity_sweeps(table, args.capacity_factors, root)
  if sweeps:
    capacity_text, grouped = capacity_table(sweeps)
    text += (
      '\nEvaluation capacity sweep (mean ± std over the seeds; the margin paired by run):\n\n'
      + capacity_text
    )
    with open(os.path.join(root, 'capacity.md'), 'w') as f:
      f.write(capacity_text)
    plot_capacity(grouped, os.path.join(root, 'accuracy_vs_compute.png'))
  with open(os.path.join(root, 'table.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(root, 'table.json'), 'w') as f:
    json.dump(table, f, indent=2)
  print(text, end='')
  print(
    f'written to {root}/table.md, table.json'
    + (', capacity.md, accuracy_vs_compute.png' if sweeps else '')
  )
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
