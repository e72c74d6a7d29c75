"""The fast varlen kernels behind one adapter each, and the resolver that picks a backend for one call.

Shape legend: T packed tokens, N query heads, Nkv key/value heads, D head dim.

Each installed kernel is adapted ONCE from its signature (``inspect.signature``), not per call:

- torch 2.10 ``varlen_attn(..., max_q, max_k, is_causal=False, return_aux=None)``: ``is_causal``, no
  window (refused), no scale (q pre-scaled when the factor to 1/sqrt(D) is a power of two, exact; else refused),
  KV heads repeated to N.
- torch 2.11 ``varlen_attn(..., *, return_aux, scale, window_size)``: ``window_size=(W-1, 0)`` / ``(-1, 0)``
  causal / ``(-1, -1)`` non-causal, ``scale``; no ``enable_gqa``, so KV heads are repeated to N.
- torch 2.12+ adds ``enable_gqa``, ``seqused_k``, ``block_table``: as 2.11 with ``enable_gqa=True``.
- flash-attn 2.6+ ``flash_attn_varlen_func(..., dropout_p, softmax_scale, causal, window_size, softcap,
  alibi_slopes, ...)``: GQA shared natively; softcap with dropout refused (flash-attn refuses it).

Both are FlashAttention inside: float16/bfloat16 only, head dim <= 256. ``auto`` tries flash-attn, then torch
varlen, and falls back to the exact SDPA path for anything neither can run (float32, softcap on torch varlen,
...); an explicitly requested kernel that cannot run the call raises ValueError before any kernel is called.
Under ``torch.autocast`` the compute dtype is the autocast dtype (RoPE leaves q/k in float32 there), so q/k/v are
cast to it before a kernel, as transformers' flash path does, and the output stays in that dtype.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .kernels import AttnSpec

BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")
KERNELS = ("flash_attn", "torch_varlen")  # the order ``auto`` tries them in
HALF = (torch.float16, torch.bfloat16)
KERNEL_DEVICE_TYPES = ("cuda",)  # tests add "cpu" to run stand-in kernels with the real signatures


@dataclass(frozen=True)
class KernelAdapter:
    """One installed varlen kernel and what its signature lets it do."""

    name: str  # "flash_attn" or "torch_varlen"
    fn: Callable
    params: frozenset  # parameter names of fn
    max_head_dim: int = 256

    @property
    def window(self) -> bool:  # sliding window / causal through window_size=(left, right)
        return "window_size" in self.params

    @property
    def gqa(self) -> str:  # "native" (flash-attn shares KV heads), "flag" (enable_gqa), "repeat" (we repeat KV)
        if self.name == "flash_attn":
            return "native"
        return "flag" if "enable_gqa" in self.params else "repeat"

    def scale_arg(self) -> str | None:
        return next((p for p in ("softmax_scale", "scale") if p in self.params), None)

    def refusal(self, spec: AttnSpec, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why this kernel cannot run a call with ``spec`` on ``dtype`` inputs of head dim D, or None."""
        name = f"{self.fn.__module__}.{self.fn.__name__}"
        if dtype not in HALF:
            return f"{name} runs float16/bfloat16 only, got {dtype}"
        if head_dim > self.max_head_dim or head_dim % 8:
            return f"{name} needs a head dim that is a multiple of 8 and <= {self.max_head_dim}, got {head_dim}"
        if spec.sliding_window is not None and not self.window:
            return f"{name} has no window_size parameter, so it cannot apply sliding window {spec.sliding_window}"
        if not spec.causal and (spec.sliding_window is not None or spec.alibi_slopes is not None):
            return f"{name} is not used for non-causal attention with a sliding window or ALiBi"
        if spec.softcap is not None and "softcap" not in self.params:
            return f"{name} cannot apply logit softcap ({spec.softcap})"
        dropout = spec.dropout if torch.is_grad_enabled() else 0.0
        if dropout and "dropout_p" not in self.params:
            return f"{name} cannot apply attention dropout ({spec.dropout}); set attention_dropout=0"
        if dropout and spec.softcap is not None:
            return f"{name} cannot combine logit softcap with attention dropout ({spec.dropout})"
        if spec.alibi_slopes is not None and "alibi_slopes" not in self.params:
            return f"{name} cannot apply ALiBi biases"
        if self.scale_arg() is None and _prescale_factor(spec.scale, head_dim) is None:
            return (f"{name} takes no scale and the model's scale {spec.scale:g} is not a power-of-two multiple of "
                    f"1/sqrt({head_dim}), so pre-scaling q would round; torch >= 2.11 takes a scale")
        return None

    def __call__(self, q, k, v, cu: torch.Tensor, max_seqlen: int, spec: AttnSpec) -> torch.Tensor:
        """q [T, N, D], k/v [T, Nkv, D] (already in a half dtype), cu [n+1] int32 on q's device -> [T, N, D]."""
        N, Nkv, D = q.shape[1], k.shape[1], q.shape[2]
        kwargs = {}
        left = spec.sliding_window - 1 if spec.sliding_window is not None else -1
        if self.window:
            kwargs["window_size"] = (left, 0) if spec.causal else (-1, -1)  # a tuple: torch 2.11 compares to (-1, 0)
        if self.name == "flash_attn" or not self.window:
            kwargs["causal" if self.name == "flash_attn" else "is_causal"] = spec.causal
        scale_arg = self.scale_arg()
        if scale_arg is not None:
            kwargs[scale_arg] = spec.scale
        elif (factor := _prescale_factor(spec.scale, D)) != 1.0:
            q = q * factor  # a power of two: exact in any float format
        if N != Nkv and self.gqa == "flag":
            kwargs["enable_gqa"] = True
        elif N != Nkv and self.gqa == "repeat":
            k, v = (x.repeat_interleave(N // Nkv, dim=1) for x in (k, v))  # [T, Nkv, D] -> [T, N, D]
        if self.name == "flash_attn":
            kwargs["dropout_p"] = spec.dropout if torch.is_grad_enabled() else 0.0
            if spec.softcap is not None:
                kwargs["softcap"] = spec.softcap
            if spec.alibi_slopes is not None:
                kwargs["alibi_slopes"] = spec.alibi_slopes.to(q.device, torch.float32)
        return self.fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)

    def with_lse(self, q, k, v, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, spec: AttnSpec,
                 causal: bool, window: tuple[int, int] = (-1, -1)):
        """One block of ring attention: q [Tq, N, D], k/v [Tk, Nkv, D] (half dtype) -> (out [Tq, N, D],
        lse [Tq, N] float32). ``causal`` (bottom-right aligned, as FlashAttention) with ``spec``'s sliding window,
        or not causal with an explicit ``window`` = (left, right) key range around query i + Tk - Tq."""
        N, Nkv, D = q.shape[1], k.shape[1], q.shape[2]
        kwargs = {}
        if causal:
            window = (spec.sliding_window - 1 if spec.sliding_window is not None else -1, 0)
        if self.window:
            kwargs["window_size"] = tuple(window)
        elif window[0] != -1 or (window[1] != -1 and not causal):
            raise ValueError(f"{self.fn.__module__}.{self.fn.__name__} has no window_size parameter, so it cannot "
                             "run a windowed ring attention block")
        if self.name == "flash_attn" or not self.window:
            kwargs["causal" if self.name == "flash_attn" else "is_causal"] = causal
        scale_arg = self.scale_arg()
        if scale_arg is not None:
            kwargs[scale_arg] = spec.scale
        elif (factor := _prescale_factor(spec.scale, D)) != 1.0:
            q = q * factor
        if N != Nkv and self.gqa == "flag":
            kwargs["enable_gqa"] = True
        elif N != Nkv and self.gqa == "repeat":
            k, v = (x.repeat_interleave(N // Nkv, dim=1) for x in (k, v))  # [Tk, Nkv, D] -> [Tk, N, D]
        if self.name == "flash_attn":
            if spec.softcap is not None:
                kwargs["softcap"] = spec.softcap
            out, lse, _ = self.fn(q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **kwargs)
        else:
            out, lse = self.fn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=_aux_request_lse(), **kwargs)
        return out, lse_rows(lse, q.shape[0], N)


def _aux_request_lse():
    """torch's ``AuxRequest(lse=True)`` (``return_aux`` of ``varlen_attn``)."""
    try:
        from torch.nn.attention.varlen import AuxRequest
    except ImportError:  # a torch without the varlen module (stand-in kernels in tests)
        from collections import namedtuple

        AuxRequest = namedtuple("AuxRequest", ["lse"])
    return AuxRequest(lse=True)


def lse_rows(lse: torch.Tensor, T: int, N: int) -> torch.Tensor:
    """A kernel's log-sum-exp as [T, N] float32: FlashAttention's varlen kernels return it as [N, T]."""
    if lse.dim() == 3 and lse.shape[0] == 1:  # a batch dimension of one
        lse = lse[0]
    if lse.shape == (N, T):
        return lse.float().transpose(0, 1)
    if lse.shape == (T, N):
        return lse.float()
    raise ValueError(f"kernel returned a log-sum-exp of shape {tuple(lse.shape)}, expected ({N}, {T})")


def _prescale_factor(scale: float, head_dim: int) -> float | None:
    """c with scale = c / sqrt(D) when c is a power of two (multiplying q by it is exact), else None."""
    c = scale * math.sqrt(head_dim)
    if abs(c - 1.0) < 1e-6:
        return 1.0
    mantissa, _ = math.frexp(c)
    return c if c > 0 and abs(mantissa - 0.5) < 1e-9 else None


def adapt_torch_varlen(fn: Callable) -> KernelAdapter:
    """Adapter for ``torch.nn.attention.varlen.varlen_attn`` from its signature (any torch from 2.10, the first
    with it)."""
    params = frozenset(inspect.signature(fn).parameters)
    if "window_size" not in params and "is_causal" not in params:
        raise TypeError(f"unrecognised varlen_attn signature {inspect.signature(fn)}: neither window_size nor "
                        "is_causal; use backend='sdpa' or 'flash_attn'")
    return KernelAdapter("torch_varlen", fn, params)


def adapt_flash_attn(fn: Callable) -> KernelAdapter:
    """Adapter for flash-attn's ``flash_attn_varlen_func`` (2.6+: softcap, window, ALiBi, GQA) from its signature."""
    params = frozenset(inspect.signature(fn).parameters)
    if not {"softmax_scale", "causal"} <= params:
        raise TypeError(f"unrecognised flash_attn_varlen_func signature {inspect.signature(fn)}; flash-attn >= 2.6 "
                        "is supported")
    return KernelAdapter("flash_attn", fn, params)


@functools.lru_cache(maxsize=None)
def kernel(name: str) -> KernelAdapter | None:
    """The installed kernel ``name`` adapted to its signature (built once), or None if it is not installed."""
    try:
        if name == "flash_attn":
            from flash_attn import flash_attn_varlen_func

            return adapt_flash_attn(flash_attn_varlen_func)
        from torch.nn.attention.varlen import varlen_attn
    except (ImportError, OSError):  # not installed, or built against another torch / CUDA
        return None
    return adapt_torch_varlen(varlen_attn)


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and kernel("flash_attn") is not None


def torch_varlen_available() -> bool:
    return torch.cuda.is_available() and kernel("torch_varlen") is not None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in: the autocast dtype when autocast is on for x's device, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, *HALF):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def kernel_refusal(name: str, device: torch.device, spec: AttnSpec, dtype: torch.dtype,
                   head_dim: int) -> str | None:
    """Why kernel ``name`` cannot run this call, or None when it can."""
    if device.type not in KERNEL_DEVICE_TYPES:
        return f"needs CUDA tensors, got device {device}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "needs CUDA, but torch.cuda.is_available() is False"
    adapter = kernel(name)
    if adapter is None:
        return ("needs the flash-attn package (pip install flash-attn)" if name == "flash_attn" else
                f"needs torch.nn.attention.varlen (torch >= 2.10; this is torch {torch.__version__})")
    reason = adapter.refusal(spec, dtype, head_dim)
    return None if reason is None else f"cannot run this call: {reason}"


def resolve_backend(name: str, device: torch.device, spec: AttnSpec, dtype: torch.dtype = torch.float32,
                    head_dim: int = 64) -> str:
    """The backend that runs a call on ``device`` with ``dtype`` (the compute dtype, see :func:`compute_dtype`)
    inputs of head dim D. ``auto``: the first kernel that can, else ``sdpa``; an explicit kernel that cannot run
    the call raises ValueError naming the reason.

        >>> resolve_backend("auto", torch.device("cuda"), AttnSpec(scale=0.125), torch.float32, 64)  # doctest: +SKIP
        'sdpa'
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "sdpa":
        return name
    for candidate in (KERNELS if name == "auto" else (name,)):
        reason = kernel_refusal(candidate, device, spec, dtype, head_dim)
        if reason is None:
            return candidate
        if name != "auto":
            raise ValueError(f"attention backend {name!r} {reason}; use backend='auto' (picks a backend that can) "
                             "or 'sdpa' (exact, any device and dtype)")
    return "sdpa"
