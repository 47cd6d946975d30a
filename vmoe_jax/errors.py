"""The one exception type for problems with what the user asked for."""


class UserError(ValueError):
  """Bad input (config, data, checkpoint, devices) that the user can fix.

  `python -m vmoe_jax.main` prints its message as one line and exits with
  status 2 instead of a traceback. Messages name the bad value and the fix.
  """
