"""User-facing errors.

Anything the user can fix (a bad path, a bad config value, malformed data) raises `UserError`. The entry
point prints its message as one line and exits non-zero, so a user never sees a deep JAX traceback for a
mistake of their own.
"""


class UserError(Exception):
  """A problem with the user's input, config or environment; the message names the file/field and the fix."""


class DataError(UserError):
  """Malformed or missing data: the message names the offending file and what is wrong with it."""


class ConfigError(UserError):
  """An invalid configuration value."""


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the last good checkpoint is left untouched."""
