# kda_ext.fla: kda_ext as a backend of flash-linear-attention's KDA operation (explicit opt-in).
"""Route FLA's ``chunk_kda`` (forward and backward) and its decode kernel to kda_ext.

``import kda_ext.fla`` changes nothing; :func:`register` does. After it, every call of
``fla.ops.kda.chunk_kda`` that kda_ext serves exactly (same semantics, every argument
understood) runs kda_ext's kernels, with autograd; every other call is declined with a reason,
and FLA runs its own kernels for it. FLA logs each first acceptance and refusal at INFO level
(logger ``fla``), e.g. ``[FLA Backend] kda.chunk_kda -> kda_ext rejected: ...``.

The decode path: FLA's ``fused_recurrent_kda`` calls an inner ``fused_recurrent_kda_fwd``, which
FLA dispatches through the operation registry ``kda``; kda_ext serves it with
:func:`kda_ext.fused_recurrent_kda` when the call is a plain one (no in-place state pool, no
speculative-decoding indices, no preallocated output).

Switches, in FLA's style:

* ``FLA_KDA_EXT=0`` turns the backend off (FLA reads it when it dispatches; some FLA releases
  read it once per process). Any other value, or unset, leaves it on.
* ``FLA_DISABLE_BACKEND_DISPATCH=1`` (FLA's own) bypasses every backend, this one included.

Order against FLA's other backends: FLA tries backends by ascending ``priority``. FlashKDA
(``FLA_FLASH_KDA``) has priority 3 and accepts inference-only calls (no autograd, bf16,
K = V = 128, every ``*_in_kernel`` flag, ``safe_gate``); kda_ext's default is 4, so where
FlashKDA is installed it keeps the calls it accepts and kda_ext takes the rest (training
included). ``register(priority=2)`` puts kda_ext first.

FLA versions: the registry exists from FLA's backend dispatch system (February 2026,
``fla.ops.backends``) and moved to ``fla.backends`` (per-function registries for public entry
points) later; both are found by feature detection, nothing is pinned. FLA releases before the
registry (e.g. the lower-bound gate release of December 2025) have nothing to register with:
:func:`register` raises an ``ImportError`` that says so.
"""

from __future__ import annotations

import importlib
import inspect
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["register", "unregister", "is_registered", "BACKEND_TYPE", "ENV_VAR", "DEFAULT_PRIORITY"]

BACKEND_TYPE = "kda_ext"
# FLA names a backend's switch FLA_<BACKEND_TYPE> (FLA_FLASH_KDA, FLA_TILELANG); newer FLA also
# reads FLA_<BACKEND_TYPE> as a force-enable, which is then the same variable.
ENV_VAR = "FLA_KDA_EXT"
DEFAULT_PRIORITY = 4  # FlashKDA is 3, FLA's default (TileLang, ...) is 5: lower runs first

_LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)

# Arguments FLA has and kda_ext does not: acceptable only at the value that means "not used".
_CHUNK_UNUSED = {"use_graph": False, "max_num_seqs": None}
# The in-place state pool (vLLM/SGLang-style) and speculative decoding of the inner decode
# function: kda_ext's decode kernel has the pool (not speculative decoding), but its semantics
# are not yet compared with FLA's on a GPU, so these calls stay with FLA for now.
_RECURRENT_UNUSED = {"inplace_final_state": False, "ssm_state_indices": None,
                     "num_accepted_tokens": None, "out": None}
# kda_ext extras that FLA does not have: a caller of FLA passing one gets FLA's behaviour.
_KDA_EXT_ONLY = {"check_inputs"}

# One record per registry we registered into: (registry, backend instance).
_registrations: List[Tuple[Any, Any]] = []


class _Declined(Exception):
    """A reason to leave a call to FLA's own kernels."""


# --- finding FLA's registry -----------------------------------------------------------------------

def _import_fla_kda():
    try:
        import fla.ops.kda as fla_kda  # noqa: F401  (also loads FLA's own KDA backends)
    except ImportError as error:
        raise ImportError(
            "kda_ext.fla.register() needs flash-linear-attention (its `fla` package, with triton): "
            f"importing fla.ops.kda failed ({type(error).__name__}: {error}). Install it with "
            "`pip install flash-linear-attention triton`, or use kda_ext.chunk_kda / "
            "kda_ext.nn.KimiDeltaAttention directly") from error
    return fla_kda


