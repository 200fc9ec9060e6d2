"""ttadapt — parameter-space averaged gradients for PyTorch.

Instead of the gradient at one point, an update uses the average gradient along the straight line
between two parameter states, computed by one modified backward pass in which each activation's
derivative becomes a secant slope.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import data, models
    from .activations import CallForm, register_activation, register_module_activation, registered_activations, unregister_activation
    from .adapt import Adapter
    from .averaged import averaged_backward, averaged_grad
    from .inspection import InspectionReport, inspect
    from .memory import keep_freed_memory
    from .optim import AG1, AG2, AG3, SAM, SOAP, create_optimizer
    from .reference import path_average_grad
    from .sites import SiteMismatchError
    from .unseen import RecomputedActivationsError

# Public names and the submodule each lives in. They are imported on first use (PEP 562), so that
# `ttadapt --version`, `--help` and the scripts that need one corner of the package do not pay
# for importing PyTorch, torchvision and every module here (seconds on a small machine).
_EXPORTS = {
    "Adapter": "adapt",
    "CallForm": "activations", "register_activation": "activations", "register_module_activation": "activations",
    "registered_activations": "activations", "unregister_activation": "activations",
    "averaged_backward": "averaged", "averaged_grad": "averaged",
    "InspectionReport": "inspection", "inspect": "inspection",
    "keep_freed_memory": "memory",
    "AG1": "optim", "AG2": "optim", "AG3": "optim", "SAM": "optim", "SOAP": "optim", "create_optimizer": "optim",
    "path_average_grad": "reference",
    "SiteMismatchError": "sites",
    "RecomputedActivationsError": "unseen",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # looked up once
        return value
    try:  # a submodule: ttadapt.models, ttadapt.optim, ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "averaged_grad",
    "averaged_backward",
    "path_average_grad",
    "inspect",
    "InspectionReport",
    "SiteMismatchError",
    "RecomputedActivationsError",
    "register_activation",
    "register_module_activation",
    "registered_activations",
    "unregister_activation",
    "CallForm",
    "Adapter",
    "models",
    "data",
    "AG1",
    "AG2",
    "AG3",
    "SAM",
    "SOAP",
    "create_optimizer",
    "keep_freed_memory",
    "__version__",
]
