"""Code that computes activations out of the averaged passes' sight, and what ttadapt does about it.

The passes see activation calls from Python: through a ``TorchFunctionMode`` and patched module
forwards (:mod:`ttadapt.sites`). Some code runs them where neither reaches:

* ``torch.compile``'d code (the model, a submodule, the closure) — run eagerly inside the passes
  (:func:`eager`);
* activation checkpointing (``torch.utils.checkpoint``), which computes the checkpointed
  activations again during the backward, with ordinary derivatives — refused
  (:class:`RecomputedActivationsError`; :func:`under_checkpoint` for the non-reentrant kind,
  :func:`check_graph` for the reentrant one);
* a custom ``torch.autograd.Function``, whose forward runs with gradient recording off and whose
  own backward gives the gradient of the activations inside it — warned about once per class
  (:func:`check_graph`);
* TorchScript modules, whose code runs outside Python — warned about once per module
  (:func:`script_activations`, :func:`warn_scripted`);
* activations called as ATen ops directly (``torch.ops.aten.relu.default(x)``), which the registry
  does not know — warned about once per op (:func:`aten_activation`, :func:`warn_aten`);
* activations inside a ``torch.func`` transform in the model's forward (``vmap`` over an
  ensemble), whose inputs are the transform's wrappers and cannot be kept past it — left to their
  ordinary derivative in both passes, warned about once per activation (:func:`warn_transformed`).

``ttadapt.inspect`` lists the last four as not averaged.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .activations import registered_activations, registry_version
from .states import ModelLayout

__all__ = ["RecomputedActivationsError", "eager", "under_checkpoint", "check_graph", "script_activations",
           "warn_scripted", "aten_activation", "warn_aten", "warn_transformed"]


class RecomputedActivationsError(RuntimeError):
    """Activation checkpointing (``torch.utils.checkpoint``) around averaged activations: it
    computes them again during the backward, out of the pass's reach, with ordinary derivatives."""


RECOMPUTED = (
    "activation checkpointing (torch.utils.checkpoint) around averaged activations: it computes them "
    "again during the backward, where ordinary derivatives would silently replace the secant slopes. "
    "Turn it off for averaged-gradient steps (Hugging Face: model.activation_checkpointing_disable(), "
    "before transformers 5 gradient_checkpointing_disable(); timm: model.set_grad_checkpointing(False))"
)

# what has been warned about, once per process: custom Function classes and ATen ops by
# qualified name, TorchScript modules by (path, calls)
WARNED: set[str] = set()
WARNED_SCRIPTS: set[tuple[str, str]] = set()

_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
ATEN_OPS = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)
_ATEN_ALIASES = {"log_sigmoid": "logsigmoid", "_prelu_kernel": "prelu"}


