# tests/test_fla_backend.py: kda_ext.fla.register() with FLA's real registry (when FLA imports) and
# with stand-ins of older FLA layouts (always): what it accepts, declines, and how it is switched.
import inspect
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import kda_ext
import kda_ext.fla as kfla

try:
    import fla.ops.kda as fla_kda
    FLA_ERROR = None
except Exception as error:  # ImportError, or an FLA that fails to import here
    fla_kda, FLA_ERROR = None, f"{type(error).__name__}: {error}"
requires_fla = pytest.mark.skipif(
    fla_kda is None,
    reason=f"flash-linear-attention not importable ({FLA_ERROR}); pip install flash-linear-attention triton")


@pytest.fixture(autouse=True)
def _unregistered():
    kfla.unregister()
    yield
    kfla.unregister()


def inputs(B=2, T=40, H=2, HV=4, K=16, V=8, dtype=torch.float32, requires_grad=False):
    q, k = torch.randn(2, B, T, H, K, dtype=dtype).unbind(0)
    v = torch.randn(B, T, HV, V, dtype=dtype)
    g, beta = torch.randn(B, T, HV, K, dtype=dtype), torch.randn(B, T, HV, dtype=dtype)
    A_log, dt_bias = torch.randn(HV), torch.randn(HV * K)
    h0 = torch.randn(B, HV, V, K)
    tensors = dict(q=q, k=k, v=v, g=g, beta=beta, A_log=A_log, dt_bias=dt_bias, initial_state=h0)
    for t in tensors.values():
        t.requires_grad_(requires_grad)
    return tensors


KIMI = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
            state_v_first=True, output_final_state=True)


def test_import_has_no_side_effects():
    code = "import sys, kda_ext, kda_ext.fla; print('fla' in sys.modules, kda_ext.fla.is_registered())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_register_without_fla_says_how_to_install(monkeypatch):
    for name in ("fla", "fla.ops", "fla.ops.kda"):
        monkeypatch.setitem(sys.modules, name, None)  # `import fla.ops.kda` raises ImportError
    with pytest.raises(ImportError, match="needs flash-linear-attention.*pip install flash-linear-attention"):
        kfla.register()
    assert not kfla.is_registered()


def test_priority_must_be_an_int():
    with pytest.raises(TypeError, match="`priority` must be an int, got '4'"):
        kfla.register(priority="4")


# --- FLA's real registry ---------------------------------------------------------------------------

def _fla_registries():
    """The registries kda_ext registered into, found through FLA's own tables."""
    return [registry for registry, _ in kfla._registrations]


def _backend(function_name):
    for registry, backend in kfla._registrations:
        if registry._backends.get(kfla.BACKEND_TYPE) is backend and hasattr(backend, function_name):
            return backend
    raise AssertionError(f"no registered kda_ext backend serves {function_name}")


