"""Errors caused by user input. The CLI prints them as one line (no traceback) and exits 2."""


class InputError(Exception):
    """Bad input: the message names the file and the line or column at fault."""
