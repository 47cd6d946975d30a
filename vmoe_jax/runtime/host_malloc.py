"""Keeps XLA's CPU temporaries resident between steps (glibc hosts, CPU only).

XLA's CPU runtime allocates an executable's temporary buffers with one
`malloc` per run (1.17 GB for the dense step of `vmoe_jax.bench`'s default
case, 1.35 GB at 64 experts). glibc serves a request that large with a fresh
`mmap` and returns it with `munmap` when the run ends, so every step faults in
and zeroes all of that memory again: on the 2-core CI machine, about 350,000
minor page faults and 0.6 s of system time in a 1.4 s train step.

With the glibc tunables below, allocations come from one heap that is never
trimmed (memory freed by a step is reused by the next, without faults), and
large heap regions are backed by transparent huge pages. The same step then
takes about 1.03 s, with no page faults (README, "Performance").

glibc reads `GLIBC_TUNABLES` only when a process starts, so the entry points
(`vmoe_jax.main`, `.bench`, `.profile_moe`, `.evaluate`) call `maybe_reexec()`
first: where it applies, it replaces the process (same PID, same argv) by one
started with the tunables. It applies on Linux with glibc when JAX will run on
the CPU only: no GPU/TPU plugin is installed, or `JAX_PLATFORMS=cpu`. On an
accelerator host the host allocator is left alone (one malloc arena would
serialise the input pipeline's threads). `VMOE_JAX_HOST_MALLOC=0` turns it
off; `=1` turns it on on any glibc host.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys
from collections.abc import Mapping

SWITCH = 'VMOE_JAX_HOST_MALLOC'
TUNABLES = (
  ('glibc.malloc.arena_max', '1'),  # Every thread allocates from the main heap...
  ('glibc.malloc.mmap_max', '0'),  # ...which serves large requests too (no mmap)...
  ('glibc.malloc.trim_threshold', str(1 << 40)),  # ...and keeps what is freed.
  ('glibc.malloc.hugetlb', '1'),  # Transparent huge pages for the heap.
)


def accelerator_plugins() -> list[str]:
  """Installed JAX plugins for GPUs/TPUs (names), without importing JAX."""
  found = [ep.name for ep in importlib.metadata.entry_points(group='jax_plugins')]
  namespace = importlib.util.find_spec('jax_plugins')
  if namespace is not None and namespace.submodule_search_locations:
    found += [m.name for m in pkgutil.iter_modules(namespace.submodule_search_locations)]
  if importlib.util.find_spec('libtpu') is not None:
    found.append('libtpu')
  return found


def cpu_only(environ: Mapping[str, str], plugins: list[str]) -> bool:
  """Whether JAX will run on the CPU alone."""
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms:
    return all(p == 'cpu' for p in platforms)
  return not plugins


def merged_tunables(current: str) -> str:
  """`current` GLIBC_TUNABLES with ours added; settings already there are kept."""
  items = [item for item in current.split(':') if item]
  present = {item.split('=', 1)[0] for item in items}
  items += [f'{key}={value}' for key, value in TUNABLES if key not in present]
  return ':'.join(items)


def wanted(environ: Mapping[str, str], plugins: list[str], is_glibc_linux: bool) -> bool:
  """Whether to restart this process with the tunables."""
  switch = environ.get(SWITCH, '')
  if switch not in ('', '0', '1'):
    raise ValueError(f'{SWITCH}={switch!r}: use 0 (off), 1 (on) or leave it unset (auto).')
  if switch == '0' or not is_glibc_linux:
    return False
  current = environ.get('GLIBC_TUNABLES', '')
  if merged_tunables(current) == current:
    return False  # Already started with them (or the user chose every value).
  return switch == '1' or cpu_only(environ, plugins)


def _is_glibc_linux() -> bool:
  return sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'


def maybe_reexec() -> None:
  """Restarts this process with the tunables where they apply (see the module docstring).

  Call before anything else in an entry point's `if __name__ == '__main__'`.
  """
  try:
    restart = wanted(os.environ, accelerator_plugins(), _is_glibc_linux())
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if not restart:
    return
  environ = dict(os.environ)
  environ['GLIBC_TUNABLES'] = merged_tunables(environ.get('GLIBC_TUNABLES', ''))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
