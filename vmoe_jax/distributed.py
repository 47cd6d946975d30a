"""Joining a multi-process (multi-host) run through `jax.distributed`.

The run is described by, in order of precedence:
  1. explicit settings: VMOE_COORDINATOR_ADDRESS (host:port),
     VMOE_NUM_PROCESSES and VMOE_PROCESS_ID (set by `launch/local.sh`);
  2. a cluster that JAX detects by itself (SLURM with several tasks, Cloud
     TPU pod slices, ...), when VMOE_DISTRIBUTED=auto;
  3. otherwise a single process: nothing to do.
"""

from __future__ import annotations

import logging
import os

import jax

from vmoe_jax.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 300


def initialize_from_env(timeout_seconds: int | None = None) -> None:
  """Calls `jax.distributed.initialize` when the environment describes a multi-process run."""
  env = os.environ
  timeout = int(timeout_seconds or env.get('VMOE_INIT_TIMEOUT', DEFAULT_TIMEOUT_SECONDS))
  address = env.get('VMOE_COORDINATOR_ADDRESS')
  if address:
    try:
      num_processes = int(env['VMOE_NUM_PROCESSES'])
      process_id = int(env['VMOE_PROCESS_ID'])
    except (KeyError, ValueError):
      raise UserError(
        'VMOE_COORDINATOR_ADDRESS is set, so VMOE_NUM_PROCESSES and VMOE_PROCESS_ID must be '
        'integers too.'
      ) from None
    if not 0 <= process_id < num_processes:
      raise UserError(f'VMOE_PROCESS_ID={process_id} is outside 0..{num_processes - 1}.')
    _initialize(address, num_processes, process_id, timeout)
  elif env.get('VMOE_DISTRIBUTED') == 'auto':
    _initialize(None, None, None, timeout)


def _initialize(address, num_processes, process_id, timeout: int) -> None:
  log.info(
    'Joining a %s-process run via %s (process %s).',
    num_processes or 'detected',
    address or 'cluster detection',
    process_id,
  )
  try:
    jax.distributed.initialize(
      coordinator_address=address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=timeout,
    )
  except Exception as e:  # pylint: disable=broad-except
    lines = str(e).strip().splitlines() or [type(e).__name__]
    raise UserError(
      f'could not join the multi-process run at {address or "the detected coordinator"} within '
      f'{timeout}s ({lines[0][:200]}); check that process 0 runs and the address is reachable.'
    ) from None
  log.info(
    'Process %d of %d; %d local of %d devices.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