def _fla_version() -> str:
    try:
        import fla
        return str(getattr(fla, "__version__", "unknown"))
    except ImportError:
        return "unknown"


def _is_dispatched(function: Callable) -> bool:
    """True when FLA wrapped `function` in its dispatch wrapper.

    functools.wraps copies the wrapped function's names onto the wrapper, so the wrapper is told
    by its code object: defined inside ``dispatch`` (``co_qualname``, Python 3.11+), or closing
    over the operation name.
    """
    for _ in range(16):
        code = getattr(function, "__code__", None)
        if code is not None and ("dispatch" in getattr(code, "co_qualname", "")
                                 or "operation" in code.co_freevars):
            return True
        function = getattr(function, "__wrapped__", None)
        if function is None:
            return False
    return False


def _find_registries(fla_kda) -> Tuple[type, List[Any]]:
    """FLA's BaseBackend and the registries that route chunk_kda and the decode kernel."""
    chunk_kda = fla_kda.chunk_kda
    try:
        backends = importlib.import_module("fla.backends")  # FLA 0.6 and later
    except ImportError:
        backends = None
    if backends is not None and hasattr(backends, "BackendRegistry"):
        if getattr(backends, "_DISPATCH_DISABLED", False):
            return backends.BaseBackend, []
        registries = []
        by_function = getattr(backends, "_function_registries", None)
        if by_function is not None:
            registry = by_function.get(inspect.unwrap(chunk_kda))
            if registry is not None:
                registries.append(registry)
        load = getattr(backends, "_load_operation_registry", None) or getattr(
            backends, "_get_operation_registry", None)
        if load is not None:
            registries.append(load("kda"))
        if not registries:
            # A later layout: registries owned by the backend package (best effort).
            kda_backends = importlib.import_module("fla.ops.kda.backends")
            registries = [value for value in vars(kda_backends).values()
                          if isinstance(value, backends.BackendRegistry)]
        if registries:
            return backends.BaseBackend, registries
    try:
        backends = importlib.import_module("fla.ops.backends")  # February 2026 to FLA 0.5
    except ImportError:
        backends = None
    if backends is not None and hasattr(backends, "BackendRegistry"):
        registry_class = backends.BackendRegistry
        if getattr(backends, "_DISPATCH_DISABLED", False):
            return backends.BaseBackend, []
        if not _is_dispatched(chunk_kda):
            raise ImportError(
                f"kda_ext.fla.register(): this FLA ({_fla_version()}) has a backend registry but "
                "does not route fla.ops.kda.chunk_kda through it (FLA does from April 2026, when "
                "its FlashKDA backend arrived); upgrade FLA, or use kda_ext.chunk_kda directly")
        if hasattr(registry_class, "ensure_initialized"):
            registry_class.ensure_initialized("kda")  # FLA's own KDA backends first
        registry = registry_class._registries.get("kda") or registry_class("kda")
        return backends.BaseBackend, [registry]
    raise ImportError(
        f"kda_ext.fla.register(): this FLA ({_fla_version()}) predates FLA's backend registry "
        "(fla.ops.backends, February 2026), so kda_ext cannot be registered with it; upgrade FLA, "
        "or use kda_ext.chunk_kda / kda_ext.nn.KimiDeltaAttention directly")


def _signature_of(module_name: str, attribute: str) -> Optional[inspect.Signature]:
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return None
    return inspect.signature(inspect.unwrap(function))


# --- binding a call the way FLA's function reads it -----------------------------------------------

