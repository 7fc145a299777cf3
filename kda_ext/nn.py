# kda_ext.nn: KimiDeltaAttention, FLA's KDA layer (names, state-dict keys, init) on kda_ext's ops.
"""A Kimi Delta Attention layer that loads FLA checkpoints and compiles whole.

:class:`KimiDeltaAttention` has ``fla.layers.KimiDeltaAttention``'s constructor arguments,
attribute names, parameter shapes, state-dict keys and initialisation, so
``load_state_dict(fla_layer.state_dict(), strict=True)`` works both ways and gives the same
outputs. Everything around the KDA kernels is plain torch (short causal depthwise convolution
with SiLU, gated RMSNorm, projections); the kernels are :func:`kda_ext.chunk_kda` (training,
prefill) and :func:`kda_ext.fused_recurrent_kda` (decoding), torch custom ops, so
``torch.compile(layer, fullgraph=True)`` traces the whole layer without a graph break.

Decoding keeps its state in a cache object with FLA's protocol (``len(cache)``,
``cache[layer_idx]`` -> ``{"recurrent_state", "conv_state"}``, ``cache.update(...)``):
:class:`KDACache` here, or FLA's own ``fla.models.utils.Cache`` (the layouts are FLA's: the
recurrent state ``[N, HV, V, K]`` float32, one conv window ``[N, D, W]`` per projection).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kda_ext  # the kernels are looked up on the package when called (kda_ext.chunk_kda, ...)

__all__ = ["KimiDeltaAttention", "KDACache", "ShortConvolution", "GatedRMSNorm"]


def _token_positions(cu_seqlens: torch.Tensor, T: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, position within its sequence) of each of the T packed tokens."""
    tokens = torch.arange(T, device=cu_seqlens.device)
    sequence = torch.searchsorted(cu_seqlens[1:].to(torch.int64), tokens, right=True)
    return sequence, tokens - cu_seqlens.to(torch.int64)[sequence]