def eager() -> contextlib.AbstractContextManager:
    """A block in which ``torch.compile``'d code runs eagerly: a compiled graph would compute the
    activations out of the function mode's and the patched forwards' sight (PyTorch 2.6 and
    later; before, compiled code runs as it is)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return set_stance("force_eager")


def under_checkpoint() -> bool:
    """Whether a non-reentrant ``torch.utils.checkpoint`` region is running: its saved-tensor
    hooks (which drop what the graph saves, to recompute it in the backward) are the innermost."""
    if _top_hooks is None:
        return False
    try:
        hooks = _top_hooks(False)
    except TypeError:  # (older signature)
        hooks = _top_hooks()
    return hooks is not None and getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook")


def _custom_functions(root: Tensor) -> list[type]:
    """The ``torch.autograd.Function`` classes (not ttadapt's own) with a node in the graph of
    ``root``."""
    stack = [root.grad_fn] if root.grad_fn is not None else []
    seen: set[int] = set()
    found: dict[type, None] = {}
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "_forward_cls", None)  # (custom Python functions' nodes only)
        if cls is not None and not cls.__module__.startswith("ttadapt."):
            found[cls] = None
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return list(found)


def check_graph(loss: Tensor) -> None:
    """After a pass at the graph state in which activations ran with gradient recording off, look
    at the graph for what did that: a reentrant checkpoint (its activations run again, unseen, in
    the backward) is refused; another custom ``autograd.Function`` (its own backward gives the
    gradient of the activations inside it, not averaged) is warned about once per class."""
    functions = _custom_functions(loss)
    if any(cls.__name__ == "CheckpointFunction" and cls.__module__ == "torch.utils.checkpoint" for cls in functions):
        raise RecomputedActivationsError(RECOMPUTED)
    new = [name for name in (f"{cls.__module__}.{cls.__qualname__}" for cls in functions) if name not in WARNED]
    if new:
        WARNED.update(new)
        warnings.warn(
            f"ttadapt: activation calls ran inside the custom autograd.Function {', '.join(new)}; its own "
            "backward, not the averaged one, gives their gradient. To average such an activation, register "
            "the module that calls the Function with ttadapt.register_module_activation (see `ttadapt inspect`)",
            RuntimeWarning, stacklevel=6)  # (the caller of averaged_grad or of a wrapper's step)


def _activation_of(aten_name: str) -> str | None:
    """The registered activation an ATen op name computes (``relu_`` → ``relu``), or None."""
    op = aten_name.split("::")[-1].split(".")[0]
    op = _ATEN_ALIASES.get(op, op[:-1] if op.endswith("_") and not op.startswith("_") else op)
    return op if op in registered_activations() else None


def script_roots(named_modules: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The outermost TorchScript modules (``torch.jit.script`` / ``trace``) among ``(path,
    module)`` pairs in ``named_modules()`` order: what runs outside Python, submodules included."""
    roots: list[tuple[str, nn.Module]] = []
    for path, module in named_modules:
        if isinstance(module, torch.jit.ScriptModule) and not any(within(path, r) for r, _ in roots):
            roots.append((path, module))
    return roots


def within(path: str, root: str) -> bool:
    """Whether module ``path`` is ``root`` or lies inside it (``""`` is the model)."""
    return root == "" or path == root or path.startswith(f"{root}.")


def script_activations(layout: ModelLayout) -> list[tuple[str, list[str]]]:
    """``(module path, [activation names])`` of each outermost TorchScript module of the model
    (``torch.jit.script`` / ``trace``) whose code calls a registered activation: that code runs
    outside Python, so those calls keep their ordinary derivative. Worked out once per layout and
    registry version."""
    key = registry_version()
    memo = layout.memo
    if memo.get("script key") == key:
        return memo["script activations"]  # type: ignore[return-value]
    found: list[tuple[str, list[str]]] = []
    for path, module in script_roots(layout.modules):
        try:
            graph = module.inlined_graph
        except Exception:  # (a module without a forward method)
            continue
        ops = {op: None for op in (_activation_of(n.kind()) for n in graph.nodes() if n.kind().startswith("aten::")) if op}
        if ops:
            found.append((path, list(ops)))
    memo["script key"], memo["script activations"] = key, found
    return found


def warn_scripted(path: str, ops: list[str]) -> None:
    """Once per module path and calls: its activations keep their ordinary derivative."""
    key = (path, ",".join(ops))
    if key not in WARNED_SCRIPTS:
        WARNED_SCRIPTS.add(key)
        warnings.warn(
            f"ttadapt: the TorchScript module {path or '(the model)'!r} calls {', '.join(ops)}; TorchScript code "
            "runs outside Python, so these calls keep their ordinary derivative. Pass the original nn.Module "
            "(torch.jit is deprecated in favour of torch.compile, whose code ttadapt runs eagerly)",
            RuntimeWarning, stacklevel=9)  # (the caller of averaged_grad or of AG3.step)


def aten_activation(func: Any) -> tuple[str, str] | None:
    """``(qualified op name, activation)`` for an ATen op (overload or packet) that computes a
    registered activation, else None."""
    qualified = getattr(func, "_qualified_op_name", None) or func.name()  # "aten::relu"
    op = _activation_of(qualified)
    return None if op is None else (qualified, op)


def warn_aten(qualified: str, op: str) -> None:
    """Once per op: only the Python forms of an activation are averaged."""
    if qualified not in WARNED:
        WARNED.add(qualified)
        warnings.warn(f"ttadapt: torch.ops.{qualified.replace('::', '.')} is called directly; only the Python forms of "
                      f"{op} (see `ttadapt activations`) are averaged, so this call keeps its ordinary derivative",
                      RuntimeWarning, stacklevel=5)  # (the model's code that called it)


def warn_transformed(call: str) -> None:
    """Once per activation: its calls inside a ``torch.func`` transform keep their ordinary derivative."""
    key = f"torch.func:{call}"
    if key not in WARNED:
        WARNED.add(key)
        warnings.warn(f"ttadapt: {call} ran inside a torch.func transform (vmap, grad, ...) in the model; its inputs there "
                      "cannot be kept between the passes, so these calls keep their ordinary derivative",
                      RuntimeWarning, stacklevel=5)


def warn_fused_recurrent(call: str) -> None:
    """Once per call: a recurrent layer that runs fused (under autocast) keeps its gates' ordinary
    derivative (:mod:`ttadapt.recurrent`)."""
    key = f"fused:{call}"
    if key not in WARNED:
        WARNED.add(key)
        warnings.warn(f"ttadapt: torch.{call} ran as one fused call (under autocast, or with arguments ttadapt does "
                      "not take apart), so its gates keep their ordinary derivative; run the recurrent layer "
                      "outside autocast to average them",
                      RuntimeWarning, stacklevel=6)  # (the code that called the recurrent module)
