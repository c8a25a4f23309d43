"""The one exception type for bad user input."""


class UserError(Exception):
    """Bad input (missing file, malformed data, invalid option).

    The CLI reports it as one line on stderr and exits with status 2; it never carries a traceback.
    """
