"""Exception types. The CLI turns any :class:`DualignError` into one line on stderr and exit code 2."""


class DualignError(Exception):
    """Base class of every error dualign raises on purpose."""


class InputError(DualignError, ValueError):
    """Bad user input: a file, row, column, key or value that is wrong. The message names it."""


class ConfigError(InputError):
    """An unknown, misspelled, missing or ill-typed configuration key."""


class InfeasibleConstraintError(InputError):
    """No finite λ* exists: a threshold lies above what any reweighting of the samples reaches."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
