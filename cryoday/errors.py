"""Exceptions raised for bad user input."""


class InputError(ValueError):
    """Bad input from the user: a file, a column, a particle or a config key.

    The message must name what is wrong and where (file, column/key, particle index), so the
    user can fix it without reading our code.
    """
