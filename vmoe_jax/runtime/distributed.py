"""Joining a multi-process (multi-host) run through JAX's multi-controller runtime.

Every process of a run executes the same `python -m vmoe_jax.main ...`;
`jax.distributed.initialize` connects them to a coordinator served by process
0, after which `jax.devices()` lists the devices of all processes and jitted
computations (collectives included) span them. Each process feeds its own rows
of every global batch (`input_pipeline`), process 0 alone writes metrics,
config and results, and every process writes its shards of a checkpoint.

Where the description of the run comes from, the first that applies wins, field
by field:

  1. flags of `main`: --coordinator_address=host:port, --num_processes,
     --process_id, --distributed_timeout;
  2. the environment: VMOE_COORDINATOR_ADDRESS, VMOE_NUM_PROCESSES,
     VMOE_PROCESS_ID, VMOE_DISTRIBUTED_TIMEOUT;
  3. a cluster that describes itself, read by JAX's own cluster detection: a
     SLURM job step with several tasks (SLURM_NTASKS > 1, one process per task),
     a Cloud TPU slice on GKE (TPU_WORKER_HOSTNAMES lists several hosts), a
     multislice TPU run (MEGASCALE_COORDINATOR_ADDRESS), an Open MPI job
     started by mpirun with several ranks (OMPI_COMM_WORLD_SIZE > 1);
  4. none of these: a single process, nothing to join.

--distributed=on (VMOE_DISTRIBUTED=on) always joins, leaving what the flags and
environment do not say to JAX's detection; use it where the cluster is only
known to JAX's detection (Cloud TPU VM pods read their workers from the
metadata server). --distributed=off never joins.

Processes on CPUs exchange data through gloo (TCP) collectives.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping

from vmoe_jax.errors import UserError

log = logging.getLogger(__name__)

MODES = ('auto', 'on', 'off')
DEFAULT_TIMEOUT_SECONDS = 300
CPU_COLLECTIVES = 'gloo'


@dataclasses.dataclass(frozen=True)
class Settings:
  """How this process joins a run; None fields are left to JAX's cluster detection."""

  mode: str = 'auto'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS

  @property
  def explicit(self) -> bool:
    return any(
      v is not None for v in (self.coordinator_address, self.num_processes, self.process_id)
    )


def _env_int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f'{name}={value!r} is not an integer; set it to a whole number.') from None


def resolve(
  mode: str | None = None,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  timeout_seconds: int | None = None,
  env: Mapping[str, str] | None = None,
) -> Settings:
  """Settings from flag values (None: not given), falling back on the environment."""
  env = os.environ if env is None else env
  mode = mode or env.get('VMOE_DISTRIBUTED') or 'auto'
  if mode not in MODES:
    raise UserError(f'--distributed={mode!r} is unknown; use one of {", ".join(MODES)}.')
  pick = lambda flag, name: flag if flag is not None else _env_int(env, name)
  timeout = pick(timeout_seconds, 'VMOE_DISTRIBUTED_TIMEOUT')
  settings = Settings(
    mode=mode,
    coordinator_address=coordinator_address or env.get('VMOE_COORDINATOR_ADDRESS') or None,
    num_processes=pick(num_processes, 'VMOE_NUM_PROCESSES'),
    process_id=pick(process_id, 'VMOE_PROCESS_ID'),
    timeout_seconds=DEFAULT_TIMEOUT_SECONDS if timeout is None else timeout,
  )
  _validate(settings)
  return settings


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(':')
  if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
    raise UserError(
      f'--coordinator_address={address!r} is not host:port; give the address of process 0 '
      'and a free port, e.g. --coordinator_address=10.0.0.1:12345.'
    )
  return host.strip('[]'), int(port)


def _validate(settings: Settings) -> None:
  if settings.timeout_seconds <= 0:
    raise UserError(
      f'--distributed_timeout={settings.timeout_seconds}; give a number of seconds > 0.'
    )
  if settings.coordinator_address:
    _split_address(settings.coordinator_address)
  num, pid = settings.num_processes, settings.process_id
  if num is not None and num < 1:
    raise UserError(f'--num_processes={num}; a run needs at least 1 process.')
  if num is not None and pid is not None and not 0 <= pid < num:
    raise UserError(
      f'--process_id={pid} is outside 0..{num - 1} for --num_processes={num}; number the '
      'processes from 0.'
    )


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """The multi-process cluster that the environment describes, or None.

  Only decides *whether* to join; the coordinator, process count and id are
  then read by `jax.distributed.initialize`'s own cluster detection.
  """
  env = os.environ if env is None else env
  slurm_step = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')
  if all(k in env for k in slurm_step) and (_env_int(env, 'SLURM_NTASKS') or 1) > 1:
    return 'slurm'
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]
  if len(hosts) > 1 or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu'
  if 'OMPI_MCA_orte_hnp_uri' in env and (_env_int(env, 'OMPI_COMM_WORLD_SIZE') or 1) > 1:
    return 'ompi'  # Started by mpirun / mpiexec.
  return None


