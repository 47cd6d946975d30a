"""Tests run on the CPU with 8 fake devices (set before jax is imported).

Compiled programs are shared through JAX's persistent compilation cache in
one temporary directory per test session: the pytest-xdist workers and the
training subprocesses the tests start (kill -9 and resume, SIGTERM, two
processes against one) inherit it through the environment, so a program
that several tests or runs compile identically is compiled once. The cache
only skips XLA's compilation of an identical program (same HLO, flags,
devices and versions); what runs is the same executable. The directory is
removed when the session ends. `VMOE_JAX_TEST_JIT_CACHE=0` turns it off.
"""

import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = ' '.join(
  [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_CACHE_OWNER = False
if os.environ.get('VMOE_JAX_TEST_JIT_CACHE', '1') != '0' and (
  'JAX_COMPILATION_CACHE_DIR' not in os.environ
):
  # The first process to load this file (pytest itself, or the xdist
  # controller before it starts its workers) creates the directory.
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='vmoe_jax_test_jit_cache_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
  _CACHE_OWNER = True


def pytest_unconfigure(config):
  del config
  if _CACHE_OWNER:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
