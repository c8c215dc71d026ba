"""Errors of the parallel layer that a user causes (a layout that does not fit the world or the model).

`parallel` never imports `distill`, so it has its own error type; the CLI reports it like any other
user error (exit code 2, one paragraph).
"""


class ParallelConfigError(ValueError):
    """A parallel layout or model architecture the user asked for cannot work; the message says why."""
