"""The one base class of errors caused by the user's input rather than by a bug.

The CLI prints these as one clear message (no traceback) and exits with status 2.
"""


class InputError(ValueError):
    """Bad input: a setting, file, row or schema entry. The message names it and says what to do."""
