"""Tests run on the CPU with 8 fake devices (set before jax is imported).

Compiled programs are shared through JAX's persistent compilation cache in
one temporary directory per test session: the pytest-xdist workers and the
training subprocesses the tests start (kill -9 and resume, SIGTERM, two
processes against one) inherit it through the environment, so a program
that several tests or runs compile identically is compiled once. The cache
only skips XLA's compilation of an identical program (same HLO, flags,
devices and versions); what runs is the same executable. The directory is
removed when the session ends. `VMOE_JAX_TEST_JIT_CACHE=0` turns it off.

The tests' programs are tiny, so compiling them costs far more than running
them: `JAX_DISABLE_MOST_OPTIMIZATIONS=1` (JAX's switch for exactly that
case; it lowers XLA's LLVM optimisation level and skips its expensive
passes) is the default here, inherited by the subprocesses as well. The
HLO is the same; only the machine code made from it is less optimised, and
what the tests compare (sharded with unsharded, a resumed run with an
uninterrupted one) is compiled with the same options on both sides.
`VMOE_JAX_TEST_OPTIMIZE=1` compiles with XLA's full optimisation instead.

The README's command runs the files on 2 workers with `--dist loadfile`: a
worker takes the next whole file when it is free, so a file's module
fixtures (several train a small model) are built once. `HEAVY_FIRST` puts
the longest files first and leaves the short ones to fill the end, where
one long file started last would otherwise run alone.
"""

import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = ' '.join(
  [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
if os.environ.get('VMOE_JAX_TEST_OPTIMIZE', '0') != '1':
  os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

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


# The longest test files, longest first: the 40 slowest tests of
# `pytest --durations=40 -n 2` (2 cores), summed per file, from about 400 s
# for evaluate_test down to about 45 s for train_test.
HEAVY_FIRST = (
  'evaluate_test',
  'layer_test',
  'checkpointing_test',
  'bench_test',
  'integrity_test',
  'multiprocess_test',
  'input_pipeline_test',
  'launch_test',
  'warm_start_test',
  'train_test',
)


def pytest_collection_modifyitems(config, items):
  """The files of `HEAVY_FIRST` first, in its order; the rest as collected."""
  del config
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def pytest_unconfigure(config):
  del config
  if _CACHE_OWNER:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
