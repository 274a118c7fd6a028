"""Optional parts of tbps and the pip extras that install them.

The core (train, eval, index, search) needs none of them. A command that needs one says so in one
line, naming the extra, instead of an ImportError traceback::

    tbps: error: tbps serve needs the 'serve' extra: pip install 'tbps[serve]'

``make install`` / ``make test`` / ``make demo`` install every extra (through ``.[dev]``).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from tbps.errors import TBPSError

# extra -> the modules it provides (pyproject.toml, [project.optional-dependencies])
EXTRAS = {
    "serve": ("fastapi", "uvicorn"),
    "faiss": ("faiss",),
    "plots": ("matplotlib",),
    "footage": ("av", "cv2"),
}


class MissingExtra(TBPSError, ImportError):
    """An optional dependency is not installed: a one-line TBPSError for the CLI, and still an
    ImportError for code that probes for the module."""


def missing_extra(extra: str, what: str) -> MissingExtra:
    return MissingExtra(f"{what} needs the '{extra}' extra: pip install 'tbps[{extra}]'")


def require(module: str, extra: str, what: str) -> ModuleType:
    """``import module``, or a :class:`MissingExtra` saying that ``what`` needs ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(extra, what) from None


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