def _bind(signature: inspect.Signature, args: tuple, kwargs: dict,
          what: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(named arguments with defaults, extra keyword arguments) of a call of FLA's function."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise _Declined(f"the call does not fit FLA's {what} signature ({error})") from None
    bound.apply_defaults()
    named, extra = {}, {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            extra.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise _Declined(f"unexpected extra positional arguments to {what}")
        else:
            named[name] = value
    return named, extra


def _split_known(named: Dict[str, Any], extra: Dict[str, Any], known: frozenset, unused: Dict[str, Any],
                 signature: inspect.Signature) -> Dict[str, Any]:
    """The arguments to hand to kda_ext; decline any argument it lacks that is in use."""
    call = {}
    for name, value in list(named.items()) + list(extra.items()):
        # `unused` first: an argument kda_ext also has (the decode kernel's state pool) is still
        # served only at its neutral value until its semantics are checked against FLA's.
        if name in unused:
            neutral = unused[name]
            if value is neutral or (not isinstance(value, torch.Tensor) and value == neutral):
                continue
            raise _Declined(f"`{name}`={_short(value)} is not supported by kda_ext")
        if name in known and name not in _KDA_EXT_ONLY:
            call[name] = value
            continue
        parameter = signature.parameters.get(name)
        if parameter is not None and parameter.default is not inspect.Parameter.empty \
                and value is parameter.default:
            continue  # an argument kda_ext lacks, left at FLA's default
        raise _Declined(f"kda_ext has no argument `{name}` (got {_short(value)})")
    return call


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)} on {value.device}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- what kda_ext serves ---------------------------------------------------------------------------

def _has_cuda_kernels() -> bool:
    from . import chunk
    return bool(chunk._HAS_CUDA_KERNELS)


def _check_tensors(call: Dict[str, Any], convert_state: bool = False) -> torch.dtype:
    """Decline the devices, dtypes and sizes kda_ext's kernels do not cover; return q's dtype.

    ``convert_state``: FLA's decode kernel reads any float initial state into float32 (its chunk
    path asserts float32), so there a lower-precision state is converted instead of declined.
    """
    tensors = {name: call.get(name) for name in ("q", "k", "v", "g", "beta")}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise _Declined(f"`{name}` is not a tensor")
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    device = q.device
    if device.type == "cuda":
        if not _has_cuda_kernels():
            raise _Declined("this kda_ext build has no CUDA kernels (built CPU-only)")
    elif device.type != "cpu":
        raise _Declined(f"kda_ext has CPU and CUDA kernels only, got tensors on {device}")
    if not (q.dtype in _LOW_PRECISION or (q.dtype == torch.float64 and device.type == "cpu")):
        raise _Declined(f"q's dtype {q.dtype} is not one kda_ext serves on {device.type}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise _Declined(f"q, k and v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype})")
    for name in ("g", "beta"):
        if not tensors[name].is_floating_point():
            raise _Declined(f"`{name}` is not a floating-point tensor ({tensors[name].dtype})")
    if q.dim() != 4 or v.dim() != 4:
        raise _Declined("q and v are not 4-D [B, T, H, D] tensors")
    if not 0 < q.shape[-1] <= 256 or not 0 < v.shape[-1] <= 256:
        raise _Declined(f"head dims K={q.shape[-1]}, V={v.shape[-1]}: kda_ext serves 1..256")
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    h0 = call.get("initial_state")
    if h0 is not None and (not isinstance(h0, torch.Tensor) or h0.dtype != state_dtype):
        if not (convert_state and isinstance(h0, torch.Tensor) and h0.is_floating_point()):
            raise _Declined(f"`initial_state` must be {state_dtype} for kda_ext, got {_short(h0)}")
        call["initial_state"] = h0.to(state_dtype)
    cu_seqlens = call.get("cu_seqlens")
    if cu_seqlens is not None and (not isinstance(cu_seqlens, torch.Tensor)
                                   or cu_seqlens.dtype not in _INDEX_DTYPES):
        raise _Declined(f"`cu_seqlens` must be an int32/int64 tensor, got {_short(cu_seqlens)}")
    return q.dtype


