"""The one exception type that the CLI turns into a single line and exit code 2.

Raise ``InputError`` for anything the user can fix (a missing file, a bad
value, a malformed row); the message must name the file, field or line.
Anything else is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""
