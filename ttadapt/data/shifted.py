"""A dataset wrapper applying one distribution shift to every image, reproducibly."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from . import shifts

__all__ = ["ShiftedDataset"]


class ShiftedDataset(Dataset):
    """``dataset`` with ``shift`` at ``severity`` applied to each image (item ``(image, label)``).

    Image ``i`` is shifted with seed ``seed * 1_000_003 + i``: the same image always gets the same
    corruption, whatever the batch it lands in or the order it is read.
    """

    def __init__(self, dataset: Dataset, shift: str, severity: int = 3, seed: int = 0) -> None:
        if shift not in shifts.SHIFTS:
            raise ValueError(f"unknown shift {shift!r}; available: {', '.join(shifts.SHIFTS)}")
        self.dataset, self.shift, self.severity, self.seed = dataset, shift, severity, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.dataset[i]
        return shifts.apply(x, self.shift, self.severity, self.seed * 1_000_003 + int(i)), y
