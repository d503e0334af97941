"""The one exception type for mistakes a user can fix (bad config, missing data)."""


class UserError(ValueError):
  """Reported by the command line as one line, without a traceback."""