def _check_gate(call: Dict[str, Any], q_dtype: torch.dtype) -> None:
    """The in-kernel gate as kda_ext computes it; A_log/dt_bias converted as FLA's kernels load them.

    FLA's kernels read ``A_log`` and ``dt_bias`` in any float dtype and convert each value to
    float32 on load (a model cast to bf16 has bf16 ones); kda_ext takes float32 (float64 with
    float64 q), so the call gets the converted tensors: the same values, and autograd hands the
    gradients back in the parameters' own dtypes.
    """
    if not call.get("use_gate_in_kernel", False):
        return
    lower_bound = call.get("lower_bound")
    if call.get("A_log") is None and lower_bound is None:
        raise _Declined("`A_log` is None with the in-kernel gate and no lower_bound")
    if lower_bound is not None:
        if isinstance(lower_bound, bool) or not isinstance(lower_bound, (int, float)) \
                or not math.isfinite(lower_bound) or lower_bound > 0:
            raise _Declined(f"lower_bound={lower_bound!r}: kda_ext takes a finite value <= 0")
    wanted = torch.float64 if q_dtype == torch.float64 else torch.float32
    for name in ("A_log", "dt_bias"):
        x = call.get(name)
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise _Declined(f"`{name}` must be a floating-point tensor, got {_short(x)}")
        if x.dtype != wanted:
            call[name] = x.to(wanted)


def _known_parameters(function: Callable, extra: Tuple[str, ...] = ()) -> frozenset:
    parameters = inspect.signature(function).parameters.values()
    return frozenset([p.name for p in parameters if p.kind not in (
        inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)] + list(extra))


# The arguments kda_ext's chunk_kda and fused_recurrent_kda take, read from their definitions when
# this module is imported: a wrapper later put over the module attributes (counting or profiling
# calls) must not change what the backend serves; the calls themselves go through the attributes.
from . import chunk as _chunk_module, recurrent as _recurrent_module  # noqa: E402

_CHUNK_PARAMETERS = _known_parameters(_chunk_module.chunk_kda, ("transpose_state_layout",))
_RECURRENT_PARAMETERS = _known_parameters(_recurrent_module.fused_recurrent_kda)


def _chunk_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> Dict[str, Any]:
    named, extra = _bind(signature, args, kwargs, "chunk_kda")
    known = _CHUNK_PARAMETERS
    call = _split_known(named, extra, known, _CHUNK_UNUSED, signature)
    if call.get("cp_context") is not None:
        raise _Declined("context parallelism (cp_context) is not supported by kda_ext")
    q_dtype = _check_tensors(call)
    _check_gate(call, q_dtype)
    chunk_size = call.get("chunk_size", 64)
    if isinstance(chunk_size, bool) or chunk_size not in (32, 64):
        raise _Declined(f"chunk_size={chunk_size!r}: kda_ext serves 32 and 64")
    return call


def _recurrent_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> Dict[str, Any]:
    named, extra = _bind(signature, args, kwargs, "fused_recurrent_kda_fwd")
    call = _split_known(named, extra, _RECURRENT_PARAMETERS, _RECURRENT_UNUSED, signature)
    q_dtype = _check_tensors(call, convert_state=True)
    _check_gate(call, q_dtype)
    beta, v, q = call["beta"], call["v"], call["q"]
    if beta.dim() != 3:
        raise _Declined(f"beta of shape {list(beta.shape)}: kda_ext takes one beta per head [B, T, HV]")
    dt_bias = call.get("dt_bias")
    if call.get("use_gate_in_kernel") and dt_bias is not None \
            and dt_bias.numel() != v.shape[2] * q.shape[-1]:
        raise _Declined(f"dt_bias has {dt_bias.numel()} elements; kda_ext takes HV*K")
    if torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in call.values()):
        # FLA's decode kernel has no autograd; kda_ext's raises instead of returning no gradient.
        raise _Declined("an input requires grad; the decode kernel is forward only")
    return call


