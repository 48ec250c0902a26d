"""isle-fast: ISLE, the class-wise ensemble of WSSS pseudo-labels, as a fast array pipeline.

The public API; see README.md for the pipeline and DESIGN.md for the data model.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import AlignmentError, InputError, IsleError, StoreError
from .store import (
    IGNORE_INDEX,
    VOC_CLASSES,
    Stack,
    StackWriter,
    check_aligned,
    create_stack,
    open_stack,
)

__all__ = [
    "__version__",
    "IsleError",
    "InputError",
    "StoreError",
    "AlignmentError",
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "Stack",
    "StackWriter",
    "create_stack",
    "open_stack",
    "check_aligned",
]
