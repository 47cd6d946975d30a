"""The one exception type for problems with what the user asked for, and the batch-split check."""


class UserError(ValueError):
  """Bad input (config, data, checkpoint, devices) that the user can fix.

  `python -m vmoe_jax.main` prints its message as one line and exits with
  status 2 instead of a traceback. Messages name the bad value and the fix.
  """


def check_split(value: int, count: int, name: str, over: str, fix: str, positive: bool = False):
  """The one batch-split check: `count` must divide `value` (and `value` > 0 if `positive`).

  Raises UserError(f'{name} does not split over {over}; {fix}'), e.g.
  'input.batch_size=126 does not split over 4 processes; use a multiple of 4 ...'.
  """
  if (positive and value <= 0) or value % count:
    raise UserError(f'{name} does not split over {over}; {fix}')


def check_process_split(key: str, value: int, process_count: int) -> None:
  """A global batch size `key` (e.g. 'input.batch_size') must split over the processes."""
  check_split(
    value,
    process_count,
    f'{key}={value}',
    f'{process_count} processes',
    f'use a multiple of {process_count} that is also a multiple of the device count '
    f'(--config.{key}).',
  )
