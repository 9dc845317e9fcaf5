"""The one exception type the command line turns into a one-line message."""


class RouteSAEError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
