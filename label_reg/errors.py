"""Errors that the command line reports as one line and a non-zero exit."""


class InputError(ValueError):
    """Bad user input. ``str(err)`` is one line that names the file (or flag) and the problem."""

    def __init__(self, source, problem):
        self.source = str(source)
        self.problem = str(problem)
        super().__init__(f"{self.source}: {self.problem}")


class OutputError(InputError):
    """An output could not be written (read-only or full disk, file-size limit, a truncated write). Reported like an
    :class:`InputError`: one line naming the file or folder, exit status 2, and no partial output left behind."""
