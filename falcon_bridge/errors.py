"""Expected failures. The CLI turns BadInput into one line on stderr and exit code 2 (no traceback unless --debug)."""

import reprlib


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


class _BoundedRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # repr() of a huge integer takes quadratic time, and Python refuses it past 4300 digits
        if x.bit_length() > 4 * self.maxlong:
            return f"<{'negative ' if x < 0 else ''}integer of {x.bit_length():,} bits>"
        return super().repr_int(x, level)


_BOUNDED_REPR = _BoundedRepr(maxlevel=3, maxtuple=6, maxlist=6, maxdict=6, maxset=6, maxfrozenset=6, maxdeque=6,
                             maxstring=80, maxlong=80, maxother=80)


def shown(value, limit: int = 80) -> str:
    """A value from an input, as a message shows it: its repr, at most `limit` characters, made without rendering
    the whole value (a list nested through YAML aliases, or one of millions of items, would take minutes and
    gigabytes to render before being cut)."""
    text = _BOUNDED_REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


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


def printable(text: object) -> str:
    """User text (a path, a tensor name, a config value) for a one-line message: as it is, except that every
    character that is not printable (newline, tab, carriage return, ESC, an undecodable byte's surrogate) is
    written as its Python escape, so it can neither split the line nor drive the terminal. Idempotent: what it
    returns is printable."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
