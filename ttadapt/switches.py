"""``TTADAPT_*`` environment switches: a feature that is on unless its variable says otherwise."""

from __future__ import annotations

import os

__all__ = ["switched_on"]

_OFF = ("0", "false", "no", "off")


def switched_on(name: str) -> bool:
    """Whether the environment variable ``name`` leaves its feature on: unset, or anything but
    0 / false / no / off (any case, surrounding spaces ignored)."""
    return os.environ.get(name, "1").strip().lower() not in _OFF
