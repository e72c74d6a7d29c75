"""Stand-ins for the CUDA varlen kernels we cannot run here, with the real parameter lists, in plain torch.

Each mirrors its original's interface exactly (parameter names, defaults, keyword-only markers, window and causal
semantics: key j is visible to query i when i - left <= j <= i + right, -1 = unbounded; GQA only where the
original shares KV heads) and records the arguments of every call in ``CALLS``. They compute in float32 and
return the input dtype, as FlashAttention does; unlike it they also accept float32, so the adapter's own dtype
rule is what keeps float32 away from them.

Shape legend: T packed tokens, N query heads, Nkv key/value heads, D head dim.
"""

from __future__ import annotations

import math

import torch

CALLS: list[dict] = []


def _attend(q, k, v, cu_q, scale, left, right, softcap=0.0, alibi_slopes=None, cu_k=None, lse=False):
    """Per-document attention with a (left, right) window around query i + Lk - Lq (FlashAttention's bottom-right
    alignment when a document has different query and key lengths). q [Tq, N, D], k/v [Tk, Nkv, D], Nkv | N ->
    [Tq, N, D], and with ``lse`` also the log-sum-exp [N, Tq] float32 (the layout FlashAttention's varlen kernels
    return; a row that sees no key gets +inf and output 0, as theirs do)."""
    if q.shape[1] % k.shape[1]:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    rep = q.shape[1] // k.shape[1]
    cu_k = cu_q if cu_k is None else cu_k
    out = torch.empty_like(q)
    lses = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    for a, b, ka, kb in zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:]):
        qd = q[a:b].float().transpose(0, 1)  # [N, Lq, D]
        kd, vd = (x[ka:kb].float().repeat_interleave(rep, 1).transpose(0, 1) for x in (k, v))  # [N, Lk, D]
        s = qd @ kd.transpose(-1, -2) * scale  # [N, Lq, Lk]
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i, j = torch.arange(b - a)[:, None] + (kb - ka) - (b - a), torch.arange(kb - ka)[None, :]
        if alibi_slopes is not None:  # flash-attn: -slope * |i - j|
            s = s - alibi_slopes.float()[:, None, None] * (i - j).abs()
        visible = torch.ones(b - a, kb - ka, dtype=torch.bool)
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        s = s.masked_fill(~visible, -math.inf)
        row_lse = torch.logsumexp(s, -1)  # [N, Lq]
        out[a:b] = (torch.exp(s - row_lse[..., None]).nan_to_num(0.0) @ vd).transpose(0, 1).to(q.dtype)
        lses[:, a:b] = torch.where(row_lse == -math.inf, math.inf, row_lse)
    return (out, lses) if lse else out


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10 ``torch.nn.attention.varlen.varlen_attn`` (2.9 has none): is_causal, default scale, no window,
    no GQA."""
    CALLS.append(dict(fn="2.10", q=query, k=key, v=value, is_causal=is_causal))
    if key.shape[1] != query.shape[1]:
        raise RuntimeError("varlen_attn 2.10 stand-in: query and key/value must have the same number of heads")
    return _attend(query, key, value, cu_seq_q, query.shape[-1] ** -0.5, -1, 0 if is_causal else -1, cu_k=cu_seq_k,
                   lse=return_aux is not None and return_aux.lse)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    """torch 2.11: keyword-only scale and window_size (is_causal = window_size == (-1, 0)), no enable_gqa."""
    CALLS.append(dict(fn="2.11", q=query, k=key, v=value, scale=scale, window_size=window_size))
    if key.shape[1] != query.shape[1]:
        raise RuntimeError("varlen_attn 2.11 stand-in: query and key/value must have the same number of heads")
    left, right = window_size
    return _attend(query, key, value, cu_seq_q, scale or query.shape[-1] ** -0.5, left, right, cu_k=cu_seq_k,
                   lse=return_aux is not None and return_aux.lse)


def varlen_attn_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.12+: adds enable_gqa (required when Hq != Hkv), seqused_k, block_table, num_splits."""
    CALLS.append(dict(fn="2.12", q=query, k=key, v=value, scale=scale, window_size=window_size,
                      enable_gqa=enable_gqa))
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={query.shape[1]} "
                         f"and Hkv={key.shape[1]}. Try setting enable_gqa=True for GQA.")
    left, right = window_size
    return _attend(query, key, value, cu_seq_q, scale or query.shape[-1] ** -0.5, left, right, cu_k=cu_seq_k,
                   lse=return_aux is not None and return_aux.lse)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2.6's ``flash_attn_varlen_func``: GQA shared natively; causal + window_size, softcap, ALiBi."""
    CALLS.append(dict(fn="flash", q=q, k=k, v=v, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size, softcap=softcap, dropout_p=dropout_p, alibi_slopes=alibi_slopes))
    if dropout_p:
        raise NotImplementedError("flash stand-in: dropout is random; tests call it with dropout_p=0")
    left, right = window_size
    if causal:
        right = 0
    out = _attend(q, k, v, cu_seqlens_q, softmax_scale or q.shape[-1] ** -0.5, left, right, softcap, alibi_slopes,
                  cu_k=cu_seqlens_k, lse=return_attn_probs)
    return (*out, None) if return_attn_probs else out  # (out, softmax_lse [N, T] float32, S_dmask)


