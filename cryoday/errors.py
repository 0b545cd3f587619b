"""Exceptions raised for bad user input, and for results that cannot be written."""


class InputError(ValueError):
    """Bad input from the user: a file, a column, a particle or a config key.

    The message must name what is wrong and where (file, column/key, particle index), so the
    user can fix it without reading our code.
    """


class OutputError(InputError):
    """A result cannot be written (disk full, no permission, read-only or missing folder).

    The message names the path the user asked for (not a temporary file beside it). It is an
    :class:`InputError` because the fix is the user's (free space, choose another folder), so
    the rule scripts and the command line report it in one line, without a traceback.
    """
