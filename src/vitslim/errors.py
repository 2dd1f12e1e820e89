"""User-facing errors.

A ``VitslimError`` is a problem with what the user asked for (a path, a model name, an option):
the CLI prints its message on one line and exits non-zero, with no traceback. Anything else is
a bug and keeps its traceback.
"""


class VitslimError(Exception):
    """A problem with the user's input, stated so that the message alone says what to do."""


class ParameterError(VitslimError):
    """A bad value of one named parameter. The library names it as Python spells it
    (``speedup``, ``Training.epochs``); the CLI re-words the message with its own flag."""

    def __init__(self, parameter: str, problem: str) -> None:
        self.parameter, self.problem = parameter, problem
        super().__init__(f"{parameter} {problem}")

    def named(self, name: str) -> "ParameterError":
        """The same problem, said of ``name`` (a CLI flag)."""
        return ParameterError(name, self.problem)
