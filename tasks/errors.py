"""The one exception type for expected failures: bad configuration or bad input."""


class TlflowError(Exception):
    """An expected failure the user can fix; the CLI prints it and exits with code 2."""

    exit_code = 2