def _make_backend_class(base: type, chosen_priority: int, chunk_signature, recurrent_signature):
    class KdaExtBackend(base):
        """kda_ext's kernels behind FLA's `kda` dispatch (see :mod:`kda_ext.fla`)."""

        backend_type = BACKEND_TYPE
        package_name = None  # kda_ext is imported already
        env_var = ENV_VAR
        default_enable = True
        priority = chosen_priority
        retired = False  # set by unregister(): a stale reference declines everything

        def _verify(self, build, signature, args, kwargs) -> Tuple[bool, Optional[str]]:
            if type(self).retired:
                return False, "kda_ext was unregistered"
            try:
                build(signature, args, kwargs)
            except _Declined as reason:
                return False, str(reason)
            return True, None

    if chunk_signature is not None:
        def chunk_kda_verifier(self, *args, **kwargs):
            return self._verify(_chunk_call, chunk_signature, args, kwargs)

        def chunk_kda(self, *args, **kwargs):
            from .chunk import chunk_kda as kda_ext_chunk_kda
            call = _chunk_call(chunk_signature, args, kwargs)
            with warnings.catch_warnings():
                # kda_ext warns when T < H (how a head-first layout looks); FLA's function does not,
                # and a backend should not add warnings to FLA's calls.
                warnings.filterwarnings("ignore", message="chunk_kda: `q` has shape")
                return kda_ext_chunk_kda(**call)

        KdaExtBackend.chunk_kda_verifier = chunk_kda_verifier
        KdaExtBackend.chunk_kda = chunk_kda
    if recurrent_signature is not None:
        def fused_recurrent_kda_fwd_verifier(self, *args, **kwargs):
            return self._verify(_recurrent_call, recurrent_signature, args, kwargs)

        def fused_recurrent_kda_fwd(self, *args, **kwargs):
            import kda_ext
            return kda_ext.fused_recurrent_kda(**_recurrent_call(recurrent_signature, args, kwargs))

        KdaExtBackend.fused_recurrent_kda_fwd_verifier = fused_recurrent_kda_fwd_verifier
        KdaExtBackend.fused_recurrent_kda_fwd = fused_recurrent_kda_fwd
    return KdaExtBackend


# --- public API ------------------------------------------------------------------------------------

def register(priority: int = DEFAULT_PRIORITY) -> None:
    """Register kda_ext as a backend of FLA's ``kda`` operation (``chunk_kda`` and its decode kernel).

    Explicit: nothing happens on import. Calling it again replaces the registration (e.g. with
    another priority). See the module docstring for what is accepted, the switch ``FLA_KDA_EXT=0``
    and the order against FlashKDA.

    Args:
        priority: FLA's ordering key; lower runs first (FlashKDA is 3, FLA's default is 5).

    Raises:
        ImportError: FLA is not installed (or fails to import), or predates FLA's backend registry.
        TypeError: ``priority`` is not an int.
    """
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"kda_ext.fla.register: `priority` must be an int, got {priority!r}")
    fla_kda = _import_fla_kda()
    base, registries = _find_registries(fla_kda)
    if not registries:
        warnings.warn(
            "kda_ext.fla.register(): FLA_DISABLE_BACKEND_DISPATCH=1 makes FLA bypass every backend; "
            "kda_ext was not registered", RuntimeWarning, stacklevel=2)
        return
    unregister()
    chunk_signature = inspect.signature(inspect.unwrap(fla_kda.chunk_kda))
    recurrent_signature = _signature_of("fla.ops.kda.fused_recurrent", "fused_recurrent_kda_fwd")
    backend_class = _make_backend_class(base, priority, chunk_signature, recurrent_signature)
    for registry in registries:
        backend = backend_class()
        registry.register(backend)
        _registrations.append((registry, backend))


def unregister() -> bool:
    """Remove kda_ext from FLA's registries; returns whether it was registered.

    FLA's registry has no removal method: the entry is taken out of its backend table, and the
    removed backend also declines every call, so a copy FLA kept elsewhere cannot serve one.
    """
    was_registered = bool(_registrations)
    while _registrations:
        registry, backend = _registrations.pop()
        type(backend).retired = True
        table = getattr(registry, "_backends", None)
        if isinstance(table, dict) and table.get(backend.backend_type) is backend:
            del table[backend.backend_type]
        if getattr(registry, "_active", None) is backend:
            update = getattr(registry, "_update_active_backend", None)
            registry._active = None
            if update is not None:
                update()
    return was_registered


def is_registered() -> bool:
    """Whether :func:`register` is in effect (the switch ``FLA_KDA_EXT`` is not consulted)."""
    return bool(_registrations)
