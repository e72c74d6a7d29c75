"""Bidirectional (causal=False) varlen attention on the exact SDPA path == plain attention per sample."""

import pytest
import torch
import torch.nn.functional as F

from seqpack.attention.kernels import AttnSpec, varlen_attention


def _per_sample(q, k, v, cu, spec):
    """Reference: each sample alone through plain SDPA (no mask), GQA by repeating KV heads."""
    rep = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(cu, cu[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))  # [1, H, l, D]
        ks, vs = (x.repeat_interleave(rep, dim=1) for x in (ks, vs))
        if spec.softcap is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=spec.scale)
        else:
            s = torch.tanh(qs @ ks.transpose(-1, -2) * spec.scale / spec.softcap) * spec.softcap
            o = torch.softmax(s, -1) @ vs
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("lengths, heads, kv_heads, softcap", [
    ([7, 1, 12, 9, 1, 30], 4, 4, None),  # 1-token samples, several length buckets
    ([5, 6, 1, 17], 6, 2, None),  # GQA
    ([11, 3, 1], 4, 1, 5.0),  # softcap (math path), single KV head
    ([13], 2, 2, None),  # one sample spans the row
])
def test_noncausal_varlen_equals_per_sample(lengths, heads, kv_heads, softcap):
    g = torch.Generator().manual_seed(sum(lengths))
    T, D = sum(lengths), 8
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    q = torch.randn(T, heads, D, generator=g, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(T, kv_heads, D, generator=g, dtype=torch.float64).float().requires_grad_()
    v = torch.randn(T, kv_heads, D, generator=g, dtype=torch.float64).float().requires_grad_()
    spec = AttnSpec(scale=D ** -0.5, softcap=softcap, causal=False)
    out = varlen_attention(q, k, v, cu, max(lengths), spec, backend="sdpa")
    ref = _per_sample(q, k, v, cu, spec)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # fp32 round-off of two softmax orders
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_noncausal_sees_future_and_not_other_samples():
    """Sanity that the test above is discriminating: causal and bidirectional differ, samples stay apart."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, 2, 4, generator=g) for _ in range(3))
    cu = [0, 4, 10]
    full = varlen_attention(q, k, v, cu, 6, AttnSpec(scale=0.5, causal=False), backend="sdpa")
    causal = varlen_attention(q, k, v, cu, 6, AttnSpec(scale=0.5), backend="sdpa")
    assert not torch.allclose(full[:3], causal[:3])
    k2 = k.clone()
    k2[5:] += 1.0  # change only the second sample's keys
    again = varlen_attention(q, k2, v, cu, 6, AttnSpec(scale=0.5, causal=False), backend="sdpa")
    torch.testing.assert_close(again[:4], full[:4], rtol=0, atol=0)


def test_noncausal_rejects_window():
    q = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match="causal=False"):
        varlen_attention(q, q, q, [0, 3, 6], 3, AttnSpec(scale=0.5, sliding_window=2, causal=False), backend="sdpa")
