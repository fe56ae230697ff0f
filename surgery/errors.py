"""The harness's own exceptions: bad input (exit 2) is kept apart from failed expectations (exit 1)."""

from __future__ import annotations


class SurgeryInputError(Exception):
    """Bad user input: a case file, model, checkpoint, dataset or device that cannot be used.

    The message is one line that says where (file, line, field) and what was expected.
    The CLI prints it on stderr and exits 2.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` — how a caught exception is quoted in a one-line error."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".strip()
