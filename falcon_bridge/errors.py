"""Expected failures. The CLI turns BadInput into one line on stderr and exit code 2 (no traceback unless --debug)."""


class BadInput(Exception):
    """Input the user can fix: a file, tensor or config field that is wrong, missing or unsupported.

    The message names the offending file/tensor/field and, where it helps, what to do.
    """



class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised where the program is so that every `finally` (removing a partial output) runs.
    A BaseException: library code that catches Exception does not swallow it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def root_cause(e: BaseException) -> BaseException:
    """DCP wraps what failed on each rank (even an interrupt) in a CheckpointException's `failures`."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        return cause[0] if isinstance(cause, tuple) else cause
    return e


def first_line(e: BaseException) -> str:
    """A one-line description of an exception raised by a library."""
    e = root_cause(e)
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
