"""pytorch-optimizer's SOAP with its step batched over like-shaped parameters: the optimizer
``ttadapt.SOAP`` builds.

The library's ``step()`` walks the parameters one by one, about twenty tensor operations each
(the projections into the preconditioner's eigenbasis and back, Adam's moments, weight decay,
the Kronecker factors' update). On a model of many small layers that Python loop is most of the
step: Model B's 27 ten-by-ten layers make SOAP's step cost about as much as the forward and
backward together. :class:`BatchedSOAP` is the library's class with one change: its ``step``
does the same arithmetic, in the same order and operand layouts, on

* 2-D parameters of one shape, dtype and device with both eigenbases (two or more): one stack,
  the projections as batched matrix products in the order of the library's ``tensordot`` calls
  (as :mod:`ttadapt.optim.soap_step`), the Kronecker factors' update ``G Gᵀ`` / ``Gᵀ G`` as
  well, then everything copied back into each parameter's own tensors;
* vectors SOAP leaves in their own basis (biases without ``precondition_1d``): one
  concatenation (not with ``normalize_gradient``, whose mean is per vector).

Every other parameter — and all of them where the batched step does not apply — is stepped by
the library's own ``step()``, which sees the batched parameters' gradients hidden for the call;
the eigenbases' refresh every ``precondition_frequency`` steps is the library's own method, per
parameter. State, ``state_dict`` and checkpoints are the library's.

One more method differs: ``project``, the projection into the eigenbases and back, which the
library's step calls three times per parameter. Its contractions over a small dimension of a
large tensor — a convolution kernel's 3 of a 3 × 3, a 1 × 1 kernel's 1 — go through
:func:`ttadapt.kernels.small_contract` instead of ``tensordot``, whose operand there is a
transposed view that BLAS handles slowly (9–12 ms against 0.86 for a 512 × 512 × 3 × 3
tensor); the sums are the same, in the same order, checked once per shape against tensordot
(:func:`_contract_agrees`; tensors above 2²⁴ elements keep tensordot). SOAP's step on resnet18 takes 0.84–0.92 of the library's time with
it over three runs, on resnet152 0.85 (forward and backward included; docs/step_cost.md).

**Bits.** The batched step is the library's bit for bit where batched products and elementwise
operations round as the per-tensor ones (so on this project's machine). That is checked once per
process, code path, dtype and device against the library's class on a scratch problem (ten
steps across two refreshes, parameters, moments, factors and eigenbases compared bit for bit),
and the batched products once per shape and count; where either does not hold, those
parameters go through the library's loop (with a warning for the former). Measured on Model B:
SOAP's step 10.3–15.9 → 4.0–5.8 ms (docs/step_cost.md).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .. import kernels
from .soap_step import batched_projections

__all__ = ["batched_soap_class"]

_CLASS: list[type] = []
_HOLDS: dict[tuple, bool] = {}
_PRODUCTS: dict[tuple, bool] = {}  # (shape, count, dtype, device) -> whether batched products round as the library's


def batched_soap_class() -> type:
    """The :class:`BatchedSOAP` class (built on first use: pytorch-optimizer is imported then)."""
    if _CLASS:
        return _CLASS[0]
    from pytorch_optimizer import SOAP as _SOAP

    library_step = _SOAP.step
    if getattr(library_step, "hooked", False):  # (torch wraps a class's step with its hooks once)
        library_step = library_step.__wrapped__
    library_project = _SOAP.project

    class BatchedSOAP(_SOAP):
        """pytorch-optimizer's SOAP whose ``step`` batches like-shaped parameters (see
        :mod:`ttadapt.optim.soap_batched`); otherwise the library's class."""

        @torch.no_grad()
        def step(self, closure: Callable[[], Any] | None = None) -> Any:
            loss = None
            if closure is not None:  # (first, as the library's step: the gradients are the closure's)
                with torch.enable_grad():
                    loss = closure()
            plan = _plan(self) if _applies(self) else None
            if not plan:
                library_step(self, None)
                return loss
            hidden = [(p, p.grad) for rows in plan.values() for p, _ in rows]
            for p, _ in hidden:
                p.grad = None
            try:
                library_step(self, None)
            finally:
                for p, g in hidden:
                    p.grad = g
            for (index, kind, *_), rows in plan.items():
                group = self.param_groups[index]
                if group["step"] > 1:  # (the library's first step only builds the preconditioner)
                    (_matrices if kind == "matrix" else _vectors)(self, group, rows)
            return loss

        def project(self, grad: Tensor, state: dict, merge_dims: bool = False, max_precondition_dim: int = 10000,
                    project_type: str = "forward") -> Tensor:
            """The library's projection into the eigenbases (``project_type="forward"``) or back,
            with its contractions over small dimensions by :func:`_contract`."""
            if merge_dims:
                return library_project(self, grad, state, merge_dims, max_precondition_dim, project_type)
            forward = project_type == "forward"
            for mat in state["Q"]:
                if len(mat) > 0:
                    grad = _contract(grad, mat, forward)
                else:
                    grad = grad.permute([*range(1, grad.dim()), 0])
            return grad

    BatchedSOAP.__module__ = __name__
    BatchedSOAP.__qualname__ = "BatchedSOAP"
    globals()["BatchedSOAP"] = BatchedSOAP  # (found by name: an optimizer pickles as the library's does)
    _CLASS.append(BatchedSOAP)
    return BatchedSOAP


