"""Expected failures. The CLI turns BadInput into one line on stderr and exit code 2 (no traceback unless --debug)."""


class BadInput(Exception):
    """Input the user can fix: a file, tensor or config field that is wrong, missing or unsupported.

    The message names the offending file/tensor/field and, where it helps, what to do.
    """
