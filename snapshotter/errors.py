"""The error every layer of the project raises for bad input or a failed operation.

The CLI prints these as one line on stderr and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class EpError(Exception):
    """An error a user can act on: bad input, a refused operation, a failed dependency."""


class InvalidInput(EpError):
    """Input that is not what it claims or exceeds a ceiling: a malformed or hostile tar, a
    corrupt compressed stream, a damaged EROFS image. containerd sees InvalidArgument."""
