"""The one exception type for bad user input."""

import sys


class UserError(Exception):
    """Bad input (missing file, malformed data, invalid option).

    The CLI reports it as one line on stderr and exits with status 2; it never carries a traceback.
    """


def warn(message: str) -> None:
    """One warning line on stderr (settings that are allowed but probably a mistake)."""
    print(f"gradmm: warning: {message}", file=sys.stderr)