def install(monkeypatch, flash=None, torch_varlen=None) -> None:
    """Make these stand-ins the installed kernels for one test (``monkeypatch``), CPU tensors allowed; clears CALLS."""
    from seqpack.attention import backends

    table = {"flash_attn": flash and backends.adapt_flash_attn(flash),
             "torch_varlen": torch_varlen and backends.adapt_torch_varlen(torch_varlen)}
    monkeypatch.setattr(backends, "kernel", table.get)
    monkeypatch.setattr(backends, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    CALLS.clear()


SIGNATURES = {"2.10": varlen_attn_2_10, "2.11": varlen_attn_2_11, "2.12": varlen_attn_2_12,
              "flash": flash_attn_varlen_func}


def install_liger_torch_kernels(monkeypatch) -> None:
    """Run Liger's own autograd Functions (``LigerRMSNormFunction``, ``LigerSiLUMulFunction``,
    ``LigerRopeFunction``) on CPU: only their Triton launchers (``rms_norm_forward/backward``,
    ``swiglu_forward/backward``, ``rope_forward/backward``) are replaced by torch code with the same arguments and
    results — the same tensors returned and saved (RSTD [rows] float32; SwiGLU's and RMSNorm's backward write the
    gradients into their inputs as the kernels do; RoPE rotates contiguous q, k in place). Also routes
    ``liger_rotary_pos_emb`` to ``LigerRopeFunction`` (its backend dispatch picks Triton on CUDA)."""
    from liger_kernel.ops import rms_norm, rope, swiglu
    from liger_kernel.transformers import rope as rope_module

    def rms_forward(X, W, eps, offset, casting_mode, row_mode):  # casting "llama": only 1/rms in float32
        shape = X.shape
        X = X.view(-1, shape[-1])
        rstd = torch.rsqrt(X.float().pow(2).mean(-1) + eps)  # RSTD [rows] float32
        Y = (X.float() * rstd[:, None]).to(X.dtype) * (offset + W)
        return Y.view(*shape), X, rstd, 0, 0, rms_norm._str_to_casting_mode.get(casting_mode, casting_mode)

    def rms_backward(dY, X, W, RSTD, offset, casting_mode, BLOCK_SIZE, num_warps, in_place, row_mode, needs_dw=None):
        shape = dY.shape
        dY = dY.view(-1, shape[-1])
        xhat = X.float() * RSTD[:, None]
        g = dY.float() * (offset + W.float())
        dX = RSTD[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dW = (dY.float() * xhat.to(X.dtype).float()).sum(0).to(W.dtype) if needs_dw is not False else None
        out = dY if in_place else torch.empty_like(dY)
        out.copy_(dX)
        return out.view(*shape), dW

    def silu_mul_forward(a, b, gate_multiplier=1.0):
        shape = a.shape
        a, b = a.view(-1, shape[-1]), b.view(-1, shape[-1])
        af = a.float() * gate_multiplier
        return a, b, (af * torch.sigmoid(af) * b.float()).to(a.dtype).view(*shape)

    def silu_mul_backward(a, b, dc, gate_multiplier=1.0):  # writes da into a, db into b
        shape = dc.shape
        dc = dc.view(-1, shape[-1]).float()
        af = a.float() * gate_multiplier
        sig = torch.sigmoid(af)
        silu = af * sig
        db = dc * silu
        da = dc * b.float() * sig * (1 + af * (1 - sig)) * gate_multiplier
        a.copy_(da)
        b.copy_(db)
        return a.view(*shape), b.view(*shape)

    def rotate(x, cos, sin, sign):  # x [B, T, H, D] contiguous, in place; cos/sin [B or 1, T, D]
        half = x.shape[-1] // 2
        c, s = cos[:, :, None, :half].to(x.dtype), sin[:, :, None, :half].to(x.dtype)
        x1, x2 = x[..., :half].clone(), x[..., half:].clone()
        x[..., :half] = x1 * c - sign * x2 * s
        x[..., half:] = x2 * c + sign * x1 * s

    def rope_forward(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
        cos, sin = (c.squeeze(unsqueeze_dim) if c.ndim == 4 else c for c in (cos, sin))
        cos, sin = (c.unsqueeze(0) if c.ndim == 2 else c for c in (cos, sin))
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # no copy for HF's projections
        cos, sin = cos.contiguous(), sin.contiguous()
        rotate(q, cos, sin, 1.0)
        rotate(k, cos, sin, 1.0)
        return q.transpose(1, 2), k.transpose(1, 2), cos, sin

    def rope_backward(dq, dk, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
        dq, dk = dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous()
        rotate(dq, cos, sin, -1.0)
        rotate(dk, cos, sin, -1.0)
        return dq.transpose(1, 2), dk.transpose(1, 2)

    def liger_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
        return rope.LigerRopeFunction.apply(q, k, cos, sin, position_ids, unsqueeze_dim, rotary_dim)

    for module, name, fn in [(rms_norm, "rms_norm_forward", rms_forward), (rms_norm, "rms_norm_backward", rms_backward),
                             (swiglu, "swiglu_forward", silu_mul_forward),
                             (swiglu, "swiglu_backward", silu_mul_backward), (rope, "rope_forward", rope_forward),
                             (rope, "rope_backward", rope_backward),
                             (rope_module, "liger_rotary_pos_emb", liger_rotary_pos_emb)]:
        monkeypatch.setattr(module, name, fn)
