"""The averaged gradient by one modified backward pass (spec §2).

Two forwards on the same batch, one backward:

1. the pass at ``other`` runs without a graph and keeps each activation site's input (and
   output; the Linear variant: each affine layer's input too); BatchNorm
   updates go to private copies of the buffers; if ``seed="other"`` the gradient of the loss w.r.t. the model output is taken here;
2. the RNG is rewound, so dropout draws the same masks;
3. the pass at the current parameters (the *graph state*) builds the graph with every activation
   replaced by its secant slope towards ``other`` (and the Linear variant's averaged affine
   backward); with ``seed="other"`` the loss gradient arriving at the model output is swapped
   for the one from step 1;
4. one backward through that graph.

Cost: 2·T_fwd + T_bwd; memory: the kept site inputs (and some activations' outputs, released
site by site as the graph pass consumes them) plus the ``other`` state itself.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .collector import pausing_collector
from .sites import SiteSession
from .states import ModelLayout, evaluated_at, fork_rng, resolve_state

__all__ = ["averaged_grad", "averaged_backward", "averaged_loss", "call_closure"]

Closure = Callable[[], Tensor]


def require_autograd(what: str) -> None:
    """Refuse to run under ``torch.inference_mode()``, where no graph can be recorded (under
    ``no_grad`` ttadapt turns recording on itself)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what} cannot run under torch.inference_mode(): it records a graph; call it outside "
                           "(under torch.no_grad() it works as outside)")


