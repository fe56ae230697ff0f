"""The operations a case's ``surgery.op`` can name, one module each; importing the package registers them.

Registration order is the order ``surgery.list_ops()`` shows.
"""

from surgery.ops import transplant  # noqa: F401  (each import registers its operation)
from surgery.ops import activation  # noqa: F401
from surgery.ops import graft  # noqa: F401
from surgery.ops import bridge  # noqa: F401
from surgery.ops.base import OPS, Operation, get_op, list_ops, register_op

__all__ = ["OPS", "Operation", "get_op", "list_ops", "register_op"]
