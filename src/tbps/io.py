"""Atomic file writes: a crash or a kill never leaves a half-written checkpoint, index or config.

A write goes to a temporary file beside the target (``.NAME.XXXXXXXX.tmp``) that is renamed over it
once complete; :func:`remove_stale_temp_files` deletes the ones a killed process left behind, and a
full disk is a one-line :class:`~tbps.errors.TBPSError` naming the file (the previous file stays).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def read_json(path: str | os.PathLike, what: str, missing: str | None = None) -> Any:
    """The JSON in ``path``; a missing or unreadable file is a one-line error naming it and ``what`` it
    should hold (``missing`` replaces "WHAT not found" where a hint says how to make the file)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TBPSError(f"{path}: {missing or what + ' not found'}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TBPSError(f"{path}: unreadable {what} ({exc})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (POSIX-atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


def remove_stale_temp_files(folder: str | os.PathLike) -> int:
    """Delete the temporary files of :func:`atomic_path` in ``folder`` (left by a kill); returns how
    many bytes were freed. Call it only where no other process is writing into ``folder``."""
    freed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for entry in os.scandir(folder):
        if _TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                freed += entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
    return freed


def write_error(path: str | os.PathLike, exc: OSError) -> "Exception":
    """A one-line TBPSError for a failed write of ``path`` (no space, read-only, no permission)."""
    from tbps.errors import TBPSError

    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.EFBIG: "file too large"}.get(
        exc.errno or 0, exc.strerror or str(exc))
    return TBPSError(f"{path}: cannot write it: {reason} (any previous version of the file is intact)")


class _RecordingWriter:
    """A binary file that remembers the OSError of a failed write: ``torch.save`` turns it into an
    opaque ``RuntimeError: [enforce fail at inline_container.cc]``."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as exc:
        raise write_error(path, exc) from None


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    import torch

    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                writer = _RecordingWriter(handle)
                try:
                    torch.save(obj, writer)
                except RuntimeError:
                    if writer.error is not None:
                        raise writer.error from None
                    raise
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as exc:
        raise write_error(path, exc) from None