def call_closure(closure: Closure) -> Tensor:
    """Run ``closure`` and check that it returned a scalar floating-point loss tensor."""
    loss = closure()
    if not isinstance(loss, Tensor):
        raise TypeError(f"the closure must return the loss as a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
    if not (loss.is_floating_point() or loss.is_complex()):
        raise TypeError(f"the closure must return a floating-point loss, got dtype {loss.dtype}")
    return loss.reshape(())


#: PyTorch's errors when a closure runs ``backward()`` itself, as ``torch.optim.LBFGS``'s closures do
_BACKWARD_IN_CLOSURE = ("Trying to backward through the graph a second time",
                        "element 0 of tensors does not require grad and does not have a grad_fn")


def explain_backward_in_closure(step: Callable) -> Callable:
    """Decorator: where ``step`` fails with the error PyTorch raises when a closure called
    ``loss.backward()`` itself (torch.optim.LBFGS's convention), say so and what to do."""

    @functools.wraps(step)
    def run(*args: Any, **kwargs: Any):
        try:
            return step(*args, **kwargs)
        except RuntimeError as err:
            if not any(m in str(err) for m in _BACKWARD_IN_CLOSURE):
                raise
            raise RuntimeError(
                "does the closure call loss.backward()? ttadapt runs the closure more than once and takes the "
                "gradients itself: the closure must only compute and return the loss, without backward() or "
                f"zero_grad() (PyTorch: {str(err).splitlines()[0]})"
            ) from err

    return run


@contextlib.contextmanager
def _root_forward(model: nn.Module, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace ``model.forward`` by ``wrap(model.forward)`` inside the block."""
    had = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    model.__dict__["forward"] = wrap(model.forward)  # (not setattr: a ScriptModule's would rewrite its compiled forward)
    try:
        yield
    finally:
        if had:
            model.__dict__["forward"] = old
        else:
            model.__dict__.pop("forward", None)


def _float_tensor(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def _record_pass(model: nn.Module, closure: Closure, layout: ModelLayout, session: SiteSession,
                 state: Mapping[str, Tensor], want_seeds: bool) -> tuple[list[list[Tensor | None]], Tensor | None]:
    """The pass at ``state`` without a graph, keeping the sites' inputs (private buffer copies).

    With ``want_seeds`` it also returns, per model call and output leaf, the loss gradient at
    that output, and the detached loss at ``state``.
    """
    seeds: list[list[Tensor | None]] = []
    with evaluated_at(layout, state), session.run(model, "record", layout):
        if not want_seeds:
            with torch.no_grad():
                call_closure(closure)
            return seeds, None
        outputs: list[list[Tensor | None]] = []

        def at_other(forward: Callable) -> Callable:
            def run(*args: Any, **kwargs: Any):
                with torch.no_grad():
                    out = forward(*args, **kwargs)
                leaves, spec = pytree.tree_flatten(out)
                leaves = [t.detach().requires_grad_(True) if _float_tensor(t) else t for t in leaves]
                outputs.append([t if _float_tensor(t) else None for t in leaves])
                return pytree.tree_unflatten(leaves, spec)

            return run

        with torch.enable_grad(), _root_forward(model, at_other):
            loss_b = call_closure(closure)
        if not outputs:
            raise RuntimeError("seed='other' needs the closure to call the model itself (model(...)), which it did not")
        flat = [t for out in outputs for t in out if t is not None]
        grads = iter(torch.autograd.grad(loss_b, flat, allow_unused=True) if loss_b.requires_grad else [None] * len(flat))
        seeds = [[next(grads) if t is not None else None for t in out] for out in outputs]
    return seeds, loss_b.detach()


def _seed_output(t: Tensor, s: Tensor | None) -> None:
    """Make the loss gradient arriving at model output ``t`` the one taken at `other` (``s``;
    ``None``: the loss did not use that output there)."""
    if s is not None and s.shape != t.shape:
        raise RuntimeError(f"model output shape {tuple(t.shape)} differs from {tuple(s.shape)} at `other`")
    t.register_hook(lambda g: torch.zeros_like(g) if s is None else s.to(g.dtype))


def _swap_output_grads(seeds: list[list[Tensor | None]]) -> Callable[[Callable], Callable]:
    """A root-forward wrapper that replaces the loss gradient arriving at each model output leaf
    by the matching one of ``seeds`` (the output gradient at `other`)."""
    calls = [0]

    def wrap(forward: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any):
            out = forward(*args, **kwargs)
            k = calls[0]
            calls[0] += 1
            if k >= len(seeds):
                raise RuntimeError(f"the closure called the model {k + 1} times at the current parameters but {len(seeds)} times at `other`")
            leaves, _ = pytree.tree_flatten(out)
            for t, s in zip(leaves, seeds[k]):
                if _float_tensor(t) and t.requires_grad:
                    _seed_output(t, s)
            return out

        return run

    return wrap


def averaged_loss(
    model: nn.Module,
    closure: Closure,
    other: Mapping[str, Tensor] | None,
    *,
    seed: str = "current",
    linear: bool = False,
    session: SiteSession | None = None,
    layout: ModelLayout | None = None,
    other_closure: Closure | None = None,
) -> Tensor:
    """Run both passes and return the loss at the current parameters, whose graph carries the
    averaged backward. ``loss.backward()`` then accumulates the averaged gradient into ``.grad``.

    ``other_closure`` (default: ``closure``) runs the pass at ``other``. Under
    DistributedDataParallel, give ``closure`` calling the DDP wrapper (its reducer then averages
    the averaged gradient across ranks during ``backward``) and ``other_closure`` calling
    ``ddp.module`` with ``model=ddp.module`` (the no-graph pass must not touch the wrapper).
    """
    if seed not in ("current", "other"):
        raise ValueError(f"seed must be 'current' or 'other', got {seed!r}")
    if not callable(closure):
        raise TypeError(f"closure must be a zero-argument callable returning the loss, got {type(closure).__name__}")
    require_autograd("the averaged gradient")
    layout = layout or ModelLayout(model)
    state = resolve_state(layout, other, "other")
    session = session or SiteSession(linear=linear)
    session.linear = linear
    rng = fork_rng(layout)

    seeds, _ = _record_pass(model, other_closure or closure, layout, session, state, seed == "other")

    rng.rewind()
    root = _root_forward(model, _swap_output_grads(seeds)) if seed == "other" else contextlib.nullcontext()
    with torch.enable_grad(), session.run(model, "apply", layout), root:
        loss = call_closure(closure)
    session.finish_apply()
    session.check_graph(loss)
    return loss


@explain_backward_in_closure
def averaged_backward(
    model: nn.Module,
    closure: Closure,
    other: Mapping[str, Tensor] | None,
    *,
    seed: str = "current",
    linear: bool = False,
) -> Tensor:
    """Like ``loss.backward()``: accumulate the averaged gradient into each parameter's ``.grad``
    (so DistributedDataParallel's reducer sees it) and return the detached loss at the current
    parameters."""
    loss = averaged_loss(model, closure, other, seed=seed, linear=linear)
    if loss.requires_grad:
        loss.backward()
    return loss.detach()


@pausing_collector
@explain_backward_in_closure
def averaged_grad(
    model: nn.Module,
    closure: Closure,
    other: Mapping[str, Tensor] | None,
    *,
    seed: str = "current",
    linear: bool = False,
) -> dict[str, Tensor]:
    """The parameter-space averaged gradient between the current parameters and ``other``.

    Args:
        model: the model; its current parameters are the graph state θg.
        closure: zero-argument callable that runs a forward pass of ``model`` on the batch and
            returns the scalar loss. It must not call ``backward``; it is called twice.
        other: the other state θ′ — a mapping from ``model.named_parameters()`` names to
            tensors; names left out keep their current value.
        seed: where the loss gradient w.r.t. the model output is taken: ``"current"`` (AG-3) or
            ``"other"`` (AG-1 / AG-2, the forecast state).
        linear: the Linear variant (Eq. 11): Linear/Conv backward through the mean weight and
            the mean input of the two states.

    Returns:
        ``{name: gradient}`` for every parameter that requires a gradient (zeros for parameters
        the loss does not use). ``.grad`` fields, parameters, buffers are left as they were,
        except BatchNorm running statistics, updated once, as by one ordinary forward.
    """
    layout = ModelLayout(model)
    params = layout.trainable()
    loss = averaged_loss(model, closure, other, seed=seed, linear=linear, layout=layout)
    if not params:
        return {}
    if not loss.requires_grad:
        return {name: torch.zeros_like(p) for name, p in params.items()}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {name: (g if g is not None else torch.zeros_like(p)) for (name, p), g in zip(params.items(), grads)}


def _leaf_copies(params: Mapping[str, Tensor], reuse: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """Copies of ``params`` as leaf tensors that require a gradient, written into ``reuse``'s
    tensors where they fit (a finished step's copies: no allocation)."""
    out: dict[str, Tensor] = {}
    targets: list[Tensor] = []
    sources: list[Tensor] = []
    for n, p in params.items():
        old = reuse.get(n) if reuse is not None else None
        if (old is not None and old.is_leaf and old.requires_grad and old.shape == p.shape and old.dtype == p.dtype
                and old.device == p.device and old.stride() == p.stride()):
            out[n] = old
            targets.append(old)
            sources.append(p.detach())
        else:
            out[n] = p.detach().clone().requires_grad_(True)
    if targets:
        with torch.no_grad():
            torch._foreach_copy_(targets, sources)  # one call: a model has many small tensors
    return out


class DeferredAverage:
    """One forward at the current parameters θ, differentiated twice: first ordinarily, then —
    once the caller has chosen the other state from that gradient — averaged towards it.

    This is the forward-looking schedule of AG-1 / AG-2 (spec §3) at the cost of the spec's
    cost model, 2·T_fwd + 2·T_bwd: the graph of the ordinary pass is retained, the pass at the
    other state records the sites' inputs, and the second backward through the same graph uses
    secant slopes (see :mod:`ttadapt.deferred`). The graph is built on private copies of the
    trainable parameters (:attr:`start`, the values at θ), so the caller may step the real
    parameters between the two backwards (the forecast) without invalidating it.

    Args:
        model, closure: as in :func:`averaged_grad`.
        linear: the Linear variant for affine layers in the averaged backward.
        rescale: with ``linear``, rescale each affine layer's averaged input and parameter
            gradients to the L2 norms of the ordinary ones (AG-2 Linear).
        reuse: a finished run's :attr:`start`, whose tensors receive the copies of θ.
    """

    def __init__(self, model: nn.Module, closure: Closure, *, linear: bool = False, rescale: bool = False,
                 layout: ModelLayout | None = None, reuse: Mapping[str, Tensor] | None = None) -> None:
        if not callable(closure):
            raise TypeError(f"closure must be a zero-argument callable returning the loss, got {type(closure).__name__}")
        require_autograd("the averaged gradient")
        self.model, self.closure = model, closure
        self.layout = layout or ModelLayout(model)
        self.session = SiteSession(linear=linear)
        self.session.rescale = bool(rescale and linear)
        self.start = _leaf_copies(self.layout.trainable(), reuse)
        self._rng = fork_rng(self.layout)
        self._outputs: list[list[Tensor | None]] = []
        self._done = False

        def capture(forward: Callable) -> Callable:
            def run(*args: Any, **kwargs: Any):
                out = forward(*args, **kwargs)
                leaves, _ = pytree.tree_flatten(out)
                self._outputs.append([t if (_float_tensor(t) and t.requires_grad) else None for t in leaves])
                return out

            return run

        with torch.enable_grad(), evaluated_at(self.layout, self.start, copy_buffers=False), \
                self.session.run(model, "graph", self.layout), _root_forward(model, capture):
            self._loss = call_closure(closure)
        self.session.check_graph(self._loss)
        self.loss = self._loss.detach()
        self.other_loss: Tensor | None = None

    def _grads(self, retain: bool) -> dict[str, Tensor]:
        names = list(self.start)
        if not self._loss.requires_grad or not names:
            return {n: torch.zeros_like(t) for n, t in self.start.items()}
        grads = torch.autograd.grad(self._loss, [self.start[n] for n in names], retain_graph=retain, allow_unused=True)
        return {n: (g if g is not None else torch.zeros_like(self.start[n])) for n, g in zip(names, grads)}

    def ordinary_grad(self) -> dict[str, Tensor]:
        """The ordinary gradient at θ, keyed by parameter name (the graph is kept)."""
        if self._done:
            raise RuntimeError("DeferredAverage: the graph was already used by averaged_grad()")
        return self._grads(retain=True)

    def averaged_grad(self, other: Mapping[str, Tensor] | None, *, seed: str = "other") -> dict[str, Tensor]:
        """The averaged gradient between θ and ``other`` with graph state θ (frees the graph).

        ``other=None`` is the model's parameters as they are now (the caller has stepped them to
        θ′ since the graph pass); a mapping is checked and completed as in :func:`averaged_grad`.
        ``seed="other"`` takes the loss gradient at the model output at ``other`` (AG-1 / AG-2);
        :attr:`other_loss` then holds the loss there.
        """
        if seed not in ("current", "other"):
            raise ValueError(f"seed must be 'current' or 'other', got {seed!r}")
        if self._done:
            raise RuntimeError("DeferredAverage: averaged_grad() can be called once")
        state = resolve_state(self.layout, other, "other")
        self._rng.rewind()
        seeds, self.other_loss = _record_pass(self.model, self.closure, self.layout, self.session, state, seed == "other")
        self.session.fill_slots()
        if seed == "other":
            if len(seeds) != len(self._outputs):
                raise RuntimeError(f"the closure called the model {len(self._outputs)} times at the current parameters but {len(seeds)} times at `other`")
            for out, out_seeds in zip(self._outputs, seeds):
                for t, s in zip(out, out_seeds):
                    if t is not None:
                        _seed_output(t, s)
        self._done = True
        grads = self._grads(retain=False)
        self._outputs = []
        self.session.slots = []
        return grads