@requires_fla
@pytest.mark.parametrize("case", ["plain", "kimi-gva", "varlen-lower-bound", "positional"])
def test_fla_chunk_kda_runs_kda_ext_forward_and_backward(case):
    # FLA's Triton kernels cannot run on the CPU: a result from fla.ops.kda.chunk_kda here came
    # through the registry; it must equal kda_ext's, outputs and gradients, bit for bit.
    kfla.register()
    t = inputs(requires_grad=True)
    q, k, v, g, beta = (t[n] for n in ("q", "k", "v", "g", "beta"))
    if case == "plain":
        args, kwargs = (q, k, v, torch.nn.functional.logsigmoid(g), beta.sigmoid()), {}
    elif case == "kimi-gva":
        args = (q, k, v, g, beta)
        kwargs = dict(KIMI, A_log=t["A_log"], dt_bias=t["dt_bias"], initial_state=t["initial_state"])
    elif case == "varlen-lower-bound":
        args = tuple(x.flatten(0, 1).unsqueeze(0) for x in (q, k, v, g, beta))
        kwargs = dict(KIMI, dt_bias=t["dt_bias"], safe_gate=True, lower_bound=-5.0, chunk_size=32,
                      cu_seqlens=torch.tensor([0, 7, 64, 80]))
    else:  # FLA's positional order, whatever the installed version's is, up to state_v_first
        parameters = inspect.signature(inspect.unwrap(fla_kda.chunk_kda)).parameters
        names = list(parameters)
        values = dict(q=q, k=k, v=v, g=torch.nn.functional.logsigmoid(g), beta=beta.sigmoid(), scale=0.3,
                      initial_state=t["initial_state"], output_final_state=True,
                      use_qk_l2norm_in_kernel=True, state_v_first=True)
        positional = names[:names.index("state_v_first") + 1]
        args = tuple(values.pop(n) if n in values else parameters[n].default for n in positional)
        kwargs = values
    theirs = fla_kda.chunk_kda(*args, **kwargs)
    ours = kda_ext.chunk_kda(*args, **kwargs) if case != "positional" else _kda_ext_by_name(args, kwargs)
    assert torch.equal(theirs[0], ours[0])
    if kwargs.get("output_final_state"):
        assert torch.equal(theirs[1], ours[1])
    leaves = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.requires_grad]
    do = torch.randn_like(theirs[0])
    grads_theirs = torch.autograd.grad((theirs[0] * do).sum(), leaves, allow_unused=True)
    grads_ours = torch.autograd.grad((ours[0] * do).sum(), leaves, allow_unused=True)
    assert any(gr is not None for gr in grads_theirs)
    for a, b in zip(grads_theirs, grads_ours):
        assert (a is None and b is None) or torch.equal(a, b)


def _kda_ext_by_name(args, kwargs):
    names = list(inspect.signature(inspect.unwrap(fla_kda.chunk_kda)).parameters)
    return kda_ext.chunk_kda(**dict(zip(names, args)), **kwargs)


