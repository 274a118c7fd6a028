"""Reading files users hand to tbps without ever running code from them.

PyTorch files are pickles, and a pickle can name any Python callable to be called at load time.
Published checkpoints (IRRA's ``best.pth``, TextReID's) also carry optimiser and scheduler state
and their training arguments. Every PyTorch file tbps reads (pretrained weights, tbps
checkpoints, imports) goes through :func:`load_torch_file`: PyTorch's ``weights_only`` unpickler,
which builds only tensors and plain containers, plus a short allowlist of plain value types such
files hold (:data:`EXTRA_SAFE_TYPES`). A file that names anything else is refused in one line
that names the type; there is no fallback to a full unpickle. TorchScript archives (OpenAI's CLIP
``.pt``) are checked by :func:`check_torchscript_archive` before ``torch.jit.load``.

NumPy tables are read with ``allow_pickle=False``. YAML files (tbps recipes and other projects'
configs) are read by :mod:`tbps.safe_yaml`, which needs no PyTorch.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbps.errors import TBPSError


def _numpy_scalar_types() -> list[Any]:
    """NumPy scalars pickle as ``scalar(dtype, bytes)``: plain numbers (e.g. a saved best metric)."""
    from numpy._core import multiarray

    entries: list[Any] = [(multiarray.scalar, "numpy.core.multiarray.scalar"), multiarray.scalar, np.dtype]
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        dtype_class = getattr(np.dtypes, name, None)
        if dtype_class is not None:
            entries.append(dtype_class)
    return entries


#: Plain value types allowed beyond what ``weights_only`` already builds (tensors, dicts, lists,
#: tuples, sets, OrderedDict, numbers, strings, bytes): an ``argparse.Namespace`` of training
#: arguments and NumPy scalars. Neither runs code when rebuilt.
EXTRA_SAFE_TYPES: list[Any] = [argparse.Namespace, *_numpy_scalar_types()]

_GLOBAL_PATTERN = re.compile(r"GLOBAL ([\w.]+)")


def refusal_message(path: Path | str, type_name: str) -> str:
    """The one line a user sees when a file needs code to load."""
    return (f"{path}: refused: this file holds Python objects ({type_name}) whose unpickling could run "
            f"code; tbps will not load it (it reads only tensors, numbers, strings, lists and dicts)")


def _unsafe_globals(path: Path) -> list[str] | None:
    """Types a zip-format torch file names beyond the allowlist, read without unpickling; None when
    the file is not in the zip format (the unpickler's own check then catches them)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with torch.serialization.safe_globals(EXTRA_SAFE_TYPES):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # a broken archive: torch.load below gives the readable error
        return None


def _first_line(exc: BaseException) -> str:
    """A short reason from a loading error, without PyTorch's advice to unpickle fully."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    if match:
        return match.group(1).strip()
    for line in text.strip().splitlines():
        line = line.strip()
        if line and "weights_only" not in line and "Weights only load failed" not in line:
            return line[:200]
    return type(exc).__name__


def load_torch_file(path: str | Path, what: str = "PyTorch file") -> Any:
    """The object saved in ``path``, built by the ``weights_only`` unpickler and nothing else.

    ``what`` names the expected content in errors ("tbps checkpoint", "IRRA checkpoint").
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TBPSError(f"{path}: file not found")
    if path.is_dir():
        raise TBPSError(f"{path}: is a folder, expected a {what}")
    unsafe = _unsafe_globals(path)
    if unsafe:
        raise TBPSError(refusal_message(path, ", ".join(sorted(unsafe))))
    try:
        with torch.serialization.safe_globals(EXTRA_SAFE_TYPES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = _GLOBAL_PATTERN.search(str(exc))
        if match:
            raise TBPSError(refusal_message(path, match.group(1))) from None
        raise TBPSError(f"{path}: cannot read a {what} ({_first_line(exc)})") from None
    except (KeyError, EOFError):  # the unpickler read bytes that are no pickle at all
        raise TBPSError(f"{path}: cannot read a {what} (not a file written by torch.save)") from None
    except Exception as exc:  # truncated archive, unsupported content
        raise TBPSError(f"{path}: cannot read a {what} ({_first_line(exc)})") from None


def check_torchscript_archive(path: str | Path) -> None:
    """Refuse a TorchScript archive whose code would run while it loads.

    OpenAI's CLIP files are TorchScript archives, read with ``torch.jit.load``: its unpickler builds
    only TorchScript types (no Python globals), but a class with a ``__setstate__`` method runs that
    method, code from the file, during the load. OpenAI's archives have none; any that does is refused.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".py") and "/code/" in f"/{name}":
                    source = archive.read(name).decode("utf-8", errors="replace")
                    if re.search(r"\bdef __setstate__\(", source):
                        raise TBPSError(f"{path}: refused: this TorchScript archive holds code that would run "
                                        f"while it loads (__setstate__ in {name}); tbps will not load it")
    except zipfile.BadZipFile:
        raise TBPSError(f"{path}: cannot read a TorchScript archive (not a valid zip file)") from None


def load_npy(path: str | Path, what: str = "NumPy array") -> np.ndarray:
    """A ``.npy`` array; object arrays (pickles) are refused."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TBPSError(f"{path}: file not found")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise TBPSError(refusal_message(path, "numpy object array")) from None
        raise TBPSError(f"{path}: cannot read a {what} ({_first_line(exc)})") from None
    except Exception as exc:
        raise TBPSError(f"{path}: cannot read a {what} ({_first_line(exc)})") from None
