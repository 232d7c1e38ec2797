"""The one exception type users see: a message they can act on, printed without a traceback."""


class TuneryError(Exception):
    """Bad input or an impossible request. The CLI prints the message and exits with status 2.

    Messages name the file, line or field at fault and say what to do about it.
    """