def plan(settings: Settings, env: Mapping[str, str] | None = None) -> dict | None:
  """Keyword arguments for `jax.distributed.initialize`, or None for one process."""
  if settings.mode == 'off':
    return None
  cluster = detect_cluster(env)
  if settings.mode == 'auto' and not settings.explicit and cluster is None:
    return None
  if settings.mode == 'auto' and cluster is None:
    missing = [
      flag
      for flag, value in (
        ('--coordinator_address', settings.coordinator_address),
        ('--num_processes', settings.num_processes),
        ('--process_id', settings.process_id),
      )
      if value is None
    ]
    if missing:
      raise UserError(
        f'a multi-process run needs --coordinator_address, --num_processes and --process_id '
        f'(or VMOE_* variables); {", ".join(missing)} missing, and no SLURM/TPU cluster was '
        'detected.'
      )
  return dict(
    coordinator_address=settings.coordinator_address,
    num_processes=settings.num_processes,
    process_id=settings.process_id,
    initialization_timeout=settings.timeout_seconds,
  )


def initialize(settings: Settings) -> bool:
  """Joins the run that `settings` (and the environment) describe; False for one process."""
  kwargs = plan(settings)
  if kwargs is None:
    return False
  import jax  # pylint: disable=g-import-not-at-top

  _use_cpu_collectives(jax)
  address, pid = kwargs['coordinator_address'], kwargs['process_id']
  timeout = kwargs['initialization_timeout']
  log.info(
    'Joining a %s-process run at %s as process %s (timeout %ds).',
    kwargs['num_processes'] or 'detected',
    address or 'the detected coordinator',
    'detected' if pid is None else pid,
    timeout,
  )
  start = time.monotonic()
  if address and pid == 0:
    check_port_free(address)  # JAX may crash, not raise, when it cannot serve there.
  elif address and pid is not None:
    wait_for_coordinator(address, timeout)
  remaining = max(1, int(timeout - (time.monotonic() - start)))
  where = address or 'the detected coordinator'
  count = f'{kwargs["num_processes"]} ' if kwargs['num_processes'] else ''
  with _Watchdog(
    remaining,
    f'error: not all {count}processes joined the run at {where} within {timeout}s; start '
    'every process with the same --coordinator_address and --num_processes and ids 0..N-1, '
    'or raise --distributed_timeout.',
  ):
    try:
      # JAX gets a little longer than the watchdog, which speaks first.
      jax.distributed.initialize(**{**kwargs, 'initialization_timeout': remaining + 10})
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(
        f'could not join the multi-process run at {where} ({_first_line(e)}); if this is '
        'process 0, is the port free? Otherwise check the address, --num_processes and '
        '--process_id.'
      ) from None
  log.info(
    'Process %d of %d; %d local of %d devices.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:200]}' if lines else type(error).__name__


def _use_cpu_collectives(jax) -> None:
  """Gloo collectives for CPU devices, unless JAX_CPU_COLLECTIVES_IMPLEMENTATION says otherwise."""
  if os.environ.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
    return
  try:
    jax.config.update('jax_cpu_collectives_implementation', CPU_COLLECTIVES)
  except (AttributeError, ValueError):  # A JAX without the option: it has no choice to make.
    pass


def check_port_free(address: str) -> None:
  """Process 0 serves the coordinator on every interface at the port of `address`."""
  _, port = _split_address(address)
  family, host = (socket.AF_INET6, '::') if socket.has_ipv6 else (socket.AF_INET, '')
  try:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      probe.bind((host, port))
  except OSError as e:
    raise UserError(
      f'process 0 cannot serve the coordinator on port {port} of this host ({e.strerror or e}); '
      'pick a free port in --coordinator_address (the same on every process).'
    ) from None


def wait_for_coordinator(address: str, timeout_seconds: float) -> None:
  """Waits until something accepts TCP connections at `address` (process 0's coordinator)."""
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      with socket.create_connection((host, port), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(
          f'the coordinator at {address} could not be reached within {timeout_seconds:g}s '
          f'({e.strerror or e}); start process 0 there first, check the host and port of '
          '--coordinator_address, or raise --distributed_timeout.'
        ) from None
      time.sleep(0.5)


class _Watchdog:
  """Ends the process with a one-line error if the block outlives `seconds`.

  `jax.distributed.initialize` aborts the interpreter (a C++ check failure and
  a stack trace) when processes fail to meet in time; this says why first.
  """

  def __init__(self, seconds: float, message: str):
    self._seconds, self._message = seconds, message
    self._done = threading.Event()

  def _watch(self):
    if not self._done.wait(self._seconds):
      print(self._message, file=sys.stderr, flush=True)
      os._exit(2)

  def __enter__(self):
    threading.Thread(target=self._watch, daemon=True, name='vmoe-join-watchdog').start()
    return self

  def __exit__(self, *exc):
    self._done.set()


def check_devices() -> None:
  """Every process must bring the same number of devices (the mesh and batch assume it)."""
  import jax  # pylint: disable=g-import-not-at-top

  counts = {}
  for device in jax.devices():
    counts[device.process_index] = counts.get(device.process_index, 0) + 1
  if len(set(counts.values())) > 1 or len(counts) != jax.process_count():
    summary = ', '.join(f'process {p}: {n}' for p, n in sorted(counts.items()))
    raise UserError(
      f'the {jax.process_count()} processes have different numbers of devices ({summary}); '
      'give every process the same number (one process per host or per accelerator, '
      'XLA_FLAGS=--xla_force_host_platform_device_count=M on CPUs).'
    )
