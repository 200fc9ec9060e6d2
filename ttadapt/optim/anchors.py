"""Parameter snapshots for AG-3's anchors, on the device, in host memory or on disk."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from ..atomic import torch_save_atomically

__all__ = ["AnchorStore", "STORAGES"]

STORAGES = ("device", "cpu", "disk")


class AnchorStore:
    """Snapshots of the parameters keyed by step index.

    ``storage``: ``"device"`` (a copy next to the parameters; fastest), ``"cpu"`` (host
    memory; frees accelerator memory at the cost of a copy each way) or ``"disk"`` (one
    ``.pt`` file per snapshot, written atomically, read back with ``weights_only=True``, deleted
    when dropped). ``directory`` chooses where disk snapshots go (created if missing; default:
    the system's temporary directory). Each store keeps its files in a private subdirectory of
    it (``ttadapt-anchors-*``), removed with the store, so runs given the same directory —
    a sweep sharing one recipe, the ranks of a distributed run — never read each other's
    snapshots.
    """

    def __init__(self, storage: str = "device", directory: str | os.PathLike | None = None) -> None:
        if storage not in STORAGES:
            raise ValueError(f"anchor_storage must be one of {', '.join(repr(s) for s in STORAGES)}, got {storage!r}")
        self.storage = storage
        self._memory: dict[int, dict[str, Tensor]] = {}
        self._files: dict[int, Path] = {}
        self._directory: Path | None = None  # ("disk": the store's own directory)
        if storage == "disk":
            if directory is not None:
                parent = Path(directory)
                try:
                    parent.mkdir(parents=True, exist_ok=True)
                    self._directory = Path(tempfile.mkdtemp(prefix="ttadapt-anchors-", dir=parent))
                except OSError as e:
                    raise OSError(f"cannot keep anchor snapshots in {str(parent)!r}: {e.strerror or e}") from e
            else:
                self._directory = Path(tempfile.mkdtemp(prefix="ttadapt-anchors-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._directory), True)
        elif directory is not None:
            raise ValueError("anchor_dir is only used with anchor_storage='disk'")

    @property
    def directory(self) -> Path | None:
        return self._directory

    def indices(self) -> list[int]:
        return sorted(self._files if self.storage == "disk" else self._memory)

    def __contains__(self, index: int) -> bool:
        return index in (self._files if self.storage == "disk" else self._memory)

    def put(self, index: int, state: Mapping[str, Tensor]) -> None:
        """Keep a copy of ``state`` (name → tensor) as the snapshot of step ``index``."""
        if self.storage == "device":
            self._memory[index] = {n: t.detach().clone() for n, t in state.items()}
        elif self.storage == "cpu":
            self._memory[index] = {n: t.detach().to("cpu", copy=True) for n, t in state.items()}
        else:
            assert self._directory is not None
            path = self._directory / f"anchor-{index:09d}.pt"
            torch_save_atomically({n: t.detach().cpu() for n, t in state.items()}, path, private=True)
            self._files[index] = path

    def get(self, index: int) -> dict[str, Tensor]:
        """The snapshot of step ``index`` (on the CPU for ``"cpu"``/``"disk"``; the engine moves
        it to the parameters' device)."""
        if index not in self:
            raise KeyError(f"no anchor for step {index} (have {self.indices()})")
        if self.storage != "disk":
            return self._memory[index]
        state = torch.load(self._files[index], map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"anchor file {self._files[index]} does not hold a state dict")
        return state

    def other_state(self, index: int, names: Iterable[str]) -> dict[str, Tensor]:
        """The snapshot of step ``index`` as the engine's ``other`` state for the parameters
        ``names``. A name the snapshot lacks — a parameter the optimizer took on after it (a
        param group added since, a layer unfrozen since) — is left out, so the engine averages
        from its current value: its value at the snapshot for a layer frozen until then."""
        snapshot = self.get(index)
        return {n: snapshot[n] for n in names if n in snapshot}

    def drop_before(self, index: int) -> None:
        """Forget every snapshot older than step ``index``."""
        for i in [i for i in self.indices() if i < index]:
            if self.storage == "disk":
                self._files.pop(i).unlink(missing_ok=True)
            else:
                del self._memory[i]

    def clear(self) -> None:
        self.drop_before(2**62)

    def state_dict(self) -> dict[int, dict[str, Tensor]]:
        """Every kept snapshot as tensors (a checkpoint does not depend on files elsewhere)."""
        return {i: self.get(i) for i in self.indices()}

    def load_state_dict(self, anchors: Mapping[int, Mapping[str, Tensor]]) -> None:
        self.clear()
        for i, state in anchors.items():
            self.put(int(i), state)

    def close(self) -> None:
        """Delete the disk snapshots and the store's private directory."""
        self.clear()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
