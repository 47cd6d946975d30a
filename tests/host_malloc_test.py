"""The glibc restart of CPU entry points: when it applies, and that it stops the page faults."""

import os
import subprocess
import sys
import textwrap

import pytest

from vmoe_jax.runtime import host_malloc

OURS = host_malloc.merged_tunables('')


@pytest.mark.parametrize(
  'environ, plugins, glibc, expected',
  [
    ({}, [], True, True),  # CPU-only host.
    ({}, ['xla_cuda12'], True, False),  # A GPU plugin: JAX would pick the GPU.
    ({'JAX_PLATFORMS': 'cpu'}, ['xla_cuda12'], True, True),  # ...unless told to use the CPU.
    ({'JAX_PLATFORMS': 'cuda,cpu'}, [], True, False),
    ({'VMOE_JAX_HOST_MALLOC': '0'}, [], True, False),  # Turned off.
    ({'VMOE_JAX_HOST_MALLOC': '1'}, ['libtpu'], True, True),  # Forced on.
    ({'VMOE_JAX_HOST_MALLOC': '1'}, [], False, False),  # Not glibc: nothing to tune.
    ({'GLIBC_TUNABLES': OURS}, [], True, False),  # Restarted already: no loop.
  ],
)
def test_wanted(environ, plugins, glibc, expected):
  assert host_malloc.wanted(environ, plugins, glibc) is expected


def test_bad_switch_is_one_clear_error():
  with pytest.raises(ValueError, match=r"VMOE_JAX_HOST_MALLOC='yes'.*0 \(off\), 1 \(on\)"):
    host_malloc.wanted({'VMOE_JAX_HOST_MALLOC': 'yes'}, [], True)


def test_user_settings_are_kept():
  merged = host_malloc.merged_tunables('glibc.malloc.arena_max=4:glibc.cpu.x86_shstk=off')
  items = merged.split(':')
  assert items[:2] == ['glibc.malloc.arena_max=4', 'glibc.cpu.x86_shstk=off']
  assert 'glibc.malloc.arena_max=1' not in items
  assert 'glibc.malloc.mmap_max=0' in items and 'glibc.malloc.hugetlb=1' in items


# Runs a jitted step whose XLA temporary is a 64 MiB matrix product, after the
# entry-point call; prints pid before/after the restart, argv, and the minor
# page faults of one warm run.
SCRIPT = textwrap.dedent(
  """
  import os, resource, sys
  from vmoe_jax.runtime import host_malloc
  if __name__ == '__main__':
    print('pid', os.getpid(), flush=True)
    host_malloc.maybe_reexec()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda a, b, c: (a @ b) @ c)
    a, b, c = jnp.ones((16384, 64)), jnp.ones((64, 1024)), jnp.ones((1024, 8))
    for _ in range(3):
      f(a, b, c).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
      f(a, b, c).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    print('argv', *sys.argv[1:])
    print('tunables', os.environ.get('GLIBC_TUNABLES', ''))
    print('faults', faults)
  """
)


def _run(tmp_path, switch):
  script = tmp_path / 'step.py'
  script.write_text(SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(VMOE_JAX_HOST_MALLOC=switch, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run(
    [sys.executable, str(script), '--x=1', 'y'],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  ).stdout.split('\n')
  return {line.split(' ', 1)[0]: line.split(' ', 1)[1:] for line in out if line}, out


@pytest.mark.skipif(
  not (sys.platform.startswith('linux') and os.confstr('CS_GNU_LIBC_VERSION')),
  reason='glibc tunables exist on glibc Linux only',
)
def test_restart_keeps_the_process_and_stops_page_faults(tmp_path):
  on, lines = _run(tmp_path, '1')
  off, _ = _run(tmp_path, '0')
  # One process: the restart replaced it (same pid printed twice), argv intact.
  pids = [line for line in lines if line.startswith('pid ')]
  assert len(pids) == 2 and pids[0] == pids[1]
  assert on['argv'] == ['--x=1 y']
  assert on['tunables'] == [OURS] and off['tunables'] == ['']
  # Without the tunables the 64 MiB temporary is mapped afresh every run
  # (16,384 pages of 4 KiB); with them it stays in the heap.
  assert float(off['faults'][0]) > 8000
  assert float(on['faults'][0]) < 1000
