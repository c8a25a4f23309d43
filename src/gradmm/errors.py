"""The exception types every command reports in one line: bad input, and being stopped."""

import sys


class UserError(Exception):
    """Bad input (missing file, malformed data, invalid option).

    The CLI reports it as one line on stderr and exits with status 2; it never carries a traceback.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the CLI's signal handler so that it unwinds like Ctrl-C: every stage's
    cleanup runs and the command says what was kept (exit status 143)."""


def stopped_keeping(error: KeyboardInterrupt, kept: str) -> KeyboardInterrupt:
    """``error`` (Ctrl-C or SIGTERM) annotated with what the interrupted stage kept, for the
    CLI's message; re-raise it."""
    error.kept = kept  # type: ignore[attr-defined]
    return error


def describe(error: BaseException, limit: int = 400) -> str:
    """A library's exception as one line: its whole message with newlines folded (libraries put
    the useful part anywhere), cut at ``limit`` characters; the type name if it has none."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def warn(message: str) -> None:
    """One warning line on stderr (settings that are allowed but probably a mistake)."""
    print(f"gradmm: warning: {message}", file=sys.stderr)