@requires_fla
def test_adds_no_warning_to_flas_calls():
    kfla.register()
    t = inputs(T=3, H=4, HV=4)  # fewer steps than heads: kda_ext's own function warns about layout
    args = (t["q"], t["k"], t["v"], torch.nn.functional.logsigmoid(t["g"]), t["beta"].sigmoid())
    with pytest.warns(UserWarning, match="fewer steps than heads"):
        kda_ext.chunk_kda(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, _ = fla_kda.chunk_kda(*args)
    assert torch.equal(o, kda_ext.chunk_kda(*args)[0])


@requires_fla
def test_low_precision_gate_parameters_are_read_as_float32():
    # A model cast to bf16 has bf16 A_log/dt_bias; FLA's kernels convert them on load, and so
    # does the backend: the result is kda_ext's with the float32 values, gradients in bf16.
    kfla.register()
    t = inputs()
    A_log = t["A_log"].to(torch.bfloat16).requires_grad_(True)
    dt_bias = t["dt_bias"].to(torch.bfloat16).requires_grad_(True)
    args = tuple(t[n] for n in ("q", "k", "v", "g", "beta"))
    kwargs = dict(KIMI, initial_state=t["initial_state"])
    o, ht = fla_kda.chunk_kda(*args, A_log=A_log, dt_bias=dt_bias, **kwargs)
    want_o, want_ht = kda_ext.chunk_kda(*args, A_log=A_log.float(), dt_bias=dt_bias.float(), **kwargs)
    assert torch.equal(o, want_o) and torch.equal(ht, want_ht)
    grads = torch.autograd.grad(o.sum(), (A_log, dt_bias))
    want = torch.autograd.grad(want_o.sum(), (A_log, dt_bias))
    assert all(gr.dtype == torch.bfloat16 and torch.equal(gr, w) for gr, w in zip(grads, want))
    with torch.no_grad():
        step = fla_kda.fused_recurrent_kda(*(x[:, :1] for x in args), A_log=A_log, dt_bias=dt_bias, **kwargs)
        want_step = kda_ext.fused_recurrent_kda(*(x[:, :1] for x in args), A_log=A_log.float(),
                                                dt_bias=dt_bias.float(), **kwargs)
    assert torch.equal(step[0], want_step[0]) and torch.equal(step[1], want_step[1])
    # The decode kernel reads a bf16 state into float32 as FLA's does (FLA's chunk path asserts fp32).
    low = dict(kwargs, initial_state=t["initial_state"].to(torch.bfloat16))
    with torch.no_grad():
        step = fla_kda.fused_recurrent_kda(*(x[:, :1] for x in args), A_log=A_log, dt_bias=dt_bias, **low)
        want_step = kda_ext.fused_recurrent_kda(*(x[:, :1] for x in args), A_log=A_log.float(),
                                                dt_bias=dt_bias.float(),
                                                **dict(kwargs, initial_state=low["initial_state"].float()))
    assert torch.equal(step[0], want_step[0]) and torch.equal(step[1], want_step[1])


@requires_fla
def test_fla_fused_recurrent_kda_runs_kda_ext():
    kfla.register()
    t = inputs(T=1)
    kwargs = dict(KIMI, A_log=t["A_log"], dt_bias=t["dt_bias"], initial_state=t["initial_state"])
    args = tuple(t[n] for n in ("q", "k", "v", "g", "beta"))
    with torch.no_grad():
        theirs = fla_kda.fused_recurrent_kda(*args, **kwargs)
        ours = kda_ext.fused_recurrent_kda(*args, **kwargs)
    assert torch.equal(theirs[0], ours[0]) and torch.equal(theirs[1], ours[1])


def _declined(backend, function_name, *args, **kwargs):
    accepted, reason = backend.verify(function_name, *args, **kwargs)
    assert not accepted, f"{function_name} accepted a call it should decline"
    assert isinstance(reason, str) and reason
    return reason


@requires_fla
@pytest.mark.parametrize("change, reason", [
    (dict(cp_context=object()), "cp_context"),
    (dict(use_graph=True), "`use_graph`=True is not supported"),
    (dict(max_num_seqs=4), "`max_num_seqs`=4 is not supported"),
    (dict(check_inputs=True), "kda_ext has no argument `check_inputs`"),
    (dict(some_future_flag=1), "kda_ext has no argument `some_future_flag`"),
    (dict(initial_state=torch.randn(2, 4, 8, 16, dtype=torch.bfloat16)), "`initial_state` must be torch.float32"),
    (dict(A_log=torch.arange(4)), "`A_log` must be a floating-point tensor"),
    (dict(lower_bound=1.0), "lower_bound=1.0"),
    (dict(A_log=None), "`A_log` is None"),
    (dict(chunk_size=16), "chunk_size=16"),
    (dict(cu_seqlens=torch.tensor([0.0, 40.0])), "`cu_seqlens` must be an int32/int64 tensor"),
])
def test_chunk_verifier_declines_what_kda_ext_does_not_serve(change, reason):
    kfla.register()
    backend = _backend("chunk_kda")
    t = inputs()
    kwargs = dict(KIMI, A_log=t["A_log"], dt_bias=t["dt_bias"], initial_state=t["initial_state"])
    args = tuple(t[n] for n in ("q", "k", "v", "g", "beta"))
    assert backend.verify("chunk_kda", *args, **kwargs) == (True, None)
    kwargs.update(change)
    assert reason in _declined(backend, "chunk_kda", *args, **kwargs)


@requires_fla
def test_chunk_verifier_declines_devices_dtypes_and_sizes():
    kfla.register()
    backend = _backend("chunk_kda")

    def call(**shape):
        dtype = shape.pop("dtype", torch.float32)
        device = shape.pop("device", "cpu")
        t = inputs(**shape, dtype=dtype)
        return tuple(t[n].to(device) for n in ("q", "k", "v", "g", "beta"))

    assert "CPU and CUDA kernels only" in _declined(backend, "chunk_kda", *call(device="meta"))
    assert "head dims K=320" in _declined(backend, "chunk_kda", *call(K=320))
    assert "V=512" in _declined(backend, "chunk_kda", *call(V=512))
    q, k, v, g, beta = call()
    assert "different dtypes" in _declined(backend, "chunk_kda", q, k, v.half(), g, beta)
    assert "not a floating-point tensor" in _declined(backend, "chunk_kda", q, k, v, g, beta.long())
    assert backend.verify("chunk_kda", *call(dtype=torch.float64)) == (True, None)  # fp64 on the CPU
    assert "does not fit FLA's chunk_kda signature" in _declined(backend, "chunk_kda", q, k, v)
    if not kda_ext.chunk._HAS_CUDA_KERNELS and torch.cuda.is_available():
        assert "no CUDA kernels" in _declined(backend, "chunk_kda", *call(device="cuda"))


@requires_fla
def test_decode_verifier_declines_pools_per_channel_beta_and_gradients():
    kfla.register()
    backend = _backend("fused_recurrent_kda_fwd")
    t = inputs(T=1)
    args = tuple(t[n] for n in ("q", "k", "v", "g", "beta"))
    kwargs = dict(A_log=t["A_log"], dt_bias=t["dt_bias"], initial_state=t["initial_state"],
                  inplace_final_state=False, state_v_first=True, use_gate_in_kernel=True)
    assert backend.verify("fused_recurrent_kda_fwd", *args, **kwargs) == (True, None)
    for change, reason in [
        (dict(inplace_final_state=True), "`inplace_final_state`=True"),
        (dict(ssm_state_indices=torch.arange(2)), "`ssm_state_indices`"),
        (dict(num_accepted_tokens=torch.ones(2, dtype=torch.long)), "`num_accepted_tokens`"),
        (dict(out=torch.empty_like(t["v"])), "`out`"),
        (dict(dt_bias=torch.randn(4)), "dt_bias has 4 elements"),
    ]:
        assert reason in _declined(backend, "fused_recurrent_kda_fwd", *args, **dict(kwargs, **change))
    per_channel_beta = torch.rand(2, 1, 4, 8)
    assert "one beta per head" in _declined(backend, "fused_recurrent_kda_fwd", *args[:4], per_channel_beta,
                                            **kwargs)
    q = args[0].clone().requires_grad_(True)
    assert "forward only" in _declined(backend, "fused_recurrent_kda_fwd", q, *args[1:], **kwargs)


@requires_fla
def test_environment_switch_turns_it_off(monkeypatch):
    kfla.register()
    t = inputs()
    args = (t["q"], t["k"], t["v"], torch.nn.functional.logsigmoid(t["g"]), t["beta"].sigmoid())
    monkeypatch.setenv(kfla.ENV_VAR, "0")
    assert all(not backend.is_enabled() for _, backend in kfla._registrations)
    with pytest.raises(Exception) as raised:  # FLA's own (Triton) kernels run, and fail on CPU tensors
        fla_kda.chunk_kda(*args)
    assert not str(raised.value).startswith("chunk_kda:")  # not a kda_ext error
    monkeypatch.delenv(kfla.ENV_VAR)
    assert all(backend.is_enabled() for _, backend in kfla._registrations)
    assert torch.equal(fla_kda.chunk_kda(*args)[0], kda_ext.chunk_kda(*args)[0])


@requires_fla
def test_orders_after_flash_kda_by_default_and_priority_moves_it():
    kfla.register()
    chunk_registry = next(r for r in _fla_registries() if "flash_kda" in r._backends)
    order = [b.backend_type for b in chunk_registry._get_sorted_backends()]
    assert order.index("flash_kda") < order.index("kda_ext")
    kfla.register(priority=2)
    order = [b.backend_type for b in chunk_registry._get_sorted_backends()]
    assert order.index("kda_ext") < order.index("flash_kda")
    assert list(chunk_registry._backends).count("kda_ext") == 1  # replaced, not added twice


@requires_fla
def test_unregister_removes_it_from_flas_tables():
    kfla.register()
    registries = _fla_registries()
    old = _backend("chunk_kda")
    assert registries and all(kfla.BACKEND_TYPE in r._backends for r in registries)
    assert kfla.unregister() is True
    assert not kfla.is_registered()
    assert all(kfla.BACKEND_TYPE not in r._backends for r in registries)
    t = inputs()
    assert old.verify("chunk_kda", *(t[n] for n in ("q", "k", "v", "g", "beta"))) == (
        False, "kda_ext was unregistered")
    assert kfla.unregister() is False


# --- stand-ins of FLA's other layouts --------------------------------------------------------------

# FLA's first registry (February 2026, fla/ops/backends/__init__.py), re-stated: a class-level
# table of per-operation registries, filled by importing fla.ops.<op>.backends, and a dispatch
# decorator that tries backends by priority, asks each verifier, and falls back to the function.
FIRST_REGISTRY = '''
import os
from functools import wraps

class BaseBackend:
    backend_type = "base"; package_name = None; env_var = None; default_enable = True; priority = 5

    @classmethod
    def is_available(cls):
        return True

    @classmethod
    def is_enabled(cls):
        if cls.env_var is None:
            return True
        return os.environ.get(cls.env_var, "1" if cls.default_enable else "0") != "0"

    @classmethod
    def can_use(cls):
        return cls.is_available() and cls.is_enabled()

    def verify(self, func_name, *args, **kwargs):
        check = getattr(self, func_name + "_verifier", None)
        return (True, None) if check is None else check(*args, **kwargs)

class BackendRegistry:
    _registries = {}
    _initialized = set()

    def __init__(self, operation_name):
        self._backends = {}
        self._active = None
        BackendRegistry._registries[operation_name] = self

    def register(self, backend):
        self._backends[backend.backend_type] = backend
        self._update_active_backend()

    def _get_sorted_backends(self):
        return sorted(self._backends.values(), key=lambda b: b.priority)

    def _update_active_backend(self):
        self._active = next((b for b in self._get_sorted_backends() if b.can_use()), None)

    @classmethod
    def ensure_initialized(cls, operation):
        if operation not in cls._initialized:
            __import__("fla.ops." + operation + ".backends")
            cls._initialized.add(operation)

def dispatch(operation):
    def decorator(func):
        @wraps(func)
        def wrapper(*args, **kwargs):
            BackendRegistry.ensure_initialized(operation)
            registry = BackendRegistry._registries.get(operation)
            for backend in (registry._get_sorted_backends() if registry else []):
                if backend.can_use() and backend.verify(func.__name__, *args, **kwargs)[0]:
                    impl = getattr(backend, func.__name__, None)
                    if impl is not None:
                        return impl(*args, **kwargs)
            return func(*args, **kwargs)
        return wrapper
    return decorator
'''

# The KDA entry point of that era: its own positional order (cu_seqlens before safe_gate, the
# state layout only as a keyword), dispatched through the `kda` operation.
FIRST_KDA = '''
from fla.ops.backends import dispatch

@dispatch("kda")
def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
              cu_seqlens=None, cu_seqlens_cpu=None, safe_gate=False, lower_bound=None,
              disable_recompute=False, return_intermediate_states=False, cp_context=None, **kwargs):
    raise RuntimeError("FLA's own kernel ran")
'''

BACKENDS_PACKAGE = '''
from fla.ops.backends import BackendRegistry
kda_registry = BackendRegistry("kda")
'''


def _install_fake_fla(monkeypatch, tmp_path, files):
    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
        monkeypatch.delitem(sys.modules, name)
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def restore_fla_modules():
    saved = {m: mod for m, mod in sys.modules.items() if m == "fla" or m.startswith("fla.")}
    yield
    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_first_registry_layout(monkeypatch, tmp_path, restore_fla_modules):
    _install_fake_fla(monkeypatch, tmp_path, {
        "fla/__init__.py": "__version__ = '0.4.2'\n",
        "fla/ops/__init__.py": "",
        "fla/ops/backends/__init__.py": FIRST_REGISTRY,
        "fla/ops/kda/__init__.py": "from .chunk import chunk_kda\n",
        "fla/ops/kda/chunk.py": FIRST_KDA,
        "fla/ops/kda/backends/__init__.py": BACKENDS_PACKAGE,
    })
    import fla.ops.kda as first
    kfla.register()
    t = inputs(requires_grad=True)
    args = (t["q"], t["k"], t["v"], t["g"], t["beta"], None, t["initial_state"], True, True, True, True)
    # Positional up to use_beta_sigmoid_in_kernel in that era's order; the layout by keyword.
    o, ht = first.chunk_kda(*args, A_log=t["A_log"], dt_bias=t["dt_bias"], transpose_state_layout=True)
    with pytest.warns(DeprecationWarning):
        want_o, want_ht = kda_ext.chunk_kda(*args, A_log=t["A_log"], dt_bias=t["dt_bias"],
                                            transpose_state_layout=True)
    assert torch.equal(o, want_o) and torch.equal(ht, want_ht)
    assert o.grad_fn is not None
    # A call kda_ext declines reaches FLA's own function.
    with pytest.raises(RuntimeError, match="FLA's own kernel ran"):
        first.chunk_kda(*args[:5], cp_context=object())
    registry = sys.modules["fla.ops.backends"].BackendRegistry._registries["kda"]
    assert registry._active is registry._backends["kda_ext"]
    monkeypatch.setenv(kfla.ENV_VAR, "0")
    with pytest.raises(RuntimeError, match="FLA's own kernel ran"):
        first.chunk_kda(*args[:5])
    monkeypatch.delenv(kfla.ENV_VAR)
    assert kfla.unregister() and "kda_ext" not in registry._backends and registry._active is None


def test_registry_without_dispatched_chunk_kda(monkeypatch, tmp_path, restore_fla_modules):
    _install_fake_fla(monkeypatch, tmp_path, {
        "fla/__init__.py": "__version__ = '0.4.1'\n",
        "fla/ops/__init__.py": "",
        "fla/ops/backends/__init__.py": FIRST_REGISTRY,
        "fla/ops/kda/__init__.py": "def chunk_kda(q, k, v, g, beta, **kwargs):\n    raise RuntimeError\n",
    })
    with pytest.raises(ImportError, match=r"this FLA \(0.4.1\) has a backend registry but does not route"):
        kfla.register()


def test_fla_before_the_registry(monkeypatch, tmp_path, restore_fla_modules):
    _install_fake_fla(monkeypatch, tmp_path, {
        "fla/__init__.py": "__version__ = '0.4.0'\n",
        "fla/ops/__init__.py": "",
        "fla/ops/kda/__init__.py": "def chunk_kda(q, k, v, g, beta, **kwargs):\n    raise RuntimeError\n",
    })
    with pytest.raises(ImportError, match=r"this FLA \(0.4.0\) predates FLA's backend registry"):
        kfla.register()


# --- the plugin that runs FLA's own tests with the backend (scripts/pytest_kda_ext_fla.py) ----------

PLUGIN_TEST = '''
import torch
import fla.ops.kda as fla_kda

def test_calls_fla():
    q, k = torch.randn(2, 1, 8, 2, 16).unbind(0)
    v, g, beta = torch.randn(1, 8, 2, 16), -torch.rand(1, 8, 2, 16), torch.rand(1, 8, 2)
    fla_kda.chunk_kda(q, k, v, g, beta)
    fla_kda.chunk_kda(q, k, v, g, beta, chunk_size=64, use_graph=False)
'''


@requires_fla
@pytest.mark.parametrize("calls_fla", [True, False])
def test_upstream_test_plugin_counts_served_calls(tmp_path, calls_fla):
    (tmp_path / "test_upstream.py").write_text(PLUGIN_TEST if calls_fla else "def test_nothing():\n    pass\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(root, "scripts"), root, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_kda_ext_fla", "-p",
                             "no:cacheprovider", "test_upstream.py"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    if calls_fla:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "chunk_kda: served 2" in result.stdout
    else:  # a run that never reached kda_ext must not pass
        assert result.returncode != 0 and "served no chunk_kda call" in result.stdout


def test_a_wrapper_over_kda_ext_functions_does_not_change_what_is_served(monkeypatch):
    # Seen on the device (session 15): a counting wrapper (*args, **kwargs) over kda_ext.chunk.chunk_kda
    # made the backend read the wrapper's signature and decline every call ("kda_ext has no
    # argument `q`"). The served arguments come from the definitions.
    original_chunk, original_recurrent = kda_ext.chunk.chunk_kda, kda_ext.fused_recurrent_kda
    monkeypatch.setattr(kda_ext.chunk, "chunk_kda", lambda *a, **k: original_chunk(*a, **k))
    monkeypatch.setattr(kda_ext, "fused_recurrent_kda", lambda *a, **k: original_recurrent(*a, **k))
    t = inputs()
    call = kfla._chunk_call(inspect.signature(original_chunk), (t["q"], t["k"], t["v"], t["g"], t["beta"]),
                            dict(scale=0.5))
    assert {"q", "k", "v", "g", "beta", "scale"} <= set(call)
    assert {"q", "scale"} <= kfla._RECURRENT_PARAMETERS
