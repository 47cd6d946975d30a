#!/usr/bin/env python3
r"""Starts a multi-process run on this machine: N processes x M fake CPU devices each.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      --config=configs/digits_switch.py --workdir=/tmp/digits_2x4 --config.mesh.expert=4

Every process runs `python -m vmoe_jax.main` with the arguments after `--`,
plus --coordinator_address=localhost:PORT --num_processes=N --process_id=i,
with JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=M.
They meet through JAX's own runtime (`jax.distributed.initialize`, gloo
collectives), exactly as processes on separate hosts would: this is for tests
and for trying a multi-host configuration before renting the hosts.

Output lines are prefixed with the process id ([0], [1], ...). When a process
fails, the others are stopped; the exit status is the first failure's (0 when
all succeed). --dry_run prints the commands instead.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def free_port() -> int:
  """A TCP port that nothing listens on right now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(base: dict, devices_per_process: int) -> dict:
  """`base` with CPU as the platform and `devices_per_process` fake devices."""
  xla_flags = re.sub(rf'{DEVICE_COUNT_FLAG}=\S*', '', base.get('XLA_FLAGS', '')).split()
  xla_flags.append(f'{DEVICE_COUNT_FLAG}={devices_per_process}')
  return {**base, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join(xla_flags)}


def commands(args, main_args: list[str], port: int) -> list[list[str]]:
  address = f'localhost:{port}'
  return [
    [
      args.python,
      '-m',
      'vmoe_jax.main',
      *main_args,
      f'--coordinator_address={address}',
      f'--num_processes={args.num_processes}',
      f'--process_id={i}',
      *([f'--distributed_timeout={args.timeout}'] if args.timeout else []),
    ]
    for i in range(args.num_processes)
  ]


def _forward(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ''):
    out.write(f'{prefix}{line}')
    out.flush()
  stream.close()


def run(cmds: list[list[str]], env: dict, grace_seconds: float = 30.0) -> int:
  """Runs the processes, forwarding their output; stops all when one fails."""
  processes, threads = [], []
  for i, cmd in enumerate(cmds):
    process = subprocess.Popen(
      cmd,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      bufsize=1,
      start_new_session=True,  # Ctrl-C reaches them through us, once.
    )
    processes.append(process)
    thread = threading.Thread(target=_forward, args=(process.stdout, f'[{i}] ', sys.stdout))
    thread.start()
    threads.append(thread)

  status = 0
  try:
    remaining = set(range(len(processes)))
    while remaining:
      for i in sorted(remaining):
        code = processes[i].poll()
        if code is None:
          continue
        remaining.discard(i)
        if code != 0 and status == 0:
          status = code
          print(f'[launch] process {i} exited with status {code}; stopping the others.')
          _stop(processes, grace_seconds)
      time.sleep(0.1)
  except KeyboardInterrupt:
    print('[launch] interrupted; stopping all processes (they save a checkpoint).')
    _stop(processes, grace_seconds)
    status = status or 130
  for thread in threads:
    thread.join()
  return status


def _stop(processes, grace_seconds: float) -> None:
  """SIGTERM (the trainer checkpoints and stops), then SIGKILL after `grace_seconds`."""
  for process in processes:
    if process.poll() is None:
      process.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_seconds
  for process in processes:
    try:
      process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


def parse_args(argv: list[str]):
  if '--' in argv:
    split = argv.index('--')
    own, main_args = argv[:split], argv[split + 1 :]
  else:
    own, main_args = argv, []
  parser = argparse.ArgumentParser(
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    usage='launch/local.py [options] -- --config=... --workdir=... [--config.key=value ...]',
  )
  parser.add_argument('--num_processes', type=int, default=2, help='processes to start (2)')
  parser.add_argument(
    '--devices_per_process', type=int, default=4, help='fake CPU devices per process (4)'
  )
  parser.add_argument('--port', type=int, default=0, help='coordinator port (0: a free one)')
  parser.add_argument('--timeout', type=int, default=0, help='--distributed_timeout (s)')
  parser.add_argument('--python', default=sys.executable, help='interpreter (this one)')
  parser.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  args = parser.parse_args(own)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error(
      f'--num_processes={args.num_processes} and --devices_per_process='
      f'{args.devices_per_process} must both be >= 1.'
    )
  if not main_args:
    parser.error('give the arguments of vmoe_jax.main after --, e.g. -- --config=... --workdir=...')
  return args, main_args


def main(argv: list[str]) -> int:
  args, main_args = parse_args(argv)
  port = args.port or free_port()
  cmds = commands(args, main_args, port)
  env = process_env(dict(os.environ), args.devices_per_process)
  if args.dry_run:
    prefix = f'JAX_PLATFORMS=cpu XLA_FLAGS={shlex.quote(env["XLA_FLAGS"])}'
    for cmd in cmds:
      print(f'{prefix} {shlex.join(cmd)} &')
    print('wait')
    return 0
  print(
    f'[launch] {args.num_processes} processes x {args.devices_per_process} CPU devices, '
    f'coordinator localhost:{port}'
  )
  signal.signal(signal.SIGTERM, _raise_interrupt)
  return run(cmds, env)


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
