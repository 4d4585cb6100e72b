"""One exception type for every mistake a user can make.

The CLI catches it and prints its message on one line (no traceback), so the
message must name the file, line or key at fault.
"""


class ThinklingError(Exception):
    """A user-facing error: bad recipe, bad file, unknown name."""
