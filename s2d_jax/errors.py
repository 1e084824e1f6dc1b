"""The one exception users see: a single line naming the file, line or key, and what was expected."""


class S2DError(Exception):
    """Bad input. The CLI prints `s2d: error: <message>` and exits non-zero, with no traceback."""
