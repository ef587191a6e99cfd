"""The one error type users see: a message that names the problem and the fix."""


class VggkitError(ValueError):
    """Bad input from the user. The CLI prints it as one line and exits with code 2."""
