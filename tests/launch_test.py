"""launch/: the local, SLURM and TPU launchers (dry runs, shellcheck) and sweeps."""

import csv
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from vmoe_jax.schema import defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
MAIN_ARGS = ['--config=configs/cifar10_switch.py', '--workdir=/shared/runs/a b']


def load(name):
  """launch/NAME.py as a module (launch/ holds scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(
    f'launch_{name}', os.path.join(LAUNCH, f'{name}.py')
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up.
  spec.loader.exec_module(module)
  return module


local = load('local')
sweep = load('sweep')


def run_script(*args, env=None):
  return subprocess.run(
    list(args),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
    env={**os.environ, **(env or {})},
  )


# --------------------------------------------------------------------------- shell scripts


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck is not installed')
def test_shell_scripts_pass_shellcheck():
  result = run_script('shellcheck', 'launch/slurm.sh', 'launch/tpu_pod.sh', '.ci/run')
  assert result.returncode == 0, result.stdout


def test_slurm_dry_run_submits_one_task_per_gpu():
  result = run_script(
    'bash', 'launch/slurm.sh', '--dry_run', '--nodes=4', '--partition=a100', '--', *MAIN_ARGS,
    env={'SLURM_JOB_ID': ''},
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  words = shlex.split(result.stdout)
  assert words[0] == 'sbatch'
  for option in ('--nodes=4', '--ntasks-per-node=8', '--gpus-per-node=8', '--partition=a100'):
    assert option in words
  # The job runs this script again, without --dry_run, with the same arguments.
  script = words.index(os.path.join(LAUNCH, 'slurm.sh'))
  assert words[script + 1 :] == ['--nodes=4', '--partition=a100', '--', *MAIN_ARGS]


def test_slurm_dry_run_inside_a_job_starts_the_processes_with_srun():
  env = {'SLURM_JOB_ID': '4242', 'SLURM_JOB_NUM_NODES': '4'}
  result = run_script('bash', 'launch/slurm.sh', '--dry_run', '--', *MAIN_ARGS, env=env)
  assert result.returncode == 0, result.stderr
  words = shlex.split(result.stdout)
  assert words[:4] == ['srun', '--nodes=4', '--ntasks-per-node=8', '--kill-on-bad-exit=1']
  assert words[-5:] == ['-m', 'vmoe_jax.main', '--distributed=on', *MAIN_ARGS]
  per_node = run_script(
    'bash', 'launch/slurm.sh', '--dry_run', '--per=node', '--gpus_per_node=4', '--', *MAIN_ARGS,
    env=env,
  )  # fmt: skip
  lines = per_node.stdout.splitlines()
  assert lines[0] == 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3'
  assert '--ntasks-per-node=1' in shlex.split(lines[1])


@pytest.mark.parametrize(
  'args, message',
  [
    (['--per=socket', '--', 'x'], 'error: --per=socket is unknown; use --per=gpu or --per=node.'),
    (['--nodes=0', '--', 'x'], 'error: --nodes=0; give a whole number >= 1.'),
    (['--nodes=2'], 'error: give the arguments of vmoe_jax.main after --'),
    (['--gpus=8', '--', 'x'], "error: unknown option '--gpus=8' before --"),
  ],
)
def test_slurm_errors(args, message):
  result = run_script('bash', 'launch/slurm.sh', '--dry_run', *args)
  assert result.returncode == 2
  assert result.stderr.startswith(message)


def test_tpu_pod_dry_run_runs_main_on_every_worker():
  result = run_script(
    'bash', 'launch/tpu_pod.sh', '--dry_run', '--setup', '--tpu=pod', '--zone=us-central2-b',
    '--project=proj', '--', *MAIN_ARGS,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 4  # Archive, copy, install, run.
  assert 'scp' in lines[1] and '--worker=all' in lines[1]
  install = shlex.split(lines[2])
  assert install[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod']
  run = shlex.split(lines[3])
  assert run[:9] == [
    'gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod', '--zone=us-central2-b',
    '--project=proj', '--worker=all',
  ]  # fmt: skip
  remote = run[9].removeprefix('--command=')
  # What every worker's shell runs, arguments intact.
  assert shlex.split(remote) == [
    'cd', 'vmoe_jax', '&&', 'python3', '-m', 'vmoe_jax.main', '--distributed=on', *MAIN_ARGS,
  ]  # fmt: skip


def test_tpu_pod_errors():
  result = run_script('bash', 'launch/tpu_pod.sh', '--zone=z', '--', 'x')
  assert result.returncode == 2
  assert result.stderr.startswith('error: --tpu is missing')


# --------------------------------------------------------------------------- local.py


def test_local_dry_run_prints_one_command_per_process():
  result = run_script(
    sys.executable, 'launch/local.py', '--dry_run', '--num_processes=3', '--devices_per_process=2',
    '--port=12345', '--', *MAIN_ARGS,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[-1] == 'wait' and len(lines) == 4
  for i, line in enumerate(lines[:3]):
    words = shlex.split(line.removesuffix(' &'))
    assert words[:2] == ['JAX_PLATFORMS=cpu', 'XLA_FLAGS=--xla_force_host_platform_device_count=2']
    assert words[-3:] == [
      '--coordinator_address=localhost:12345',
      '--num_processes=3',
      f'--process_id={i}',
    ]


def test_local_env_replaces_the_device_count():
  env = local.process_env(
    {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --xla_foo=1', 'PATH': '/bin'}, 4
  )
  assert env['XLA_FLAGS'] == '--xla_foo=1 --xla_force_host_platform_device_count=4'
  assert env['JAX_PLATFORMS'] == 'cpu' and env['PATH'] == '/bin'


def test_local_stops_the_others_when_one_fails():
  sleeper = [sys.executable, '-c', 'import time; time.sleep(60)']
  failer = [sys.executable, '-c', 'import sys; print("boom"); sys.exit(3)']
  assert local.run([sleeper, failer], dict(os.environ), grace_seconds=5) == 3


# --------------------------------------------------------------------------- sweep.py


def test_sweep_expands_every_combination():
  spec = sweep.parse_sweep(['model.moe.num_experts=4,8', 'config.model.moe.num_selected=1,2'])
  assert spec == {'model.moe.num_experts': ['4', '8'], 'model.moe.num_selected': ['1', '2']}
  runs = sweep.expand(spec, '/root')
  assert [r.name for r in runs] == [
    'num_experts=4,num_selected=1',
    'num_experts=4,num_selected=2',
    'num_experts=8,num_selected=1',
    'num_experts=8,num_selected=2',
  ]
  assert runs[1].workdir == '/root/num_experts=4,num_selected=2'
  # Colliding last parts keep the whole key.
  spec = sweep.parse_sweep(['model.dropout=0,0.1', 'model.moe.dropout=0,0.2'])
  assert sweep.expand(spec, '/r')[0].name == 'model.dropout=0,model.moe.dropout=0'


@pytest.mark.parametrize(
  'specs, message',
  [
    (['model.moe.num_expert=4,8'], "unknown config key 'model.moe.num_expert' (did you mean"),
    (['model.moe.num_experts'], "--sweep 'model.moe.num_experts' is not key=v1,v2,..."),
    (['seed=1', 'seed=2'], '--sweep names seed twice'),
    ([], 'nothing to sweep'),
  ],
)
def test_sweep_argument_errors(specs, message):
  with pytest.raises(sweep.SweepError) as info:
    sweep.parse_sweep(specs)
  assert str(info.value).startswith(message)


def test_sweep_print_launcher_and_cluster_commands(capsys, tmp_path):
  root = str(tmp_path / 'sw')
  argv = [
    '--config=configs/digits_switch.py',
    '--sweep=model.moe.num_experts=4,8',
    f'--workdir={root}',
    '--launcher=print',
    '--config.train.num_steps=10',
  ]
  assert sweep.main(argv) == 0
  lines = capsys.readouterr().out.splitlines()[1:]
  assert shlex.split(lines[1])[1:] == [
    '-m',
    'vmoe_jax.main',
    '--config=configs/digits_switch.py',
    f'--workdir={root}/num_experts=8',
    '--config.train.num_steps=10',
    '--config.model.moe.num_experts=8',
  ]
  assert not os.path.exists(root)  # Printing creates nothing.
  args, fixed = sweep.parse_args([*argv[:3], '--launcher=slurm', '--launcher_args=--nodes=2'])
  command = sweep.command(args, sweep.expand({'seed': ['1']}, root)[0], fixed)
  assert command[1:4] == [os.path.join(LAUNCH, 'slurm.sh'), '--nodes=2', '--']
  assert command[4:] == [
    '--config=configs/digits_switch.py',
    f'--workdir={root}/seed=1',
    '--config.seed=1',
  ]


def test_sweep_prints_why_each_run_failed(tmp_path):
  result = run_script(
    sys.executable,
    'launch/sweep.py',
    '--config=configs/digits_switch.py',
    '--sweep=model.moe.num_selected=0,9',
    f'--workdir={tmp_path}',
  )
  assert result.returncode == 1
  lines = result.stdout.splitlines()
  for i, (value, why) in enumerate(
    [
      ('0', 'error: model.moe.num_selected=0 must be an integer >= 1 (K, the experts per token)'),
      ('9', 'error: model.moe.num_selected=9 exceeds model.moe.num_experts=8;'),
    ],
    1,
  ):
    prefix = f'[{i}/2] num_selected={value}: FAILED (exit status 2): {why}'
    line = next(line for line in lines if 'FAILED' in line and f'num_selected={value}' in line)
    assert line.startswith(prefix), line
    assert line.endswith(f'(log: {tmp_path}/num_selected={value}/train.log)')
  assert 'failed: num_selected=0, num_selected=9' in result.stderr


def fake_run(workdir, experts, selected, accuracy, step_seconds):
  """A finished run's workdir: config.json, dataset.json, results.json."""
  os.makedirs(workdir)
  config = defaults.get_config()
  config.model.update(width=64, depth=4, num_heads=4, mlp_dim=128, patch_size=2)
  config.model.moe.update(num_experts=experts, num_selected=selected)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config.to_dict(), f)
  with open(os.path.join(workdir, 'dataset.json'), 'w') as f:
    json.dump({'num_train': 1280, 'num_classes': 10, 'image_shape': [8, 8, 1]}, f)
  results = {
    'num_params': 10_000 * experts,
    'test/accuracy': accuracy,
    'step_seconds': step_seconds,
    'eval_images_per_sec': 2000.0,
  }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f)


