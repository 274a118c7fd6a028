"""The one exception type that the CLI turns into a one-line message instead of a traceback."""


class TBPSError(Exception):
    """A user-facing error: bad input, a missing file, a malformed annotation.

    The message must name the file (and the record, where there is one) and the problem,
    in one line, because the CLI prints exactly ``tbps: error: <message>``.
    """