def __getattr__(name: str) -> Any:
    if name == "BatchedSOAP":  # (unpickling in a fresh process: build the class first)
        return batched_soap_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _applies(optimizer: Any) -> bool:
    """The batched step's preconditions: no maximize, no merged dimensions."""
    return not getattr(optimizer, "maximize", True) and not any(group.get("merge_dims") for group in optimizer.param_groups)


def _plan(optimizer: Any) -> dict[tuple, list[tuple[Tensor, dict]]]:
    """``{(group index, kind, …): [(parameter, state)]}`` of the batches this step takes (two or
    more members each): parameters with a gradient and a built state (eigenbases, factors)."""
    batches: dict[tuple, list[tuple[Tensor, dict]]] = {}
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            grad = p.grad
            if grad is None or grad.is_sparse or p.is_complex():
                continue
            state = optimizer.state.get(p)
            if not state or not isinstance(state.get("exp_avg"), Tensor) or not isinstance(state.get("exp_avg_sq"), Tensor):
                continue
            q, gg = state.get("Q"), state.get("GG")
            if not (isinstance(q, list) and isinstance(gg, list) and len(q) == len(gg) == p.dim()):
                continue
            if not (grad.dtype is p.dtype is state["exp_avg"].dtype is state["exp_avg_sq"].dtype) or grad.shape != p.shape:
                continue
            common = (grad.dtype, grad.device, state.get("shampoo_beta"), state.get("precondition_frequency"))
            if p.dim() == 2 and all(isinstance(m, Tensor) and m.dtype is p.dtype for m in (*q, *gg)):
                batches.setdefault((index, "matrix", tuple(p.shape), *common), []).append((p, state))
            elif p.dim() == 1 and not isinstance(q[0], Tensor) and not isinstance(gg[0], Tensor) and not group["normalize_gradient"]:
                batches.setdefault((index, "vector", *common), []).append((p, state))
    kind = type(optimizer)
    return {key: rows for key, rows in batches.items()
            if len(rows) > 1 and (key[1] == "vector" or _products_agree(key[2], len(rows), key[3], key[4]))
            and _holds(kind, optimizer.param_groups[key[0]], rows[0][0].dtype, rows[0][0].device)}


