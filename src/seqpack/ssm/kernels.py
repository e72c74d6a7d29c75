"""Optional CUDA kernels for packed SSM mixers, import-guarded.

Only kernels that take per-token document indices run on the packed row itself:

- ``mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias,
  dt_bias, A, D, chunk_size, initial_states=None, seq_idx=None, dt_limit=(0.0, inf), return_final_states=False,
  activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
  ngroups=1, norm_before_gate=True)`` — Mamba-2's fused conv + SSD scan + gated norm + out projection, the call
  transformers' ``Mamba2Mixer`` makes in training, here with ``seq_idx`` [1, T] int32 so that both the causal
  convolution and the scan restart at every document.

Mamba-1's ``selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
return_last_state=False)`` (``mamba_ssm.ops.selective_scan_interface``) has no ``seq_idx``: Mamba-1 always runs as
document rows (see ``segments.py``) — through transformers' own mixer, which then uses those kernels one document
per row, when they are installed and the row is on CUDA; else through seqpack's torch rows (``mamba1.py``).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class SSMKernels:
    """The optional kernels found at import time (None = not installed)."""

    mamba_split_conv1d_scan_combined: Optional[Callable] = None
    selective_scan_fn: Optional[Callable] = None


def _optional(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # not installed, or a build that does not match this torch/GPU
        return None


@functools.lru_cache(maxsize=1)
def available_kernels() -> SSMKernels:
    return SSMKernels(
        mamba_split_conv1d_scan_combined=_optional("mamba_ssm.ops.triton.ssd_combined",
                                                   "mamba_split_conv1d_scan_combined"),
        selective_scan_fn=_optional("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"))


def on_kernel_device(x) -> bool:
    """The fused kernels are CUDA (Triton) kernels."""
    return x.is_cuda


def fused_mamba2_kernel(hidden_states) -> Optional[Callable]:
    """``mamba_split_conv1d_scan_combined`` when it can run on ``hidden_states``' device, else None."""
    kernel = available_kernels().mamba_split_conv1d_scan_combined
    return kernel if kernel is not None and on_kernel_device(hidden_states) else None


def mamba1_uses_kernels(hidden_states) -> bool:
    """Whether transformers' Mamba-1 mixer finds mamba_ssm's CUDA kernels for ``hidden_states``."""
    return available_kernels().selective_scan_fn is not None and on_kernel_device(hidden_states)


def mamba2_packed_fused(mixer, hidden_states, seq_idx, kernel):
    """Mamba-2 mixer on a packed row through the fused kernel. hidden_states [1, T, H], seq_idx [1, T] int32
    -> [1, T, H]. Same arguments as transformers' ``Mamba2Mixer`` training call, plus ``seq_idx``."""
    projected_states = mixer.in_proj(hidden_states)  # [1, T, I + conv_dim + heads]
    A = -mixer.A_log.float().exp()
    return kernel(
        projected_states, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, mixer.dt_bias, A,
        D=mixer.D, chunk_size=mixer.chunk_size, seq_idx=seq_idx, dt_limit=mixer.time_step_limit,
        activation=mixer.activation, rmsnorm_weight=mixer.norm.weight, rmsnorm_eps=mixer.norm.variance_epsilon,
        outproj_weight=mixer.out_proj.weight, outproj_bias=mixer.out_proj.bias, headdim=mixer.head_dim,
        ngroups=mixer.n_groups, norm_before_gate=False, return_final_states=False,
    )
