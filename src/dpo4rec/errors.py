"""The one exception type that the CLI turns into a single line and exit code 2.

Raise ``InputError`` for anything the user can fix (a missing file, a bad
value, a malformed row); the message must name the file, field or line.
Anything else is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Bad input from the user: reported as one line, exit code 2.

    ``fields``: the config settings ("section.key") the message is about, so a caller that knows how the user gave
    one (``--set``, a flag) can name that; ``detail``: the message without the place prefixed to it on the way up."""

    def __init__(self, message: str, fields: tuple[str, ...] = (), detail: str | None = None):
        super().__init__(message)
        self.fields, self.detail = tuple(fields), message if detail is None else detail