class ShortConvolution(nn.Conv1d):
    """Causal depthwise convolution over time, then SiLU, with a decode cache.

    Parameters are an ``nn.Conv1d(D, D, W, groups=D, padding=W - 1)``'s (FLA's
    ``ShortConvolution`` keys and init). The cache is FLA's: ``[N, D, W]``, the last W inputs of
    each sequence (before the convolution), oldest first; a call continues from it as if those
    inputs had come before.
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False,
                 activation: Optional[str] = "silu", device=None, dtype=None, **kwargs: Any) -> None:
        super().__init__(hidden_size, hidden_size, kernel_size, padding=kernel_size - 1,
                         groups=hidden_size, bias=bias, device=device, dtype=dtype)
        if activation not in (None, "silu", "swish"):
            raise ValueError(
                f"ShortConvolution: `activation` must be 'silu', 'swish' or None, got {activation!r}")
        self.hidden_size = hidden_size
        self.activation = activation

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None,
                output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
                **kwargs: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``x`` ``[B, T, D]`` (B = 1 with ``cu_seqlens``) -> ``(y [B, T, D], cache or None)``."""
        W = self.kernel_size[0]
        if cu_seqlens is None:
            y, final = self._dense(x, cache, W)
        else:
            y, final = self._packed(x, cache, cu_seqlens, W)
        # Sums and activation in float32 (FLA's kernel too), one rounding to x's dtype at the end.
        y = y.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if self.activation is not None:
            y = F.silu(y)
        return y.to(x.dtype), (final if output_final_state else None)

    def _dense(self, x, cache, W):
        B, T, D = x.shape
        xt = x.transpose(1, 2)
        history = (x.new_zeros(B, D, W - 1) if cache is None else cache[..., 1:].to(x.dtype))
        window = torch.cat([history, xt], dim=-1)  # [B, D, W - 1 + T]
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        bias = None if self.bias is None else self.bias.to(compute)
        y = F.conv1d(window.to(compute), self.weight.to(compute), bias, groups=D)
        return y.transpose(1, 2), window[..., -W:]

    def _packed(self, x, cache, cu_seqlens, W):
        # Sequences are packed on one time axis: each tap reads its own sequence's past (or the
        # sequence's cache) only, gathered with index arithmetic so no offset is read on the host.
        _, T, D = x.shape
        N = cu_seqlens.shape[0] - 1
        sequence, position = _token_positions(cu_seqlens, T)
        tokens = torch.arange(T, device=x.device)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        weight = self.weight[:, 0, :].to(compute)  # [D, W]
        y = x.new_zeros(T, D, dtype=compute) if self.bias is None else \
            self.bias.to(compute).expand(T, D).clone()
        for shift in range(W):
            inside = position >= shift
            value = x[0, (tokens - shift).clamp(min=0)]
            if cache is not None:
                # `shift - position` steps before the start: cache slot W - (shift - position).
                slot = (W - shift + position).clamp(min=0, max=W - 1)
                value = torch.where(inside[:, None], value, cache[sequence, :, slot].to(x.dtype))
            else:
                value = value * inside[:, None].to(x.dtype)
            y = y + value.to(compute) * weight[:, W - 1 - shift]
        bos, eos = cu_seqlens[:-1].to(torch.int64), cu_seqlens[1:].to(torch.int64)
        index = eos[:, None] - W + torch.arange(W, device=x.device)  # [N, W]
        from_input = x[0, index.clamp(min=0)].transpose(1, 2)  # [N, D, W]
        inside = (index >= bos[:, None])[:, None, :]
        if cache is not None:
            slot = (torch.arange(W, device=x.device) + (eos - bos)[:, None]).clamp(max=W - 1)
            earlier = torch.gather(cache.to(x.dtype), 2, slot[:, None, :].expand(N, D, W))
        else:
            earlier = torch.zeros_like(from_input)
        return y[None], torch.where(inside, from_input, earlier)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x) * weight * act(gate)`` over the last dim, in float32, returned in x's dtype.

    FLA's ``FusedRMSNormGated`` (its ``weight`` key, its init of ones); ``act`` is ``sigmoid``
    or ``swish``/``silu`` (``gate * sigmoid(gate)``).
    """

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, eps: float = 1e-5,
                 activation: str = "swish", device=None, dtype=None) -> None:
        super().__init__()
        if activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(
                f"GatedRMSNorm: `activation` must be 'swish', 'silu' or 'sigmoid', got {activation!r}")
        self.hidden_size = hidden_size
        self.elementwise_affine = elementwise_affine
        self.eps = eps
        self.activation = activation
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(compute)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(compute)
        gf = gate.to(compute)
        y = y * torch.sigmoid(gf) if self.activation == "sigmoid" else y * F.silu(gf)
        return y.to(x.dtype)


class KDACache:
    """Per-layer decode state with FLA's cache protocol (FLA's ``Cache`` also works).

    ``cache[layer_idx]`` is ``{"recurrent_state": [N, HV, V, K] float32,
    "conv_state": (q, k, v) windows [N, D, W] or None}``; ``get_seq_length()`` counts the tokens
    the first layer has seen.
    """

    def __init__(self) -> None:
        self.states: List[Dict[str, Any]] = []
        self.seen_tokens: List[int] = []

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> Dict[str, Any]:
        return self.states[layer_idx]

    def update(self, recurrent_state: Optional[torch.Tensor] = None, conv_state: Any = None,
               layer_idx: int = 0, offset: int = 1, **kwargs: Any) -> Dict[str, Any]:
        while len(self.states) <= layer_idx:
            self.states.append({"recurrent_state": None, "conv_state": None})
            self.seen_tokens.append(0)
        state = self.states[layer_idx]
        if recurrent_state is not None:
            state["recurrent_state"] = recurrent_state
        if conv_state is not None:
            state["conv_state"] = conv_state
        self.seen_tokens[layer_idx] += offset
        return state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens[layer_idx] if layer_idx < len(self.seen_tokens) else 0


def _quietly(function, *args, **kwargs):
    # chunk_kda warns when T < H (how a head-first layout looks); the layer's layout is right by
    # construction, and short prompts with many heads are normal. Not while compiling: there the
    # warning is not emitted and catch_warnings would break the graph.
    if torch.compiler.is_compiling():
        return function(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="chunk_kda: `q` has shape")
        return function(*args, **kwargs)


class KimiDeltaAttention(nn.Module):
    """Kimi Delta Attention layer: FLA's ``KimiDeltaAttention`` on kda_ext's kernels.

    Args (FLA's, same defaults): ``hidden_size`` (2048), ``expand_v`` (1; V = head_dim *
    expand_v), ``head_dim`` (128; K), ``num_heads`` (16; q/k heads H), ``num_v_heads`` (None: H;
    a multiple of H gives GVA), ``mode`` (``"chunk"`` or ``"fused_recurrent"``),
    ``use_short_conv`` (True), ``allow_neg_eigval`` (False; beta in (0, 2)), ``safe_gate``
    (False), ``lower_bound`` (None; the lower-bound gate), ``conv_size`` (4), ``conv_bias``
    (False), ``layer_idx`` (None; needed with a cache), ``norm_eps`` (1e-5). Other keyword
    arguments are ignored, as FLA does.

    Kernel choice (FLA's rule): with autograd on, chunk; else, in eval mode with at most 64 new
    tokens, the recurrent (decode) kernel; else ``mode``.
    """

    def __init__(self, hidden_size: int = 2048, expand_v: float = 1, head_dim: int = 128,
                 num_heads: int = 16, num_v_heads: Optional[int] = None, mode: str = "chunk",
                 use_short_conv: bool = True, allow_neg_eigval: bool = False,
                 safe_gate: bool = False, lower_bound: Optional[float] = None, conv_size: int = 4,
                 conv_bias: bool = False, layer_idx: Optional[int] = None, norm_eps: float = 1e-5,
                 **kwargs: Any) -> None:
        super().__init__()
        if mode not in ("chunk", "fused_recurrent"):
            raise ValueError(
                f"KimiDeltaAttention: `mode` must be 'chunk' or 'fused_recurrent', got {mode!r}")
        self.mode = mode
        self.allow_neg_eigval = allow_neg_eigval
        self.safe_gate = safe_gate
        self.lower_bound = lower_bound
        self.hidden_size = hidden_size
        self.expand_v = expand_v
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.conv_bias = conv_bias
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads if num_v_heads is not None else num_heads
        self.head_k_dim = head_dim
        self.head_v_dim = int(head_dim * expand_v)
        self.key_dim = int(self.num_heads * self.head_k_dim)
        self.value_dim = int(self.num_v_heads * self.head_v_dim)
        self.layer_idx = layer_idx
        if not math.isclose(head_dim * expand_v, self.head_v_dim, rel_tol=1e-5):
            raise ValueError(
                f"KimiDeltaAttention: head_dim * expand_v must be an integer, got {head_dim} * "
                f"{expand_v} = {head_dim * expand_v}")
        if self.num_v_heads % self.num_heads != 0:
            raise ValueError(
                f"KimiDeltaAttention: `num_v_heads` must be a multiple of `num_heads`={num_heads}, "
                f"got {self.num_v_heads}")

        # Creation order and init follow FLA's layer, so one seed gives the same parameters.
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias)
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias)
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, bias=conv_bias)
        self.gate_dim = int(self.num_v_heads * self.head_k_dim)
        self.f_proj = nn.Sequential(
            nn.Linear(hidden_size, self.head_v_dim, bias=False),
            nn.Linear(self.head_v_dim, self.gate_dim, bias=False),
        )
        self.b_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        if safe_gate:
            A_log = torch.zeros(self.num_v_heads, dtype=torch.float32)
        else:
            A_log = torch.log(torch.empty(self.num_v_heads, dtype=torch.float32).uniform_(1, 16))
        self.A_log = nn.Parameter(A_log)
        self.A_log._no_weight_decay = True
        # dt ~ log-uniform in [1e-3, 1e-1]; dt_bias = softplus^-1(dt), so softplus(dt_bias) = dt.
        dt = torch.exp(torch.rand(self.gate_dim, dtype=torch.float32)
                       * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True
        self.g_proj = nn.Sequential(
            nn.Linear(hidden_size, self.head_v_dim, bias=False),
            nn.Linear(self.head_v_dim, self.value_dim, bias=True),
        )
        self.o_norm = GatedRMSNorm(self.head_v_dim, activation="sigmoid", eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def _layer_cache(self, past_key_values) -> Optional[Dict[str, Any]]:
        if past_key_values is None:
            return None
        if self.layer_idx is None:
            raise ValueError("KimiDeltaAttention requires `layer_idx` when `past_key_values` is given")
        return past_key_values[self.layer_idx] if len(past_key_values) > self.layer_idx else None

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Any = None, use_cache: Optional[bool] = False,
                output_attentions: Optional[bool] = False,
                **kwargs: Any) -> Tuple[torch.Tensor, None, Any]:
        """``hidden_states`` ``[B, T, hidden_size]`` -> ``(o [B, T, hidden_size], None, cache)``.

        ``attention_mask``: ``[B, S]`` 0/1 padding mask (its last T columns are used); padded
        tokens are dropped and their outputs are 0. ``cu_seqlens`` (keyword, ``[N + 1]``, B = 1):
        packed sequences, which take precedence over the mask. ``past_key_values``: a cache
        (:class:`KDACache` or FLA's), read and, with ``use_cache``, written.
        """
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "KimiDeltaAttention: `attention_mask` must be a [batch_size, seq_len] 0/1 padding "
                f"mask, got shape {tuple(attention_mask.shape)}")
        batch_size, q_len, _ = hidden_states.shape
        if torch.is_grad_enabled():
            mode = "chunk"
        elif q_len <= 64 and not self.training:
            mode = "fused_recurrent"
        else:
            mode = self.mode
        if self.training and mode != "chunk":
            raise RuntimeError("KimiDeltaAttention: only chunk mode is supported in training")

        last_state = self._layer_cache(past_key_values)
        cu_seqlens = kwargs.get("cu_seqlens")
        indices = None
        if cu_seqlens is None and attention_mask is not None:
            mask = attention_mask[:, -q_len:].to(torch.bool)
            indices = torch.nonzero(mask.flatten()).flatten()
            lengths = mask.sum(-1, dtype=torch.int32)
            cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
            hidden_states = hidden_states.flatten(0, 1)[indices].unsqueeze(0)

        conv_state_q = conv_state_k = conv_state_v = None
        if self.use_short_conv:
            if last_state is not None and last_state.get("conv_state") is not None:
                conv_state_q, conv_state_k, conv_state_v = last_state["conv_state"]
            q, conv_state_q = self.q_conv1d(self.q_proj(hidden_states), conv_state_q, use_cache, cu_seqlens)
            k, conv_state_k = self.k_conv1d(self.k_proj(hidden_states), conv_state_k, use_cache, cu_seqlens)
            v, conv_state_v = self.v_conv1d(self.v_proj(hidden_states), conv_state_v, use_cache, cu_seqlens)
        else:
            q = F.silu(self.q_proj(hidden_states))
            k = F.silu(self.k_proj(hidden_states))
            v = F.silu(self.v_proj(hidden_states))
        g = self.f_proj(hidden_states).unflatten(-1, (self.num_v_heads, self.head_k_dim))
        beta = self.b_proj(hidden_states)
        q = q.unflatten(-1, (self.num_heads, self.head_k_dim))
        k = k.unflatten(-1, (self.num_heads, self.head_k_dim))
        v = v.unflatten(-1, (self.num_v_heads, self.head_v_dim))

        # The kernels read the gate parameters in float32 (float64 for a float64 layer), as FLA's
        # do whatever dtype the module was cast to.
        param_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        gate_kwargs = dict(A_log=self.A_log.to(param_dtype), dt_bias=self.dt_bias.to(param_dtype))
        recurrent_state = last_state["recurrent_state"] if last_state is not None else None
        flags = dict(initial_state=recurrent_state, output_final_state=bool(use_cache),
                     use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                     use_beta_sigmoid_in_kernel=True, allow_neg_eigval=self.allow_neg_eigval,
                     lower_bound=self.lower_bound, state_v_first=True, cu_seqlens=cu_seqlens)
        if mode == "chunk":
            o, recurrent_state = _quietly(kda_ext.chunk_kda, q, k, v, g, beta, safe_gate=self.safe_gate,
                                          **flags, **gate_kwargs)
        else:
            o, recurrent_state = kda_ext.fused_recurrent_kda(q, k, v, g, beta, **flags, **gate_kwargs)

        if past_key_values is not None:
            past_key_values.update(
                recurrent_state=recurrent_state,
                conv_state=(conv_state_q, conv_state_k, conv_state_v) if self.use_short_conv else None,
                layer_idx=self.layer_idx, offset=q_len)

        gate = self.g_proj(hidden_states).unflatten(-1, (self.num_v_heads, self.head_v_dim))
        o = self.o_proj(self.o_norm(o, gate).flatten(-2))
        if indices is not None:
            o = o.new_zeros(batch_size * q_len, o.shape[-1]).index_copy(0, indices, o[0])
            o = o.view(batch_size, q_len, -1)
        return o, None, past_key_values
