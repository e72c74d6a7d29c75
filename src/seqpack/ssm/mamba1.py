"""Mamba-1 mixer on document rows in pure torch, with a backward linear in the document length.

Shape legend: nb document rows, L their (padded) length, H hidden, I intermediate (inner) size, N state size,
R time-step rank.

transformers' torch fallback for Mamba-1 (``mamba_selective_scan``) indexes the full [nb, I, L, N] tensors at
every time step; autograd then materialises a full-size gradient per step, so its backward is quadratic in L
(measured here: 0.3 / 1.6 / 11 CPU s for L = 256 / 512 / 1024). This module computes the same forward — same
operations in the same order as ``MambaMixer.forward`` without a cache — but takes the per-step slices once with
``unbind`` (one gradient buffer), so backward is linear in L. It is used for packed rows when the CUDA kernels
are not there; tests compare it with transformers' unmodified class document by document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """u, delta, z [nb, I, L]; A [I, N]; B, C [nb, N, L]; D, delta_bias [I] -> [nb, I, L].
    transformers' ``mamba_selective_scan(..., delta_softplus=True)`` recurrence, zero initial state."""
    dtype = u.dtype
    delta = F.softplus(delta + delta_bias.to(delta.dtype)[..., None])
    B, C = B.transpose(1, 2), C.transpose(1, 2)  # [nb, L, N]
    discrete_A = torch.exp(A[None, :, None, :] * delta[:, :, :, None])  # [nb, I, L, N]
    deltaB_u = delta[:, :, :, None] * B[:, None, :, :].float() * u[:, :, :, None].float()  # [nb, I, L, N]
    state = torch.zeros(u.shape[0], u.shape[1], A.shape[-1], dtype=dtype, device=u.device)  # [nb, I, N]
    outputs = []
    for a, bu, c in zip(discrete_A.unbind(2), deltaB_u.unbind(2), C.unbind(1)):
        state = a * state + bu
        outputs.append(torch.matmul(state.to(dtype), c.unsqueeze(-1))[:, :, 0])  # [nb, I]
    y = torch.stack(outputs, dim=-1) + u * D[None, :, None]
    return y * F.silu(z)


def mamba1_rows_forward(mixer, rows):
    """``MambaMixer`` on document rows [nb, L, H] -> [nb, L, H] (no cache, no mask)."""
    from transformers.models.mamba.modeling_mamba import causal_conv1d_fn

    dtype = rows.dtype
    projected_states = mixer.in_proj(rows).transpose(1, 2)  # [nb, 2I, L]
    A = -torch.exp(mixer.A_log.float())  # [I, N]
    hidden_states, gate = projected_states.chunk(2, dim=1)  # [nb, I, L] each
    hidden_states = causal_conv1d_fn(hidden_states, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                                     activation=mixer.activation)
    time_step, B, C = torch.split(mixer.x_proj(hidden_states.transpose(1, 2)),
                                  [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
    time_step = mixer.dt_proj.weight @ time_step.transpose(1, 2)  # [nb, I, L]
    y = selective_scan(hidden_states, time_step, A, B.transpose(1, 2), C.transpose(1, 2), mixer.D.float(), gate,
                       mixer.dt_proj.bias.float())
    return mixer.out_proj(y.transpose(1, 2).to(dtype))
