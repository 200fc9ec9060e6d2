"""Writing files so that a crash never leaves half of one: a temporary file in the target
directory, flushed to disk, then renamed over the target (``os.replace`` is atomic)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_bytes_atomically", "torch_save_atomically"]


def write_bytes_atomically(path: str | os.PathLike, data: bytes, *, private: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically. The file gets the permissions of any file the user
    creates (umask), or owner-only ones with ``private``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if not private:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def torch_save_atomically(obj: Any, path: str | os.PathLike, *, private: bool = False) -> Path:
    """``torch.save(obj, path)``, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes_atomically(path, buffer.getvalue(), private=private)
