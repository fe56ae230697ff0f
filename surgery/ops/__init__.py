"""The operations a case's ``surgery.op`` can name; importing the package registers their specs, not torch.

Each operation is a spec module (``*_spec.py``: its ``surgery`` section, no torch) and a module that applies
it, imported by :func:`get_op` when a run first needs it (see :mod:`surgery.ops.base`). Registration order
is the order ``surgery.list_ops()`` shows.
"""

from surgery.ops import transplant_spec  # noqa: F401  (each import registers an operation's spec)
from surgery.ops import activation_spec  # noqa: F401
from surgery.ops import graft_spec  # noqa: F401
from surgery.ops import bridge_spec  # noqa: F401
from surgery.ops.base import OPS, SPECS, Operation, get_op, list_ops, register_op, register_op_spec

__all__ = ["OPS", "SPECS", "Operation", "get_op", "list_ops", "register_op", "register_op_spec"]