def _products_agree(shape: tuple[int, int], count: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether batched products of ``count`` matrices of ``shape`` give the library's
    per-matrix ``tensordot`` results bit for bit (the projections with column-major eigenbases
    and the Kronecker factors' ``G Gᵀ``, ``Gᵀ G``): BLAS picks its kernels by size, so on this
    machine some small shapes round otherwise batched (6 × 5's ``G Gᵀ``). Checked once per
    shape, count, dtype and device on random matrices; where not, those parameters are stepped
    by the library's loop."""
    key = (shape, count, dtype, device)
    held = _PRODUCTS.get(key)
    if held is None:
        rng = torch.Generator().manual_seed(1)
        r, c = shape

        def basis(n: int) -> Tensor:  # column-major, as the library's eigenbases (eigh, then qr)
            return torch.linalg.qr(torch.randn(n, n, generator=rng, dtype=torch.float64))[0].to(dtype=dtype, device=device)

        try:
            g = torch.randn(count, r, c, generator=rng, dtype=torch.float64).to(dtype=dtype, device=device)
            q0s, q1s = [basis(r) for _ in range(count)], [basis(c) for _ in range(count)]
            project, back = batched_projections([{"Q": [a, b]} for a, b in zip(q0s, q1s)])  # (the step's own code)
            batched = (project(g), back(g), *_factor_products(g))
            held = True
            for i in range(count):
                x, a, b = g[i], q0s[i], q1s[i]
                single = (torch.tensordot(torch.tensordot(x, a, dims=[[0], [0]]), b, dims=[[0], [0]]),
                          torch.tensordot(torch.tensordot(x, a, dims=[[0], [1]]), b, dims=[[0], [1]]),
                          torch.tensordot(x, x, dims=[[1], [1]]), torch.tensordot(x, x, dims=[[0], [0]]))
                held = held and all(torch.equal(u[i], w) for u, w in zip(batched, single))
        except RuntimeError:  # (a dtype or device without these products: the library's loop)
            held = False
        _PRODUCTS[key] = held
    return held


def _contract(x: Tensor, mat: Tensor, forward: bool) -> Tensor:
    """The library's ``tensordot(x, mat, dims=[[0], [0 if forward else 1]])``. Over a small
    dimension of a large tensor (a convolution kernel's 3 or 1) that call is slow — its operand
    is a transposed view, and BLAS takes 9–12 ms for a 512 × 512 × 3 × 3 tensor — and
    :func:`ttadapt.kernels.small_contract` forms the same sums in 0.86 ms (2 threads). Taken
    where :func:`_contract_agrees` for the shape, direction and ``mat``'s layout."""
    n = mat.shape[0]
    if (n <= kernels.SMALL_CONTRACT_MAX and x.dtype is torch.float32 and mat.dtype is torch.float32 and x.is_cpu and mat.is_cpu
            and x.dim() > 1 and x.shape[0] == n and n * _CONTRACT_MIN <= x.numel() <= _CONTRACT_MAX and x.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or mat.requires_grad))  # (no graph through the kernel)
            and _contract_agrees(n, x.numel() // n, forward, mat.stride())):
        out = kernels.small_contract(x, mat if forward else mat.t())
        if out is not None:
            return out
    return torch.tensordot(x, mat, dims=[[0], [0 if forward else 1]])


# below this many columns a contraction is cheap whichever way (and not worth a check per shape)
_CONTRACT_MIN = 4096
# above this many elements the check's random operand and two results (three times the tensor,
# once per shape) would be a memory surprise: such tensors keep tensordot
_CONTRACT_MAX = 1 << 24
_CONTRACTS: dict[tuple, bool] = {}


def _contract_agrees(n: int, count: int, forward: bool, strides: tuple[int, ...]) -> bool:
    """Whether :func:`ttadapt.kernels.small_contract` gives the library's ``tensordot`` bit for
    bit for an ``n × count`` operand, this direction and an eigenbasis with these strides:
    checked once per process on random data (on this project's machine MKL sums such products
    in order without fusing, as the kernel does; another BLAS may not)."""
    key = (n, count, forward, tuple(strides))
    held = _CONTRACTS.get(key)
    if held is None:
        rng = torch.Generator().manual_seed(2)
        x = torch.randn(n, count, generator=rng)
        q = torch.linalg.qr(torch.randn(n, n, generator=rng, dtype=torch.float64))[0].float()
        mat = torch.empty_strided((n, n), strides).copy_(q) if len(strides) == 2 and min(strides) >= 1 else q
        got = kernels.small_contract(x, mat if forward else mat.t())
        held = got is not None and torch.equal(got, torch.tensordot(x, mat, dims=[[0], [0 if forward else 1]]))
        _CONTRACTS[key] = held
    return held


def _hyper(optimizer: Any, group: dict) -> tuple[int, float, float, float, float]:
    """``(k, 1 − β1, 1 − β2, step size, 1 − lr·weight decay)`` of the group's step, computed as
    the library computes them."""
    beta1, beta2 = group["betas"]
    k = group["step"] - 1
    step_size = group["lr"]
    if group["correct_bias"]:
        bias_correction1 = optimizer.debias(beta1, k)
        bias_correction2_sq = math.sqrt(optimizer.debias(beta2, k))
        step_size *= bias_correction2_sq / bias_correction1
    return k, 1.0 - beta1, 1.0 - beta2, step_size, 1.0 - group["weight_decay"] * group["lr"]


def _factor_products(g: Tensor) -> tuple[Tensor, Tensor]:
    """The Kronecker factors' updates of a batch of gradients: the library's ``tensordot(G, G)``
    over dimension 1 (G Gᵀ) and over dimension 0 (Gᵀ G), batched."""
    return torch.bmm(g, g.mT), torch.bmm(g.mT, g)


def _matrices(optimizer: Any, group: dict, rows: list[tuple[Tensor, dict]]) -> None:
    """One step of like-shaped matrices, as the library's loop body on each of them."""
    k, w1, w2, step_size, keep = _hyper(optimizer, group)
    params = [p for p, _ in rows]
    states = [s for _, s in rows]
    g = torch.stack([p.grad for p in params])
    project, back = batched_projections(states)
    m = torch.stack([s["exp_avg"] for s in states])
    v = torch.stack([s["exp_avg_sq"] for s in states])
    m.lerp_(g, w1)
    v.lerp_(project(g).square(), w2)
    n = back(project(m) / v.sqrt().add_(group["eps"]))
    if group["normalize_gradient"]:
        n.div_(n.square().mean(dim=(1, 2), keepdim=True).sqrt_().add_(group["eps"]))
    t = torch.stack([p.detach() for p in params])
    t.add_(n, alpha=-step_size)
    if group["weight_decay"] != 0.0:
        t.mul_(keep)
    beta = 1.0 - states[0]["shampoo_beta"]
    gg0 = torch.stack([s["GG"][0] for s in states])
    gg1 = torch.stack([s["GG"][1] for s in states])
    outer0, outer1 = _factor_products(g)
    gg0.lerp_(outer0, beta)
    gg1.lerp_(outer1, beta)
    torch._foreach_copy_([p.detach() for p in params], list(t.unbind(0)))
    torch._foreach_copy_([s["exp_avg"] for s in states], list(m.unbind(0)))
    torch._foreach_copy_([s["exp_avg_sq"] for s in states], list(v.unbind(0)))
    torch._foreach_copy_([s["GG"][0] for s in states], list(gg0.unbind(0)))
    torch._foreach_copy_([s["GG"][1] for s in states], list(gg1.unbind(0)))
    _refresh(optimizer, group, states, k)


def _vectors(optimizer: Any, group: dict, rows: list[tuple[Tensor, dict]]) -> None:
    """One step of vectors SOAP leaves in their own basis, concatenated."""
    k, w1, w2, step_size, keep = _hyper(optimizer, group)
    params = [p for p, _ in rows]
    states = [s for _, s in rows]
    sizes = [p.numel() for p in params]
    g = torch.cat([p.grad for p in params])
    m = torch.cat([s["exp_avg"] for s in states])
    v = torch.cat([s["exp_avg_sq"] for s in states])
    m.lerp_(g, w1)
    v.lerp_(g.square(), w2)
    n = m / v.sqrt().add_(group["eps"])
    t = torch.cat([p.detach() for p in params])
    t.add_(n, alpha=-step_size)
    if group["weight_decay"] != 0.0:
        t.mul_(keep)
    torch._foreach_copy_([p.detach() for p in params], list(t.split(sizes)))
    torch._foreach_copy_([s["exp_avg"] for s in states], list(m.split(sizes)))
    torch._foreach_copy_([s["exp_avg_sq"] for s in states], list(v.split(sizes)))
    _refresh(optimizer, group, states, k)


def _refresh(optimizer: Any, group: dict, states: list[dict], k: int) -> None:
    """The eigenbases' refresh that ends the library's preconditioner update, per parameter."""
    for state in states:
        if k > 0 and k % state["precondition_frequency"] == 0:
            state["Q"] = optimizer.get_orthogonal_matrix_qr(state, group["max_precondition_dim"], False)


def _state_equal(a: Any, b: Any) -> bool:
    """Whether two optimizer states (dicts of tensors, lists of them, numbers) are equal bit for bit."""
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


def _holds(kind: type, group: dict, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the batched step is the library's bit for bit for this group's code path (bias
    correction, normalisation, 1-D preconditioning, weight decay or not) on this dtype and
    device: checked once per process on a scratch problem — three like-shaped matrices (one
    without a gradient on one step), two of another shape, three vectors, a 4-D kernel, ten
    steps with a refresh every four — against the library's class. (In bfloat16 on this
    machine it does not hold: ATen's elementwise operations round a tensor's tail otherwise.)"""
    key = (kind, bool(group["correct_bias"]), bool(group["normalize_gradient"]), bool(group["precondition_1d"]),
           float(group["weight_decay"]) != 0.0, dtype, device)
    held = _HOLDS.get(key)
    if held is not None:
        return held
    _HOLDS[key] = True  # (the scratch run below steps this class: no recursion into the check)
    library = kind.__mro__[1]
    options = dict(lr=1e-2, betas=tuple(group["betas"]), shampoo_beta=group["shampoo_beta"], eps=group["eps"],
                   weight_decay=group["weight_decay"], precondition_frequency=4, max_precondition_dim=10000, merge_dims=False,
                   precondition_1d=group["precondition_1d"], correct_bias=group["correct_bias"],
                   normalize_gradient=group["normalize_gradient"])
    rng = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (6, 5), (6, 5), (3, 4), (3, 4), (5,), (7,), (5,), (4, 3, 2, 2)]
    start = [torch.randn(shape, generator=rng).to(dtype=dtype, device=device) for shape in shapes]
    held = False
    try:
        pairs = []
        for cls in (library, kind):
            params = [torch.nn.Parameter(t.clone()) for t in start]
            pairs.append((params, cls(params, **options)))
        for step in range(10):
            grads = [torch.randn(shape, generator=rng).to(dtype=dtype, device=device) for shape in shapes]
            for params, opt in pairs:
                for i, (p, g) in enumerate(zip(params, grads)):
                    p.grad = None if (step == 5 and i == 0) else g.clone()
                opt.step()
        (pa, a), (pb, b) = pairs
        held = all(torch.equal(x, y) for x, y in zip(pa, pb)) and all(
            _state_equal(a.state[x], b.state[y]) for x, y in zip(pa, pb))
    except Exception:  # noqa: BLE001 - a library that builds or steps otherwise: not this module's formula
        held = False
    if not held:
        warnings.warn(f"ttadapt: the batched SOAP step differs from {library.__module__}.{library.__qualname__}'s "
                      f"for {dtype} on {device} here (another version of pytorch-optimizer, or operations that "
                      "round otherwise batched); those parameters step one at a time (slower)", RuntimeWarning, stacklevel=5)
    _HOLDS[key] = held
    return held
