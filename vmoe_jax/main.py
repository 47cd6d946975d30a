r"""Command line entry point; kept short on purpose.

  python -m vmoe_jax.main --config=configs/digits_switch.py --workdir=/tmp/run \
      [--config.model.moe.num_experts=16 ...]

Parses flags, checks the config (`validation.validate`: every check that
needs no device, before anything is written to the workdir or processes wait
for each other), joins a multi-process run when the flags or the environment
describe one (see `distributed`; every process runs this same command), and
calls `train.train_and_evaluate(config, workdir)`, which checks the config
against the devices and processes of the run. Problems the user can fix (bad
config keys or values, a bad `:ARG` of a config file, missing data,
unreadable checkpoints, processes that cannot meet) are printed as one line,
exit status 2.
"""

import logging
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from vmoe_jax.errors import UserError
from vmoe_jax.runtime import host_malloc
from vmoe_jax.schema import defaults

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to a config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
# Multi-process runs; these take precedence over VMOE_* variables and SLURM/TPU detection.
_DISTRIBUTED = flags.DEFINE_enum(
  'distributed',
  None,
  ['auto', 'on', 'off'],
  'Join a multi-process run: auto (when flags, VMOE_* variables or a SLURM/TPU cluster say '
  'so; the default), on (always, JAX detects what is not given), off (never).',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0, which serves the coordinator.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0..num_processes-1.')
_TIMEOUT = flags.DEFINE_integer(
  'distributed_timeout', None, 'Seconds to wait for all processes to join (default 300).'
)


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _user_error(error: BaseException | None) -> UserError | None:
  """The one-line UserError that the flag parsers wrapped, if one is in the chain.

  A config file's get_config raising UserError (e.g. for an unknown `:ARG`)
  reaches us wrapped twice, by ml_collections and by absl.
  """
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, UserError) and '\n' not in str(error):
      found = error
    error = error.__cause__ or error.__context__
  return found


def _config_error(argv: list[str], error: Exception) -> str:
  """One line for a failed --config / --config.key=value flag."""
  wrapped = _user_error(error)
  if wrapped is not None:
    return str(wrapped)
  for arg in argv:
    if arg.startswith('--config.'):
      path = arg[len('--config.') :].split('=', 1)[0]
      known = defaults.all_keys()
      inside = [key for key in known if key.startswith(path + '.')]
      if inside:  # A section (model.moe), not a key: say so rather than suggest a neighbour.
        return (
          f"'{path}' is a group of config keys, not a key; set one of its keys instead, e.g. "
          f'--config.{inside[0]}=... (all keys: vmoe_jax/schema/defaults.py).'
        )
      if path not in known:
        return defaults.unknown_key_message(path, known)
  return f'bad --config flag: {str(error).strip().splitlines()[-1][:300]}'


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    _fail(_config_error(argv, e))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; options look like --config.a.b=value.')
  if _CONFIG.value is None or _WORKDIR.value is None:
    _fail('both --config=configs/<name>.py and --workdir=DIR are needed.')
  config_file = config_flags.get_config_filename(flags.FLAGS['config']).split(':')[0]
  if not os.path.exists(config_file):
    _fail(f'config file {config_file!r} does not exist; pass --config=configs/<name>.py.')
  if os.path.isdir(config_file):
    names = sorted(n for n in os.listdir(config_file) if n.endswith('.py'))
    example = os.path.join(config_file, names[0]) if names else 'configs/<name>.py'
    _fail(f'--config={config_file} is a directory; pass a config file, e.g. --config={example}.')
  try:
    config = _CONFIG.value
  except (OSError, ValueError) as e:  # The file could not be loaded as a config file.
    _fail(_config_error([], e))
  # Our progress at INFO; libraries (orbax, jax) at WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('vmoe_jax').setLevel(logging.INFO)
  from vmoe_jax.schema import validation  # pylint: disable=g-import-not-at-top

  try:  # Values that are nonsense on any machine fail before processes wait for each other.
    validation.validate(config)
  except UserError as e:
    _fail(str(e))
  import jax  # pylint: disable=g-import-not-at-top

  from vmoe_jax import train  # pylint: disable=g-import-not-at-top
  from vmoe_jax.runtime import distributed  # pylint: disable=g-import-not-at-top

  try:
    settings = distributed.resolve(
      _DISTRIBUTED.value,
      _COORDINATOR.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      _TIMEOUT.value,
    )
    if distributed.initialize(settings):
      distributed.check_devices()
      if jax.process_index() > 0:  # Progress lines from process 0 only.
        logging.getLogger('vmoe_jax').setLevel(logging.WARNING)
    train.train_and_evaluate(config, _WORKDIR.value)
  except UserError as e:
    _fail(str(e))


if __name__ == '__main__':
  host_malloc.maybe_reexec()  # CPU hosts: restart with glibc tunables, see host_malloc.
  app.run(main, flags_parser=_parse_flags)
