"""Base optimizers by name, with the paper's hyper-parameters as defaults (Appendix J)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

__all__ = ["SOAP", "create_optimizer", "check_optimizer", "OPTIMIZERS"]


def SOAP(
    params: Iterable[Tensor] | Iterable[dict],
    lr: float = 3e-3,
    betas: tuple[float, float] = (0.95, 0.95),
    shampoo_beta: float = -1,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    data_format: str = "channels_first",
    correct_bias: bool = True,
) -> torch.optim.Optimizer:
    """SOAP (Shampoo with Adam in the preconditioner's eigenbasis) from ``pytorch-optimizer``,
    with the reference implementation's parameter names and the paper's defaults
    (β1 = β2 = 0.95, preconditioning every 10 steps).

    ``shampoo_beta < 0`` means "use β2", as in the reference. ``merge_dims`` stays ``False`` by
    default: pytorch-optimizer's merged-dims path fails on biases. Note that SOAP's first step
    only initialises its preconditioner and leaves the parameters unchanged.

    The optimizer is the library's class with its step batched over like-shaped parameters, bit
    for bit the library's (checked at run time; :mod:`ttadapt.optim.soap_batched`).
    """
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("SOAP needs the 'pytorch-optimizer' package: pip install 'pytorch-optimizer>=3.1'") from exc
    from .soap_batched import batched_soap_class

    return batched_soap_class()(
        params,
        lr=lr,
        betas=tuple(betas),
        shampoo_beta=None if shampoo_beta is None or shampoo_beta < 0 else shampoo_beta,
        eps=eps,
        weight_decay=weight_decay,
        precondition_frequency=precondition_frequency,
        max_precondition_dim=max_precond_dim,
        merge_dims=merge_dims,
        precondition_1d=precondition_1d,
        normalize_gradient=normalize_grads,
        data_format=data_format,
        correct_bias=correct_bias,
    )


OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]] = {
    "rmsprop": (torch.optim.RMSprop, {"alpha": 0.99}),
    "adam": (torch.optim.Adam, {"betas": (0.9, 0.999)}),
    "adamw": (torch.optim.AdamW, {"betas": (0.9, 0.999)}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "soap": (SOAP, {"betas": (0.95, 0.95), "precondition_frequency": 10}),
}


def create_optimizer(name: str, params: Iterable[Tensor] | Iterable[dict], lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """``create_optimizer("rmsprop" | "adam" | "adamw" | "sgd" | "soap", params, lr, **overrides)``
    with the paper's hyper-parameters as defaults."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    cls, defaults = OPTIMIZERS[key]
    return cls(params, lr=lr, **{**defaults, **kwargs})


def check_optimizer(name: str, lr: float, options: dict[str, Any] | None = None) -> None:
    """Raise ``ValueError`` with one line if ``create_optimizer(name, ..., lr, **options)`` would
    fail — an unknown name, option or ill-typed value (``betas: abc``) — by building it on a
    one-element parameter. Recipes call this before any data or weights are read, so a typo does
    not surface as a traceback after minutes of loading or training."""
    probe = torch.zeros(1, requires_grad=True)
    try:
        create_optimizer(name, [probe], lr, **(options or {}))
    except (TypeError, ValueError, IndexError) as err:
        lines = str(err).strip().splitlines()
        raise ValueError(lines[0] if lines else type(err).__name__) from err
