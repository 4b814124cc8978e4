"""The one exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input or a missing prerequisite: reported as one line, no traceback, exit code 2."""
