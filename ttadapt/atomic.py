"""Writing files so that a crash never leaves half of one: a temporary file in the target
directory, flushed to disk, then renamed over the target (``os.replace`` is atomic)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import torch

__all__ = ["atomic_file", "write_bytes_atomically", "torch_save_atomically", "check_writable", "check_output_folder"]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, private: bool = False) -> Iterator[IO[bytes]]:
    """A binary file handle whose content replaces ``path`` only when the block ends without an
    exception; until then (and after a crash) ``path`` keeps its previous content and the
    temporary file is removed. The file gets the permissions of any file the user creates
    (umask), or owner-only ones with ``private``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name inside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
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


def check_writable(path: str | os.PathLike) -> None:
    """Raise ``OSError`` with one line if a file could not be written at ``path`` — it is a
    directory, or its nearest existing ancestor is not a directory that takes a new file (probed
    with an empty temporary file, removed at once). Commands call it before long work, so a
    mistyped output path fails at once, not after the training or adaptation it was to keep."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name inside it")
    _probe(path.parent, f"cannot write {path}")


def _probe(folder: Path, failure: str) -> None:
    """Raise ``OSError``, its message starting with ``failure``, unless ``folder`` (or its nearest
    existing ancestor, if it is missing) takes a new file. A real probe — an empty temporary file,
    removed at once —, as ``os.access`` is no answer for root, nor on read-only or special file
    systems."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{failure}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ttadapt-probe.", suffix=".tmp")
    except OSError as err:
        raise PermissionError(f"{failure}: {folder} does not take new files ({err.strerror})") from err
    os.close(fd)
    os.unlink(probe)


def check_output_folder(path: str | os.PathLike) -> None:
    """Raise ``OSError`` with one line if ``path`` cannot be, or become, a folder that takes new
    files (it is a file, or it or its nearest existing ancestor does not take files); nothing is
    left behind. For a command's output folder, checked before its work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder (a folder is created if missing)")
    _probe(path, f"cannot write into {path}")


def write_bytes_atomically(path: str | os.PathLike, data: bytes, *, private: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, private=private) as fh:
        fh.write(data)
    return Path(path)


def torch_save_atomically(obj: Any, path: str | os.PathLike, *, private: bool = False) -> Path:
    """``torch.save(obj, path)``, atomically; streamed to the temporary file (no in-memory copy
    of a multi-gigabyte checkpoint)."""
    with atomic_file(path, private=private) as fh:
        torch.save(obj, fh)
    return Path(path)