def test_sweep_aggregates_finished_runs_into_a_table_csv_and_plot(tmp_path, capsys):
  spec = sweep.parse_sweep(['model.moe.num_experts=4,8,16', 'model.moe.num_selected=1,2'])
  runs = sweep.expand(spec, str(tmp_path))
  for run in runs:
    experts = int(run.overrides['model.moe.num_experts'])
    selected = int(run.overrides['model.moe.num_selected'])
    if (experts, selected) != (16, 2):  # One run has not finished.
      fake_run(run.workdir, experts, selected, 0.5 + experts / 100, 0.01 * selected)
  argv = [
    '--config=configs/digits_switch.py',
    f'--workdir={tmp_path}',
    '--sweep=model.moe.num_experts=4,8,16',
    '--sweep=model.moe.num_selected=1,2',
    '--aggregate_only',
  ]
  assert sweep.main(argv) == 0
  table = (tmp_path / 'results.md').read_text().splitlines()
  assert table[0].startswith('| model | experts | parameters | test accuracy | training time')
  assert [line.split(' | ')[1] for line in table[2:]] == ['4', '8', '16', '4', '8']
  assert table[2].startswith('| Switch-ViT 64/4x4/128 p2, K=1 every_2 | 4 | 40,000 | 54.00% |')
  assert table[5].startswith('| V-MoE 64/4x4/128 p2, K=2 every_2 | 4 |')
  assert '| 0.2 |' in table[5]  # 10 steps per epoch x 0.02 s.
  with open(tmp_path / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 5 and rows[0]['workdir'].endswith('num_experts=4,num_selected=1')
  png = (tmp_path / 'results.png').read_bytes()
  assert png.startswith(b'\x89PNG') and len(png) > 10_000
  assert '5 of 6 runs finished' in capsys.readouterr().out


@pytest.mark.slow
def test_sweep_runs_end_to_end(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      'launch/sweep.py',
      '--config=configs/digits_switch.py',
      '--sweep',
      'model.moe.num_experts=2,4',
      f'--workdir={tmp_path}',
      '--config.model.width=16',
      '--config.model.depth=2',
      '--config.model.num_heads=2',
      '--config.model.mlp_dim=32',
      '--config.train.num_steps=4',
      '--config.train.log_every=2',
      '--config.train.eval_every=0',
      '--config.schedule.warmup_steps=1',
      '--config.schedule.cooldown_steps=1',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert '2 of 2 runs finished' in result.stdout
  # Each run's progress lines reach the console; the full output is in its train.log.
  assert '[1/2] num_experts=2: step 2/4' in result.stdout
  assert '[2/2] num_experts=4: Final: step 4' in result.stdout
  assert 'Mesh' in (tmp_path / 'num_experts=2' / 'train.log').read_text()
  table = (tmp_path / 'results.md').read_text().splitlines()
  assert [line.split(' | ')[1] for line in table[2:]] == ['2', '4']
  assert (tmp_path / 'results.png').exists() and (tmp_path / 'results.csv').exists()
  # Running it again skips the finished runs.
  again = subprocess.run(
    [sys.executable, 'launch/sweep.py', *result.args[2:]],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert again.returncode == 0 and again.stdout.count('done already') == 2


# --------------------------------------------------------------------------- fashion_table


def test_fashion_capacity_table_pairs_bpr_and_vanilla_by_run():
  """The BPR margin is computed per trained run, then averaged.

  Two seeds' runs, one much better than the other: at C=0.25 BPR gains 0.4
  and 0.2 points, so the paired margin is +0.30 with a std of 0.14 (sqrt of
  ((0.1)^2 + (0.1)^2) / 1), while the columns' stds are 1.41 and 1.56: the
  model-to-model spread the pairing removes. At C=0.5 BPR loses on one run.
  """
  fashion_table = load('fashion_table')

  def setting(workdir, c, bpr, accuracy):
    return dict(
      name='switch',
      workdir=workdir,
      capacity_factor=c,
      batch_priority=bpr,
      accuracy=accuracy,
      kept_share=c / 2,
      expert_flops_per_image=1e6 * c,
    )

  sweeps = [
    setting('s0', 0.25, False, 0.870),
    setting('s0', 0.25, True, 0.874),
    setting('s1', 0.25, False, 0.850),
    setting('s1', 0.25, True, 0.852),
    setting('s0', 0.5, False, 0.880),
    setting('s0', 0.5, True, 0.879),
    setting('s1', 0.5, False, 0.860),
    setting('s1', 0.5, True, 0.863),
  ]
  text, _ = fashion_table.capacity_table(list(reversed(sweeps)))
  rows = {line.split(' | ')[1]: line for line in text.splitlines()[2:]}
  assert '| 86.00 ± 1.41% | 86.30 ± 1.56% | +0.30 ± 0.14 | 2/2 |' in rows['0.25']
  assert '| +0.10 ± 0.28 | 1/2 |' in rows['0.5']
  # A run evaluated one way only has no pair and is left out of the margin.
  text, _ = fashion_table.capacity_table(sweeps[:3])
  assert '| +0.40 | 1/1 |' in text.splitlines()[2]
