"""Fused CPU kernels for the elementwise hot spots of the averaged gradient (optional).

On the CPU every elementwise PyTorch op is one pass over memory, and the secant slopes and the
AG-1 update chain three to six of them on tensors that do not fit in cache. The C kernels in
``_kernels.c`` do each in one pass:

- :func:`tanh_secant`: ``(1 − tanh a·tanh b)·tanh(d)/d``, or ``g ⊙`` it, the closed form of
  :func:`ttadapt.activations._tanh_secant`;
- :func:`clamp_secant`: the exact secant of ReLU, ReLU6 and Hardtanh, with the derivative
  where the inputs tie;
- :func:`exp_linear_secant`: the closed form of ELU, SELU and CELU
  (:func:`ttadapt.activations._exp_linear_secant`), or ``g ⊙`` it;
- :func:`exp_linear` and :func:`tanh`: ELU / SELU / CELU and tanh themselves, for the pass at
  the other state (within one and two ulps of the correctly rounded value; 2.5 and 3 times as
  fast as ATen's on AVX2);
- :func:`ag1_update` (:func:`ag1_update_many`: many tensors in one call):
  ``θ ← θ − |θ′ − θ|·sign(G′)`` and ``Σ|θ′ − θ|`` (NaN for a non-finite G′);
- :func:`l1_diff`, :func:`ag2_rescale` and :func:`ag2_commit_many`: AG-2's step lengths and its
  rescaled step;
- :func:`adam_direction_many` and :func:`rmsprop_direction_many` (all tensors in one call):
  AG-2's dry step of ``torch.optim``'s Adam / AdamW / RMSprop, read-only on the optimizer
  state; :func:`adam_forecast` and :func:`rmsprop_forecast`: AG-1/AG-2's forecast step of the
  same, all tensors in one call, the new state written beside the old (see
  :mod:`ttadapt.optim.closed_form`).

They are compiled on first use with the system's C compiler (``$CC``, else ``cc``/``gcc``/
``clang``; about a second) into a cache directory (``$TTADAPT_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/ttadapt/kernels`` or ``~/.cache/ttadapt/kernels``) keyed by the source, the
flags, the compiler and the CPU, and checked against the PyTorch fallback on a small input once
per process. Without a compiler, or with ``TTADAPT_FUSED_KERNELS=0``, or for tensors they do not
cover (not float32, not on the CPU, not laid out alike), every function returns ``None`` and
the caller runs its PyTorch ops: results agree (bit for bit where the fallback is exact, to a
few ulps for ``tanh(d)/d``), only speed differs. :func:`status` says which is in use.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch import Tensor

from .rare import _flat
from .switches import switched_on

__all__ = ["available", "status", "fits", "tanh_secant", "clamp_secant", "exp_linear_secant", "exp_linear_secant_ties", "exp_linear", "tanh", "ag1_update", "ag1_update_many", "l1_diff", "ag2_rescale",
           "adam_direction_many", "rmsprop_direction_many", "ag2_commit_many",
           "adam_forecast", "rmsprop_forecast"]

_SOURCE = Path(__file__).with_name("_kernels.c")
_COMMON = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
_P, _N, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_F32 = torch.float32

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": ctypes.CDLL | None, "why": str (after the first call)
_testing = threading.local()  # .lib: the library under its self-test, seen by the testing thread only


def _enabled_by_env() -> bool:
    return switched_on("TTADAPT_FUSED_KERNELS")


def _compiler() -> str | None:
    given = os.environ.get("CC")
    if given:
        return shutil.which(given.split()[0]) and given
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    given = os.environ.get("TTADAPT_KERNEL_CACHE")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ttadapt" / "kernels"


def _cpu_id() -> bytes:
    """What the tuned build depends on: the CPU's model and instruction-set flags (a cache shared
    between machines, say a home directory on NFS, must not hand one machine's -march=native
    build to another: unknown instructions would kill the process)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [line for line in f.read().splitlines() if line.startswith((b"model name", b"flags", b"Features"))]
        return b"\n".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}".encode()


