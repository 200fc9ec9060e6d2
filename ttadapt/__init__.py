"""ttadapt — parameter-space averaged gradients for PyTorch.

Instead of the gradient at one point, an update uses the average gradient along the straight line
between two parameter states, computed by one modified backward pass in which each activation's
derivative becomes a secant slope.
"""

from . import data, models
from .adapt import Adapter
from .activations import CallForm, register_activation, register_module_activation, registered_activations, unregister_activation
from .averaged import averaged_backward, averaged_grad
from .inspection import InspectionReport, inspect
from .memory import keep_freed_memory
from .optim import AG1, AG2, AG3, SAM, SOAP, create_optimizer
from .reference import path_average_grad
from .sites import SiteMismatchError
from .unseen import RecomputedActivationsError

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
