"""The base classes of errors (and warnings) caused by the user's input rather than by a bug.

The CLI prints these as one clear message (no traceback) and exits with status 2 (`InputError`)
or 1 (`RunError`).
"""


class InputError(ValueError):
    """Bad input: a setting, file, row or schema entry. The message names it and says what to do."""


class RunError(RuntimeError):
    """A run cannot go on for a reason outside the code (full disk, stalled filesystem, a non-finite
    loss); the message says what happened and what to change."""


def check_whole(minimum: int, error: type[InputError] = InputError, **values: object) -> None:
    """Each value an int (not a bool) of at least `minimum`, or `error` naming it."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise error(f"{name}={value!r}: must be a whole number >= {minimum}")


class InputWarning(UserWarning):
    """Input that works but is probably not what was meant (e.g. more loader workers than CPUs)."""