def _flag_sets() -> list[list[str]]:
    """Flags to try, best first: tuned for this CPU with OpenMP threads (only where PyTorch
    itself runs on OpenMP on Linux, so that the already loaded runtime is shared), tuned without
    threads, portable."""
    native = ["-march=native", "-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    sets = []
    if sys.platform.startswith("linux") and torch._C.has_openmp:
        sets.append(native + ["-fopenmp"])
    sets += [native, []]
    return sets


def _compile(cc: str, flags: list[str], target: Path) -> bool:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=target.parent)
        os.close(fd)
    except OSError:  # the cache directory cannot be written
        return False
    try:
        done = subprocess.run([*cc.split(), *_COMMON, *flags, str(_SOURCE), "-o", tmp, "-lm"],
                              capture_output=True, timeout=120)
        if done.returncode != 0:
            return False
        os.replace(tmp, target)  # atomic: another process never loads a half-written library
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(cc: str) -> tuple[ctypes.CDLL | None, str]:
    try:
        version = subprocess.run([*cc.split(), "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C compiler {cc!r} does not run ({e})"
    source = _SOURCE.read_bytes()
    cpu = _cpu_id()
    for flags in _flag_sets():
        key = hashlib.sha256(b"\0".join([source, version, " ".join(_COMMON + flags).encode(),
                                         platform.machine().encode(), cpu, torch.__version__.encode()])).hexdigest()[:16]
        target = _cache_dir() / f"kernels-{key}.so"
        if not target.exists() and not _compile(cc, flags, target):
            continue
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:
            continue
        lib.tanh_secant_f32.argtypes = [_P, _P, _P, _P, _P, _P, _N, _I]
        lib.tanh_secant_f32.restype = None
        lib.clamp_secant_f32.argtypes = [_P, _P, _P, _P, _N, _F, _F, _I]
        lib.clamp_secant_f32.restype = None
        lib.ag1_update_f32.argtypes = [_P, _P, _P, _N, _I]
        lib.ag1_update_f32.restype = ctypes.c_double
        lib.ag1_update_many_f32.argtypes = [_N, _P, _P, _P, _P, _I]
        lib.ag1_update_many_f32.restype = ctypes.c_double
        lib.exp_linear_secant_f32.argtypes = [_P, _P, _P, _P, _N, _F, _F, _F, _I, _P, _N]
        lib.exp_linear_secant_f32.restype = ctypes.c_int64
        lib.sigmoid_secant_f32.argtypes = [_P, _P, _P, _P, _P, _N, _I]
        lib.sigmoid_secant_f32.restype = None
        lib.quotient_secant_f32.argtypes = [_P, _P, _P, _P, _P, _N, _F, _I, _P, _N]
        lib.quotient_secant_f32.restype = ctypes.c_int64
        lib.close_fill_f32.argtypes = [_P, _P, _P, _P, _N, _F, _I]
        lib.close_fill_f32.restype = None
        lib.exp_linear_f32.argtypes = [_P, _P, _N, _F, _F, _F, _I]
        lib.exp_linear_f32.restype = None
        lib.tanh_f32.argtypes = [_P, _P, _N, _I]
        lib.tanh_f32.restype = None
        lib.l1_diff_f32.argtypes = [_P, _P, _N, _I]
        lib.l1_diff_f32.restype = ctypes.c_double
        lib.l1_diff_many_f32.argtypes = [_N, _P, _P, _P, _I]
        lib.l1_diff_many_f32.restype = ctypes.c_double
        lib.ag2_rescale_f32.argtypes = [_P, _P, _F, _N, _I]
        lib.ag2_rescale_f32.restype = None
        for name in ("adam_direction_many_f32", "rmsprop_direction_many_f32"):
            getattr(lib, name).argtypes = [_N, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I]
            getattr(lib, name).restype = None
        lib.finite_many_f32.argtypes = [_N, _P, _P, _I]
        lib.finite_many_f32.restype = ctypes.c_double
        lib.ag2_commit_many_f32.argtypes = [_N, _P, _P, _P, _F, _I]
        lib.ag2_commit_many_f32.restype = None
        lib.ag2_rescale_many_f32.argtypes = [_N, _P, _P, _P, _F, _I]
        lib.ag2_rescale_many_f32.restype = None
        for name in ("adam_forecast_f32", "rmsprop_forecast_f32"):
            getattr(lib, name).argtypes = [_N, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I]
            getattr(lib, name).restype = None
        lib.max_pool2x2_f32.argtypes = [_P, _P, _P, _N, _N, _N, _N, _N, _I]
        lib.max_pool2x2_f32.restype = None
        lib.max_pool2d_f32.argtypes = [_P, _P, _P, _P, _P] + [_N] * 13 + [_I]
        lib.max_pool2d_f32.restype = _I
        lib.small_contract_f32.argtypes = [_P, _P, _P, _N, _N, _N, _I]
        lib.small_contract_f32.restype = None
        return lib, f"fused CPU kernels in use ({target}; flags: {' '.join(flags) or 'portable'})"
    return None, f"the fused CPU kernels did not compile with {cc!r} into {_cache_dir()}"


def _library() -> ctypes.CDLL | None:
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    testing = getattr(_testing, "lib", None)
    if testing is not None:
        return testing
    if torch._C._are_functorch_transforms_active():
        return None  # (the self-test cannot draw its inputs inside vmap / grad: set up at the first call outside)
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib: ctypes.CDLL | None = None
        if not _enabled_by_env():
            why = "fused CPU kernels off (TTADAPT_FUSED_KERNELS=0); PyTorch ops in use"
        elif (cc := _compiler()) is None:
            why = "no C compiler found ($CC, cc, gcc, clang); PyTorch ops in use (slower on the CPU)"
        else:
            lib, why = _load(cc)
            if lib is None:
                warnings.warn(f"ttadapt: {why}; using PyTorch ops instead (slower on the CPU)", RuntimeWarning, stacklevel=3)
                why += "; PyTorch ops in use (slower on the CPU)"
            else:
                _testing.lib = lib  # other threads wait at the lock until the self-test is done
                try:  # (outside the caller's function and dispatch modes: a pass's own mode, a flop counter, ...)
                    with torch._C.DisableTorchFunction(), _disable_current_modes():
                        problem = _self_test()
                finally:
                    _testing.lib = None
                if problem is not None:
                    lib, why = None, f"fused CPU kernels disagree with PyTorch ({problem}); PyTorch ops in use"
                    warnings.warn(f"ttadapt: {why}", RuntimeWarning, stacklevel=3)
        _state["lib"], _state["why"] = lib, why
        return lib


def available() -> bool:
    """Whether the fused kernels are compiled and in use (compiles them on the first call)."""
    return _library() is not None


def loaded() -> bool:
    """Whether the fused kernels are in use, without compiling or loading them (False before the
    first :func:`available` or kernel call): a check cheap enough for every small site."""
    return _state.get("lib") is not None


def status() -> str:
    """One line: the fused kernels in use and where, or why the PyTorch ops run instead."""
    _library()
    return str(_state.get("why", "fused CPU kernels not set up yet (asked inside a torch.func transform)"))


def _dense(*tensors: Tensor) -> bool:
    """All float32 on the CPU, of one shape and one dense memory layout (the kernels walk them
    as one array each, in memory order)."""
    first = tensors[0]
    if first.numel() == 0:
        return False
    shape = first.shape
    contiguous = True
    for t in tensors:  # a plain loop: this runs per site, and a site's whole budget is ~100 µs
        if t.dtype is not _F32 or not t.is_cpu or t.shape != shape:
            return False
        contiguous = contiguous and t.is_contiguous()
    return contiguous or all(_flat(t, first) is not None for t in tensors)


def fits(*tensors: Tensor) -> bool:
    """Whether the kernels are in use and apply to these tensors (float32, on the CPU, of one
    shape and memory layout): a caller that must not stop half-way checks before it starts."""
    return _library() is not None and _dense(*tensors)


def _out(like: Tensor, out: Tensor | None) -> Tensor:
    """Where a secant goes: ``out`` when laid out like ``like``, else new memory. The secants
    leave version counters alone: their ``out`` is new or memory the engine alone holds (a kept
    input or output of the pass at `other`), which no autograd graph has saved."""
    if out is not None and _dense(like, out):
        return out
    return torch.empty_like(like)


def tanh_secant(ua: Tensor, fa: Tensor, ub: Tensor, fb: Tensor | None = None, out: Tensor | None = None,
                grad: Tensor | None = None) -> Tensor | None:
    """The tanh secant slope from ``ua``, ``fa = tanh(ua)``, ``ub`` and ``fb = tanh(ub)`` into
    ``out`` (may be ``fb`` or ``ub``; new memory if None or laid out otherwise), or None where
    the kernel does not apply. Without ``fb`` the kernel forms ``tanh(ub)`` itself (a few ulps
    from ATen's; ``fa`` where ``ub == ua``), which saves keeping it; given ``grad``,
    ``grad ⊙ slope`` in the same pass (a site's averaged backward)."""
    lib = _library()
    if lib is None:
        return None
    tensors = [ua, fa, ub]  # (a list, not a generator: this runs per site)
    if fb is not None:
        tensors.append(fb)
    if grad is not None:
        tensors.append(grad)
    if out is not None:
        tensors.append(out)
    if _dense(*tensors):
        result = out if out is not None else torch.empty_like(ua)
    elif out is not None and _dense(*tensors[:-1]):
        result = torch.empty_like(ua)  # ``out`` laid out otherwise: new memory
    else:
        return None
    lib.tanh_secant_f32(ua.data_ptr(), fa.data_ptr(), ub.data_ptr(), None if fb is None else fb.data_ptr(),
                        None if grad is None else grad.data_ptr(), result.data_ptr(), ua.numel(), torch.get_num_threads())
    return result


def tanh_secant_checked(ua: Tensor, fa: Tensor, ub: Tensor, fb: Tensor | None, out: Tensor) -> None:
    """:func:`tanh_secant` into ``out`` for tensors the caller has checked: the kernels are in
    use, and all are contiguous float32 CPU tensors of one shape with fewer than
    ``PARALLEL_MIN`` elements (the small sites of a graph pass, where the checks cost more than
    the arithmetic)."""
    _state["lib"].tanh_secant_f32(ua.data_ptr(), fa.data_ptr(), ub.data_ptr(), None if fb is None else fb.data_ptr(),
                                  None, out.data_ptr(), ua.numel(), 1)


def sigmoid_secant_checked(ua: Tensor, fa: Tensor, ub: Tensor, fb: Tensor | None, out: Tensor) -> None:
    """:func:`sigmoid_secant` into ``out`` for tensors checked as for :func:`tanh_secant_checked`
    (``fb = σ(ub)`` formed first where the other pass's output was not kept)."""
    if fb is None:
        fb = torch.sigmoid(ub)
    _state["lib"].sigmoid_secant_f32(ua.data_ptr(), fa.data_ptr(), ub.data_ptr(), fb.data_ptr(), out.data_ptr(), ua.numel(), 1)


def clamp_secant_checked(ua: Tensor, ub: Tensor, lo: float, hi: float, out: Tensor) -> None:
    """:func:`clamp_secant` into ``out`` for tensors checked as for :func:`tanh_secant_checked`."""
    _state["lib"].clamp_secant_f32(ua.data_ptr(), ub.data_ptr(), None, out.data_ptr(), ua.numel(), lo, hi, 1)


#: elements below which the kernels run on one thread (``PARALLEL_MIN`` in the C source)
PARALLEL_MIN = 16384


def _clamp_derivative(u: Tensor, lo: float, hi: float) -> Tensor:
    """``[lo < u < hi]`` as ATen's ReLU / ReLU6 / Hardtanh backward have it (an infinite bound
    is no bound: ReLU's derivative is 1 at +inf)."""
    inside = (u > lo) if lo != -math.inf else torch.ones_like(u, dtype=torch.bool)
    if hi != math.inf:
        inside &= u < hi
    return inside.to(u.dtype)


def clamp_secant(ua: Tensor, ub: Tensor, lo: float, hi: float, out: Tensor | None = None,
                 grad: Tensor | None = None) -> Tensor | None:
    """The secant slope of ``clamp(u, lo, hi)`` between ``ua`` and ``ub`` (the derivative
    ``[lo < ua < hi]`` where they tie, see :func:`_clamp_derivative`) — or, given ``grad``,
    ``grad ⊙ slope`` in the same pass (the site's averaged backward) — or None where the kernel
    does not apply."""
    lib = _library()
    if lib is None or not (_dense(ua, ub) if grad is None else _dense(ua, ub, grad)):
        return None
    result = _out(ua, out)
    lib.clamp_secant_f32(ua.data_ptr(), ub.data_ptr(), None if grad is None else grad.data_ptr(), result.data_ptr(),
                         ua.numel(), float(lo), float(hi), torch.get_num_threads())
    return result


def exp_linear_secant(ua: Tensor, ub: Tensor, alpha: float, scale: float, kappa: float,
                      out: Tensor | None = None, grad: Tensor | None = None) -> Tensor | None:
    """The secant slope of ``s·(max(u, 0) + α·expm1(κ·min(u, 0)))`` (ELU, SELU, CELU) between
    ``ua`` and ``ub``, NaN where they tie (see :func:`exp_linear_secant_ties`) — or, given
    ``grad``, ``grad ⊙ slope`` in the same pass, with the derivative at the ties (to an ulp of
    ATen's) — or None where the kernel does not apply (also for κ ≤ 0 or non-finite settings)."""
    done = _exp_linear(ua, ub, alpha, scale, kappa, out, grad)
    return None if done is None else done[0]


def exp_linear(u: Tensor, alpha: float, scale: float, kappa: float) -> Tensor | None:
    """ELU / SELU / CELU of ``u`` (``scale·u`` where ``u ≥ 0``, else ``α·scale·expm1(κu)``,
    as ``aten.elu`` forms it) in new memory, within a few float32 ulps of ATen's and several
    times faster on the CPU — for the pass at the other state, whose outputs feed only that
    state's own pre-activations — or None where the kernel does not apply (also for
    non-finite settings or κ ≤ 0)."""
    lib = _library()
    if lib is None or not (kappa > 0 and math.isfinite(kappa) and math.isfinite(alpha) and math.isfinite(scale)):
        return None
    if not _dense(u) or torch._C._are_functorch_transforms_active():  # (a vmapped tensor has no memory of its own)
        return None
    out = torch.empty_like(u)
    # (ATen rounds α·scale in float32 too)
    neg = ctypes.c_float(ctypes.c_float(alpha).value * ctypes.c_float(scale).value).value
    lib.exp_linear_f32(u.data_ptr(), out.data_ptr(), u.numel(), neg, float(scale), float(kappa), torch.get_num_threads())
    return out


def tanh(u: Tensor) -> Tensor | None:
    """``torch.tanh(u)`` in new memory, within a few float32 ulps of it and several times faster
    on the CPU — for the pass at the other state, as :func:`exp_linear` — or None where the
    kernel does not apply."""
    lib = _library()
    if lib is None or not _dense(u) or torch._C._are_functorch_transforms_active():
        return None
    out = torch.empty_like(u)
    lib.tanh_f32(u.data_ptr(), out.data_ptr(), u.numel(), torch.get_num_threads())
    return out


_MAX_TIES = 64


def exp_linear_secant_ties(ua: Tensor, ub: Tensor, alpha: float, scale: float, kappa: float,
                           out: Tensor | None = None) -> tuple[Tensor, Tensor | None] | None:
    """:func:`exp_linear_secant` without ``grad``, with where its slope is NaN (0/0: the inputs
    tie, or one is NaN): ``(slope, positions)``, the positions (int64, in memory order, any
    order among themselves) of all of them when there are at most 64, else None — or None
    where the kernel does not apply."""
    return _exp_linear(ua, ub, alpha, scale, kappa, out, None)


def _exp_linear(ua: Tensor, ub: Tensor, alpha: float, scale: float, kappa: float, out: Tensor | None,
                grad: Tensor | None) -> tuple[Tensor, Tensor | None] | None:
    lib = _library()
    if lib is None or not (kappa > 0 and math.isfinite(kappa) and math.isfinite(alpha) and math.isfinite(scale)):
        return None
    if not (_dense(ua, ub) if grad is None else _dense(ua, ub, grad)):
        return None
    result = _out(ua, out)
    ties = torch.empty(_MAX_TIES, dtype=torch.int64) if grad is None else None
    count = lib.exp_linear_secant_f32(ua.data_ptr(), ub.data_ptr(), None if grad is None else grad.data_ptr(),
                                      result.data_ptr(), ua.numel(), float(alpha), float(scale), float(kappa),
                                      torch.get_num_threads(), None if ties is None else ties.data_ptr(), _MAX_TIES)
    return result, (None if ties is None or count > _MAX_TIES else ties[:count])


def sigmoid_secant(ua: Tensor, fa: Tensor, ub: Tensor, fb: Tensor, out: Tensor | None = None) -> Tensor | None:
    """The Sigmoid secant from ``ua``, ``fa = σ(ua)``, ``ub`` and ``fb = σ(ub)`` in one pass, by
    the PyTorch closed form's formula (within a few float32 ulps of it), ATen's derivative where
    the inputs tie (bit for bit) or the slope is NaN, into ``out`` (may be ``fb`` or ``ub``; new
    memory if None or laid out otherwise), or None where the kernel does not apply."""
    lib = _library()
    if lib is None or not _dense(ua, fa, ub, fb):
        return None
    result = _out(ua, out)
    lib.sigmoid_secant_f32(ua.data_ptr(), fa.data_ptr(), ub.data_ptr(), fb.data_ptr(), result.data_ptr(), ua.numel(),
                           torch.get_num_threads())
    return result


_MAX_CLOSE = 256


def close_cap(n: int) -> int:
    """How many close inputs :func:`quotient_secant` reports for a tensor of ``n`` elements: 256,
    or one in 16 where that is more. Past it the derivative everywhere and :func:`close_fill` are
    cheaper than the derivative at each reported input (an activation module's derivative is a
    forward and a backward through it); below it they are not: a few steps from an anchor, the
    close inputs of a GPT-2 MLP's activation are 0.1–5 % of them."""
    return max(_MAX_CLOSE, n // 16)


def quotient_secant(ua: Tensor, fa: Tensor, ub: Tensor, fb: Tensor, tol: float,
                    out: Tensor | None = None) -> tuple[Tensor, Tensor | None] | None:
    """The generic secant slope ``(fb − fa) / (ub − ua)`` in one pass, rounded as the PyTorch
    ops round it, into ``out`` (may be ``fb``; new memory if None or laid out otherwise), with
    where the inputs are too close for it (``|ub − ua| − tol·|ua| ≤ tol``, the test of
    :func:`ttadapt.secant.close_mask`): ``(slope, positions)``, the positions (int64, in memory
    order, any order among themselves) of all of them when there are at most
    :func:`close_cap` of them, else None (then :func:`close_fill` puts the derivative there) — or
    None where the kernel does not apply."""
    return _quotient_secant(ua, fa, ub, fb, tol, out, close_cap(ua.numel()))


def _quotient_secant(ua: Tensor, fa: Tensor, ub: Tensor, fb: Tensor, tol: float, out: Tensor | None,
                     cap: int) -> tuple[Tensor, Tensor | None] | None:
    lib = _library()
    if lib is None or not _dense(ua, fa, ub, fb):
        return None
    result = _out(ua, out)
    close = torch.empty(max(cap, 1), dtype=torch.int64)
    count = lib.quotient_secant_f32(ua.data_ptr(), fa.data_ptr(), ub.data_ptr(), fb.data_ptr(), result.data_ptr(),
                                    ua.numel(), float(tol), torch.get_num_threads(), close.data_ptr(), cap)
    return result, (close[:count] if count <= cap else None)


def close_fill(ua: Tensor, ub: Tensor, derivative: Tensor, tol: float, out: Tensor) -> bool:
    """``out ← derivative`` where ``ua`` and ``ub`` are too close for a secant (the test of
    :func:`quotient_secant`, whose slope ``out`` holds); False, and nothing written, where the
    kernel does not apply (the four not laid out alike)."""
    lib = _library()
    if lib is None or not _dense(ua, ub, derivative, out):
        return False
    lib.close_fill_f32(ua.data_ptr(), ub.data_ptr(), derivative.data_ptr(), out.data_ptr(), ua.numel(), float(tol),
                       torch.get_num_threads())
    return True


def ag1_update(p: Tensor, theta: Tensor, g: Tensor) -> float | None:
    """With ``p`` holding θ′: ``p ← θ − |θ′ − θ|·sign(g)`` in place, returning ``Σ|θ′ − θ|``
    (float64 sum; NaN where ``g`` holds a NaN or an infinity: the update's pass doubles as the
    non-finite check of ``g``), or None (``p`` untouched) where the kernel does not apply."""
    lib = _library()
    if lib is None or not _dense(p, theta, g):
        return None
    total = lib.ag1_update_f32(p.data_ptr(), theta.data_ptr(), g.data_ptr(), p.numel(), torch.get_num_threads())
    torch.autograd.graph.increment_version(p)
    return float(total)


def ag1_update_many(p: list[Tensor], theta: list[Tensor], g: list[Tensor]) -> float | None:
    """:func:`ag1_update` for each ``(p[k], theta[k], g[k])`` in one call, returning the sum of
    their ``Σ|θ′ − θ|``; None, with nothing written, where the kernel does not apply to every
    triple."""
    return _run_many("ag1_update_many_f32", [p, theta, g], p)


def l1_diff(a: Tensor, b: Tensor) -> float | None:
    """``Σ|a − b|`` in one read-only pass (float64 across chunks), or None where the kernel does
    not apply."""
    lib = _library()
    if lib is None or not _dense(a, b):
        return None
    return float(lib.l1_diff_f32(a.data_ptr(), b.data_ptr(), a.numel(), torch.get_num_threads()))


def l1_diff_many(a: list[Tensor], b: list[Tensor]) -> float | None:
    """``Σ_k Σ|a_k − b_k|`` over all pairs in one read-only call (each pair's sum as
    :func:`l1_diff` forms it, the pairs' sums added in double), or None where the kernel does
    not apply to every pair."""
    return _run_many("l1_diff_many_f32", [a, b], a, read_only=True)


def ag2_rescale(p: Tensor, theta: Tensor, scale: float) -> bool:
    """With ``p`` holding θ″: ``p ← θ + scale·(θ″ − θ)`` in place; False (``p`` untouched) where
    the kernel does not apply."""
    lib = _library()
    if lib is None or not _dense(p, theta):
        return False
    lib.ag2_rescale_f32(p.data_ptr(), theta.data_ptr(), float(scale), p.numel(), torch.get_num_threads())
    torch.autograd.graph.increment_version(p)
    return True


def _pointers(tensors: list[Tensor | None]) -> array.array:
    """The tensors' data pointers as a C array (NULL for None), for :func:`_run_many`, which
    passes its address. (``array`` fills it in one C loop; a ctypes array converts each entry.)"""
    return array.array("Q", [0 if t is None else t.data_ptr() for t in tensors])


def _rows_fit(columns: list[list[Tensor | None]], count: int) -> bool:
    """:func:`_dense` of every row (the row's tensors across ``columns``), inlined for the usual
    case of contiguous rows: this runs over every tensor of a model on every step."""
    for k in range(count):
        first = None
        contiguous = True
        for column in columns:
            t = column[k]
            if t is None:
                continue
            if first is None:
                first, shape = t, t.shape
                if first.numel() == 0:
                    return False
            if t.dtype is not _F32 or not t.is_cpu or t.shape != shape:
                return False
            contiguous = contiguous and t.is_contiguous()
        if not contiguous and not _dense(*[column[k] for column in columns if column[k] is not None]):
            return False
    return True


def _run_many(name: str, columns: list[list[Tensor | None]], written: list[Tensor], *, hyper: list[list[float]] | None = None,
              hn: int = 0, extra: tuple = (), tail: tuple = (), read_only: bool = False) -> float | None:
    """Check and run one of the kernels that walk many tensors in one call (a model's tensors
    are many and mostly small: a call each would cost more than the arithmetic):
    ``name(count, *columns, *extra, sizes, [hyper,] *tail, threads)``. ``columns`` are the
    tensor arguments, one list each with an entry per tensor (None: NULL), every row of one
    shape and layout; ``hyper`` has ``hn`` floats per row; ``extra`` may hold pointer arrays
    (:func:`_pointers`); autograd is told of the writes into ``written`` (a ``read_only``
    kernel writes nothing: ``written`` then only gives the sizes). None, nothing written, where
    the kernels are off or a row does not fit; else the kernel's return value (0.0 where it has
    none)."""
    count = len(written)
    if any(len(column) != count for column in columns) or (hyper is not None and (
            len(hyper) != count or any(len(h) != hn for h in hyper))):
        raise ValueError(f"{name}: {count} tensors need {count} entries of each argument"
                         + (f" and {hn} hyper-parameters each" if hyper is not None else ""))
    lib = _library()
    if lib is None:
        return None
    if not _rows_fit(columns, count):
        return None
    if count == 0:
        return 0.0
    # C arrays, referenced here for the call; the kernel gets their addresses
    arrays = [_pointers(c) for c in columns] + [*extra, array.array("q", [t.numel() for t in written])]
    if hyper is not None:
        arrays.append(array.array("f", [x for row in hyper for x in row]))
    args = [x.buffer_info()[0] if isinstance(x, array.array) else x for x in arrays]
    result = getattr(lib, name)(count, *args, *tail, torch.get_num_threads())
    if not read_only:
        torch.autograd.graph.increment_version(written)
    return 0.0 if result is None else float(result)


def all_finite_many(tensors: list[Tensor]) -> bool | None:
    """Whether every element of every tensor is finite, in one read-only call over all of them
    (a model's many small tensors: a PyTorch reduction each would cost more than the reading);
    None where the kernel does not apply to every tensor (float32 on the CPU, dense, non-empty)."""
    flag = _run_many("finite_many_f32", [tensors], tensors, read_only=True)
    return None if flag is None else flag == 0.0


def _direction_many(name: str, hn: int, d: list[Tensor], theta: list[Tensor], grad: list[Tensor],
                    state: list[list[Tensor | None]], hyper: list[list[float]]) -> tuple[float, float] | None:
    sums = (ctypes.c_double * 2)(0.0, 0.0)
    if _run_many(name, [theta, grad, *state, d], d, hyper=hyper, hn=hn, tail=(sums,)) is None:
        return None
    return sums[0], sums[1]


def adam_direction_many(d: list[Tensor], theta: list[Tensor], grad: list[Tensor], exp_avg: list[Tensor],
                        exp_avg_sq: list[Tensor], max_exp_avg_sq: list[Tensor | None],
                        hyper: list[list[float]]) -> tuple[float, float] | None:
    """AG-2's dry step of ``torch.optim.Adam`` / ``AdamW``, all tensors in one call: with each
    ``d`` holding the forecast θ′, ``d ← θ″ − θ``, θ″ being one step from θ with ``grad`` and the
    given moments (only read; ``max_exp_avg_sq`` for amsgrad, else None), and the return value
    ``(Σ|θ′ − θ|, Σ|θ″ − θ|)`` over all tensors — or None, nothing written, where the kernel
    does not apply to every tensor. ``hyper`` per tensor: 1 − β1, β2, 1 − β2, −lr/(1 − β1^t),
    (1 − β2^t)^½, eps, ±1 (−1 to maximize), the coupled weight decay (Adam's, else 0),
    1 − lr·weight decay (AdamW's decoupled decay, else 1)."""
    return _direction_many("adam_direction_many_f32", 9, d, theta, grad, [exp_avg, exp_avg_sq, max_exp_avg_sq], hyper)


def rmsprop_direction_many(d: list[Tensor], theta: list[Tensor], grad: list[Tensor], square_avg: list[Tensor],
                           grad_avg: list[Tensor | None], momentum_buffer: list[Tensor | None],
                           hyper: list[list[float]]) -> tuple[float, float] | None:
    """:func:`adam_direction_many` for ``torch.optim.RMSprop`` (``grad_avg`` when centered,
    ``momentum_buffer`` when momentum > 0; None otherwise). ``hyper`` per tensor: α, 1 − α, −lr,
    eps, ±1 (−1 to maximize), weight decay, momentum."""
    return _direction_many("rmsprop_direction_many_f32", 7, d, theta, grad, [square_avg, grad_avg, momentum_buffer], hyper)


def ag2_commit_many(p: list[Tensor], theta: list[Tensor], scale: float) -> bool:
    """With each ``p`` holding θ″ − θ: ``p ← θ + scale·(θ″ − θ)`` (one rounding), all tensors in
    one call; False, nothing written, where the kernel does not apply to every pair."""
    return _run_many("ag2_commit_many_f32", [p, theta], p, tail=(ctypes.c_float(scale),)) is not None


def ag2_rescale_many(p: list[Tensor], theta: list[Tensor], scale: float) -> bool:
    """:func:`ag2_rescale` of every pair (each ``p`` holding θ″) in one call; False, nothing
    written, where the kernel does not apply to every pair."""
    return _run_many("ag2_rescale_many_f32", [p, theta], p, tail=(ctypes.c_float(scale),)) is not None


def _forecast(name: str, hn: int, p: list[Tensor], grad: list[Tensor], inputs: list[list[Tensor | None]],
              outputs: list[list[Tensor | None]], steps: list[Tensor] | None, hyper: list[list[float]]) -> bool:
    if steps is not None and (len(steps) != len(p) or not all(s.dtype is _F32 and s.is_cpu and s.numel() == 1 for s in steps)):
        return False
    return _run_many(name, [p, grad, *inputs, *outputs], p, hyper=hyper, hn=hn,
                     extra=(None if steps is None else _pointers(steps),)) is not None


def adam_forecast(p: list[Tensor], grad: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor],
                  max_exp_avg_sq: list[Tensor | None], exp_avg_out: list[Tensor], exp_avg_sq_out: list[Tensor],
                  max_exp_avg_sq_out: list[Tensor | None], hyper: list[list[float]], steps: list[Tensor] | None = None) -> bool:
    """One ``torch.optim.Adam`` / ``AdamW`` step for each tensor in ``p`` (θ in, θ′ out, in
    place), out of place on the state: the moments before the step are only read, the ones
    after it are written into the ``*_out`` tensors (``max_exp_avg_sq`` and its output for
    amsgrad, else None). ``hyper`` per tensor as :func:`adam_direction_many`'s. ``steps``: each
    tensor's step count (float32 scalars), advanced by one in the same call. False, with nothing
    written, where the kernel does not apply to every tensor."""
    return _forecast("adam_forecast_f32", 9, p, grad, [exp_avg, exp_avg_sq, max_exp_avg_sq],
                     [exp_avg_out, exp_avg_sq_out, max_exp_avg_sq_out], steps, hyper)


def rmsprop_forecast(p: list[Tensor], grad: list[Tensor], square_avg: list[Tensor], grad_avg: list[Tensor | None],
                     momentum_buffer: list[Tensor | None], square_avg_out: list[Tensor], grad_avg_out: list[Tensor | None],
                     momentum_buffer_out: list[Tensor | None], hyper: list[list[float]],
                     steps: list[Tensor] | None = None) -> bool:
    """:func:`adam_forecast` for ``torch.optim.RMSprop`` (``grad_avg`` when centered,
    ``momentum_buffer`` when momentum > 0; None otherwise); ``hyper`` as
    :func:`rmsprop_direction_many`'s."""
    return _forecast("rmsprop_forecast_f32", 7, p, grad, [square_avg, grad_avg, momentum_buffer],
                     [square_avg_out, grad_avg_out, momentum_buffer_out], steps, hyper)


def max_pool2x2(x: Tensor, indices: bool = False) -> Tensor | tuple[Tensor, Tensor] | None:
    """``F.max_pool2d(x, 2)`` (2 × 2 windows, stride 2) of a contiguous 3-D or 4-D float32 CPU
    tensor in one pass, the values of ATen's kernel bit for bit (see ``max_pool2x2_f32``) — with
    ``indices``, ``(values, indices)`` as ``F.max_pool2d(x, 2, return_indices=True)`` gives them
    — or None where the kernel does not apply."""
    lib = _library()
    if lib is None or x.dtype is not _F32 or not x.is_cpu or not x.is_contiguous() or x.dim() not in (3, 4):
        return None
    h, w = x.shape[-2:]
    if h < 2 or w < 2 or x.numel() == 0:
        return None
    shape = (*x.shape[:-2], h // 2, w // 2)
    out = torch.empty(shape, dtype=x.dtype)
    where = torch.empty(shape, dtype=torch.int64) if indices else None
    lib.max_pool2x2_f32(x.data_ptr(), out.data_ptr(), None if where is None else where.data_ptr(), x.numel() // (h * w),
                        h, w, h // 2, w // 2, torch.get_num_threads())
    return out if where is None else (out, where)


def max_pool2d(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
               dilation: tuple[int, int], indices: bool = False) -> Tensor | tuple[Tensor, Tensor] | None:
    """``F.max_pool2d(x, kernel, stride, padding, dilation)`` (``ceil_mode=False``) of a
    contiguous 3-D or 4-D float32 CPU tensor, the values of ATen's kernel bit for bit — with
    ``indices``, ``(values, indices)`` as ``return_indices=True`` gives them — or None where the
    kernel does not apply. 2 × 2 windows with stride 2 take :func:`max_pool2x2`, any other
    window ``max_pool2d_f32`` (see its comment). The arguments are pairs of ints as PyTorch
    accepts them (padding at most half the window: the caller checks)."""
    if kernel == stride == (2, 2) and padding == (0, 0) and dilation == (1, 1):
        return max_pool2x2(x, indices)
    lib = _library()
    if lib is None or x.dtype is not _F32 or not x.is_cpu or not x.is_contiguous() or x.dim() not in (3, 4):
        return None
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    h, w = x.shape[-2:]
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1 or x.numel() == 0:
        return None
    shape = (*x.shape[:-2], oh, ow)
    threads = torch.get_num_threads()
    out = torch.empty(shape, dtype=x.dtype)
    where = torch.empty(shape, dtype=torch.int64) if indices else None
    scratch = torch.empty(threads * h * ow, dtype=x.dtype)  # each thread's row maxima
    scratch_at = torch.empty(threads * h * ow, dtype=torch.int64) if indices else None
    if lib.max_pool2d_f32(x.data_ptr(), out.data_ptr(), None if where is None else where.data_ptr(), scratch.data_ptr(),
                          None if scratch_at is None else scratch_at.data_ptr(), x.numel() // (h * w), h, w, oh, ow,
                          kh, kw, sh, sw, ph, pw, dh, dw, threads):
        return None  # a window that misses the input (dilated): ATen's call
    return out if where is None else (out, where)


#: the widest ``m`` :func:`small_contract` takes (``SMALL_CONTRACT_MAX`` in the C source)
SMALL_CONTRACT_MAX = 8


def small_contract(x: Tensor, m: Tensor) -> Tensor | None:
    """``torch.tensordot(x, m, dims=[[0], [0]])`` for a contiguous float32 CPU ``x`` whose leading
    dimension ``n`` is small and an ``n × p`` matrix ``m`` (``p ≤ SMALL_CONTRACT_MAX``), each element summed over ``n`` in
    order with every product and sum rounded (see ``small_contract_f32``; new memory, laid out as
    tensordot's result) — or None where the kernel does not apply. Whether that is tensordot's
    result bit for bit depends on the BLAS: the caller checks (``optim.soap_batched``)."""
    lib = _library()
    if (lib is None or x.dtype is not _F32 or m.dtype is not _F32 or not x.is_cpu or not m.is_cpu or x.dim() < 1
            or m.dim() != 2 or m.shape[0] != x.shape[0] or not 0 < m.shape[1] <= SMALL_CONTRACT_MAX or x.numel() == 0
            or not x.is_contiguous()
            or torch._C._are_functorch_transforms_active()):
        return None
    n, p = m.shape
    m = m.contiguous()
    out = torch.empty(*x.shape[1:], p, dtype=x.dtype)
    lib.small_contract_f32(x.data_ptr(), m.data_ptr(), out.data_ptr(), n, p, x.numel() // n, torch.get_num_threads())
    return out


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal element by element, NaN where NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _self_test() -> str | None:
    """Compare each kernel with the PyTorch ops it replaces on a small input (one that takes every
    branch: ties, crossings, saturation, a NaN, block tails); the name of the first that
    disagrees, or None."""
    from .activations import (_exp_linear_secant, _exp_linear_secant_torch, _sigmoid_secant_torch,  # (imported late:
                              _tanh_secant_torch)  # no cycle)

    g = torch.Generator().manual_seed(0)
    ua = torch.randn(1000, generator=g) * 3
    ub = ua + torch.randn(1000, generator=g) * torch.tensor([1e-4, 0.3, 3.0]).repeat_interleave(334)[:1000]
    ub[::7] = ua[::7]
    ua[5], ub[11] = float("nan"), float("inf")
    fa, fb = ua.tanh(), ub.tanh()
    got = tanh_secant(ua, fa, ub, fb)
    want = _tanh_secant_torch(ua, fa, ub, fb)
    if got is None or not torch.allclose(got, want, rtol=2e-6, atol=1e-7, equal_nan=True) or not torch.equal(got[::7][1:], want[::7][1:]):
        return "tanh secant"
    own_fb = tanh_secant(ua, fa, ub, grad=fb)  # tanh(ub) formed in the kernel, times a gradient (fb here)
    if own_fb is None or not torch.allclose(own_fb, want * fb, rtol=2e-6, atol=1e-7, equal_nan=True):
        return "tanh secant (own tanh)"
    for lo, hi in ((0.0, float("inf")), (-1.0, 1.0)):
        got = clamp_secant(ua, ub, lo, hi)
        quotient = (ub.clamp(lo, hi) - ua.clamp(lo, hi)) / (ub - ua)
        want = torch.where(quotient.isnan(), _clamp_derivative(ua, lo, hi), quotient)
        if got is None or not torch.equal(got, want):
            return "clamp secant"
    for alpha, scale, kappa in ((1.0, 1.0, 1.0), (1.6732632, 1.0507010, 1.0), (2.0, 1.0, 0.5)):
        got = _exp_linear_secant(ua, ub.clone(), True, None, False, alpha, scale, kappa)  # the kernel, ties filled
        want = _exp_linear_secant_torch(ua, ub.clone(), True, None, False, alpha, scale, kappa)
        if not torch.allclose(got, want, rtol=2e-6, atol=1e-7, equal_nan=True):
            return "exp-linear secant"
        got = exp_linear(ua, alpha, scale, kappa)
        want = torch.ops.aten.elu(ua, alpha, scale, kappa)
        if got is None or not torch.allclose(got, want, rtol=1e-6, atol=1e-30, equal_nan=True):
            return "exp-linear forward"
    got = tanh(ua)
    if got is None or not torch.allclose(got, ua.tanh(), rtol=1e-6, atol=1e-30, equal_nan=True):
        return "tanh forward"
    fa, fb = ua.sigmoid(), ub.sigmoid()
    got = sigmoid_secant(ua, fa, ub, fb)
    want = _sigmoid_secant_torch(ua, fa, ub.clone(), fb.clone())
    if got is None or not torch.allclose(got, want, rtol=2e-6, atol=1e-12, equal_nan=True) or not torch.equal(got[::7][1:], want[::7][1:]):
        return "sigmoid secant"
    fa, fb = torch.nn.functional.silu(ua), torch.nn.functional.silu(ub)
    tol = torch.finfo(torch.float32).eps ** 0.5
    near = (ub - ua).abs().sub_(ua.abs(), alpha=tol) <= tol
    quotient = (fb - fa) / (ub - ua)
    for cap in (0, 1000):  # positions beyond the cap, then all of them
        fused = _quotient_secant(ua, fa, ub, fb, tol, None, cap)
        if fused is None or not _same(fused[0], quotient) or (fused[1] is not None) != (int(near.sum()) <= cap) or (
                fused[1] is not None and not torch.equal(fused[1].sort().values, near.nonzero().squeeze(1))):
            return "quotient secant"
    slope, derivative = fused[0], torch.ops.aten.silu_backward(torch.ones_like(ua), ua)
    if not close_fill(ua, ub, derivative, tol, slope) or not _same(slope, torch.where(near, derivative, quotient)):
        return "quotient secant (filled)"
    theta, p, grad = ua.nan_to_num(0.0), ub.nan_to_num(0.0, 0.0), torch.randn(1000, generator=g).relu_()
    want_p = theta - (p - theta).abs() * grad.sign()
    want_l1 = float((p - theta).abs().double().sum())
    l1 = ag1_update(p, theta, grad)
    if l1 is None or not torch.equal(p, want_p) or abs(l1 - want_l1) > 1e-6 * max(1.0, want_l1):
        return "AG-1 update"
    finite = [theta, p.nan_to_num(0.0, 0.0), grad]
    if all_finite_many(finite) is not True or all_finite_many([*finite, ua]) is not False or \
            all_finite_many([ub, theta]) is not False:  # ua holds a NaN, ub an inf
        return "finite check"
    l1 = l1_diff(ub.nan_to_num(0.0, 0.0), theta)
    if l1 is None or abs(l1 - want_l1) > 1e-6 * max(1.0, want_l1):
        return "L1 length"
    l1 = l1_diff_many([ub.nan_to_num(0.0, 0.0)[:300], ub.nan_to_num(0.0, 0.0)[300:]], [theta[:300], theta[300:]])
    if l1 is None or abs(l1 - want_l1) > 1e-6 * max(1.0, want_l1):
        return "L1 lengths (many)"
    p = ub.nan_to_num(0.0, 0.0)
    want_p = theta + 0.37 * (p - theta)
    if not ag2_rescale(p, theta, 0.37) or not torch.allclose(p, want_p, rtol=1e-6, atol=1e-6):
        return "AG-2 rescale"
    p = ub.nan_to_num(0.0, 0.0)
    if not ag2_rescale_many([p[:300], p[300:]], [theta[:300], theta[300:]], 0.37) or not torch.allclose(p, want_p, rtol=1e-6, atol=1e-6):
        return "AG-2 rescale (many)"
    planes = torch.cat([ua.view(10, 10, 10), ub.view(10, 10, 10)])[:, :, :9].reshape(4, 5, 10, 9).contiguous()
    planes[0, 0] = float("-inf")
    planes[1, 1, ::3] = 0.0
    planes[1, 1, 1::3] = -0.0  # a tie of −0.0 and +0.0: ATen keeps the first
    want = torch.nn.functional.max_pool2d(planes, 2)
    got = max_pool2x2(planes)
    if got is None or not (torch.equal(got.isnan(), want.isnan())
                           and torch.equal(got.nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32))):
        return "max pooling"
    planes[2, 2, :2, :2] = float("nan")  # a window of NaNs: ATen's index is the last one's
    want, want_at = torch.nn.functional.max_pool2d(planes, 2, return_indices=True)
    got = max_pool2x2(planes, indices=True)
    if got is None or not (torch.equal(got[0].nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32))
                           and torch.equal(got[1], want_at)):
        return "max pooling (indices)"
    for x, window in ((planes, ((3, 3), (2, 2), (1, 1), (1, 1))), (planes[..., :8].contiguous(), ((3, 3), (2, 2), (1, 1), (1, 1))),
                      (planes, ((3, 2), (1, 2), (1, 0), (2, 1)))):  # rows one by one, a plane as one signal, dilated
        want, want_at = torch.nn.functional.max_pool2d(x, *window, return_indices=True)
        got, got_no_at = max_pool2d(x, *window, indices=True), max_pool2d(x, *window)
        if got is None or got_no_at is None or not (torch.equal(got[1], want_at) and all(
                torch.equal(v.nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32)) for v in (got[0], got_no_at))):
            return "max pooling (any window)"
    x, m = ua.nan_to_num(0.0).view(4, 250)[:3].contiguous(), torch.randn(3, 2, generator=g)
    want = torch.stack([x[0] * m[0, j] + x[1] * m[1, j] + x[2] * m[2, j] for j in range(2)], dim=-1)
    got = small_contract(x, m)
    if got is None or not torch.equal(got, want):
        return "small contraction"
    # the closed-form dry steps (optim.closed_form, which calls adam_direction_many / rmsprop_direction_many)
    # against the real optimizers' steps, from a warm state
    from .optim.closed_form import SpareState, dry_direction, fused_forecast
    from .optim.snapshot import OptimizerSnapshot, dry_run

    for name, make in (("Adam dry step", lambda q: torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, amsgrad=True)),
                       ("RMSprop dry step", lambda q: torch.optim.RMSprop([q], lr=1e-2, centered=True, momentum=0.5))):
        q = torch.nn.Parameter(theta.clone())
        opt = make(q)
        q.grad = grad - 0.5
        opt.step()
        step_grad = torch.randn(1000, generator=g)
        start = q.detach().clone()
        want = dry_run(opt, {q: step_grad})[q] - start
        lengths = dry_direction(opt, OptimizerSnapshot(opt), {"q": q}, {"q": start}, {"q": step_grad})
        tolerance = 4 * torch.finfo(torch.float32).eps * torch.maximum(start.abs(), (start + want).abs())
        if lengths is None or not bool(((q.detach() - want).abs() <= tolerance).all()):
            return name
        # the fused forecast (optim.closed_form.fused_forecast) against the real step it replaces
        with torch.no_grad():
            q.copy_(start)
        real = dry_run(opt, {q: step_grad})[q]
        if fused_forecast(opt, {"q": q}, {"q": step_grad}, SpareState()) is None or not bool(((q.detach() - real).abs() <= tolerance).all()):
            return name.replace("dry step", "forecast")
    return None
