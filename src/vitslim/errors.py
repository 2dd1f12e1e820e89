"""User-facing errors.

A ``VitslimError`` is a problem with what the user asked for (a path, a model name, an option):
the CLI prints its message on one line and exits non-zero, with no traceback. Anything else is
a bug and keeps its traceback.
"""


class VitslimError(Exception):
    """A problem with the user's input, stated so that the message alone says what to do."""
