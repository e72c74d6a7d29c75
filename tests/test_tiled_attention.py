"""Tiled attention backward (``model.tiled_attention``): one key/value head group at a time, recomputing that
group's forward. Heads never interact, so outputs and gradients must equal the one-call backward on every backend
(the exact SDPA path, the flash-attn 2.6 and torch 2.12 ``varlen_attn`` stand-ins with their real signatures), with
GQA, sliding window, softcap, ALiBi and bf16 autocast; the backward's buffers must shrink; the whole model, the
planner and ``seqpack train`` must use it."""

import pytest
import torch

import stand_in_kernels as si
from conftest import tiny_config
from seqpack.attention.kernels import AttnSpec, varlen_attention
from seqpack.attention.tiled import tiled_attention
from seqpack.bench.budget import DeviceBudget

CU = [0, 1, 9, 10, 23, 24, 40]  # 1-token documents included
N, D = 8, 8


def _qkv(nkv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(CU[-1], h, D, generator=g).to(dtype).requires_grad_() for h in (N, nkv, nkv)]


def _run(q, k, v, spec, backend, tiled):
    """Output and dq, dk, dv of one varlen attention call with a fixed output gradient."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = varlen_attention(q, k, v, CU, 16, spec, backend, tiled=tiled)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _assert_same(a, b, tol=0.0):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert (x.float() - y.float()).abs().max() <= tol * max(1.0, y.float().abs().max().item())


SPECS = {
    "plain": AttnSpec(scale=D ** -0.5),
    "window": AttnSpec(scale=0.3, sliding_window=3),
    "softcap": AttnSpec(scale=0.3, softcap=2.0),
    "alibi": AttnSpec(scale=0.3, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03, 0.01, 0.005, 0.002])),
    "non-causal": AttnSpec(scale=D ** -0.5, causal=False),
}
BACKENDS = {  # backend -> (installed stand-ins, specs its adapter honours)
    "sdpa": (dict(), set(SPECS)),
    "flash_attn": (dict(flash=si.flash_attn_varlen_func), set(SPECS)),
    "torch_varlen": (dict(torch_varlen=si.varlen_attn_2_12), {"plain", "window", "non-causal"}),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(SPECS))
@pytest.mark.parametrize("nkv", [2, 4])
def test_tiled_equals_one_call(monkeypatch, backend, case, nkv):
    kernels, honoured = BACKENDS[backend]
    if case not in honoured:
        pytest.skip(f"{backend} refuses {case} (tested in test_kernel_adapters.py)")
    si.install(monkeypatch, **kernels)
    dtype = torch.float32 if backend == "sdpa" else torch.bfloat16  # the kernels run in half precision
    q, k, v = _qkv(nkv, dtype)
    one = _run(q, k, v, SPECS[case], backend, tiled=False)
    calls = len(si.CALLS)
    tiled = _run(q, k, v, SPECS[case], backend, tiled=True)
    if backend != "sdpa":  # forward over all heads, then one recomputed forward + backward per KV head group
        assert len(si.CALLS) - calls == 1 + nkv and si.CALLS[-1]["q"].shape[1] == N // nkv
    # heads are computed independently: the same numbers in the same order (bitwise on these kernels; the SDPA
    # path's matmuls may block differently over fewer heads, within float32 rounding)
    _assert_same(tiled, one, 0.0 if backend != "sdpa" else 1e-6)


def test_bf16_autocast_recomputes_under_the_same_autocast():
    q, k, v = _qkv(2)
    spec = SPECS["plain"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one = _run(q, k, v, spec, "sdpa", tiled=False)
        tiled = _run(q, k, v, spec, "sdpa", tiled=True)
    assert one[0].dtype == torch.bfloat16 and tiled[1].dtype == torch.float32  # dq in q's dtype, as without tiling
    _assert_same(tiled, one, 1e-2)  # bf16 rounding of the recomputed forward may fall differently per head block
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen_attention(*_qkv(2), CU, 16, spec, "sdpa", tiled=True)
    assert out.dtype == torch.bfloat16


def test_no_grad_one_kv_head_and_dropout():
    q, k, v = _qkv(2)
    calls = []

    def attend(q, k, v, spec):
        calls.append(q.shape[1])
        return varlen_attention(q, k, v, CU, 16, spec, "sdpa")

    with torch.no_grad():  # inference: the plain call, nothing saved
        out = tiled_attention(attend, q, k, v, SPECS["plain"])
    assert out.grad_fn is None and calls == [N]
    q1, k1, v1 = _qkv(1)  # one KV head: one group, the plain call
    assert type(tiled_attention(attend, q1, k1, v1, SPECS["plain"]).grad_fn).__name__ != "BackwardCFunction"
    with pytest.raises(ValueError, match="attention_dropout"):
        tiled_attention(attend, q, k, v, AttnSpec(scale=0.3, dropout=0.1))


def test_backward_buffers_shrink_as_planned(monkeypatch):
    """flash-attn 2's varlen backward allocates dq, dk, dv, a float32 dq accumulator and, under GQA, dk/dv over all
    query heads (plan.fake's allocation stand-in, run here on real tensors: the bytes, not the numbers). Counted by
    the device budget, the backward's extra bytes must shrink with tiling and match the planner's
    ``attention_workspace`` both ways (its figure includes the output's gradient, resident here)."""
    from seqpack.attention import backends
    from seqpack.plan import PlanOptions
    from seqpack.plan.fake import _FlashVarlenFunction
    from seqpack.plan.memory import attention_workspace

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        return _FlashVarlenFunction.apply(q, k, v, cu_seqlens_q)

    flash_attn_varlen_func.__module__ = "flash_attn"
    si.install(monkeypatch, flash=flash_attn_varlen_func)
    assert backends.kernel("flash_attn") is not None
    T, heads, groups, hd = 4096, 16, 4, 64
    shape = tiny_shape(heads, groups, hd)
    extra = {}
    for tiled in (False, True):
        q, k, v = (torch.empty(T, h, hd, dtype=torch.bfloat16, requires_grad=True) for h in (heads, groups, groups))
        out = varlen_attention(q, k, v, [0, T], T, AttnSpec(scale=0.1), "flash_attn", tiled=tiled)
        grad = torch.empty_like(out)
        with DeviceBudget(None) as budget:
            budget.resident([q, k, v, out, grad])
            start = budget.live
            out.backward(grad)
        extra[tiled] = budget.peak - start + grad.nbytes
        planned = T * attention_workspace(shape, PlanOptions(seq_len=T, precision="bf16-mixed", device="cuda",
                                                             tiled_attention=tiled), heads * hd, groups * hd)
        assert abs(planned / extra[tiled] - 1) < 0.02, (tiled, planned, extra[tiled])
    assert extra[True] < 0.8 * extra[False]  # 4 query heads per group here; Llama-3-8B's 32 / 8 alike


def tiny_shape(heads, kv_heads, head_dim):
    from seqpack.plan import ModelShape

    return ModelShape(model_type="llama", hidden_size=heads * head_dim, num_layers=1, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=4 * heads * head_dim,
                      vocab_size=1000)


def test_whole_model_loss_and_gradients(monkeypatch):
    """A tiny Llama (8 heads, 2 KV heads) through seqpack.dispatch: tiled == untiled, loss and every gradient."""
    import seqpack
    from transformers import AutoModelForCausalLM

    si.install(monkeypatch, flash=si.flash_attn_varlen_func)
    cfg = tiny_config("llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    ids = torch.randint(0, cfg.vocab_size, (1, CU[-1]), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(b - a) for a, b in zip(CU, CU[1:])])[None]
    results = []
    for tiled in (False, True):
        torch.manual_seed(0)
        model = seqpack.dispatch(AutoModelForCausalLM.from_config(cfg), backend="sdpa", tiled_attention=tiled)
        loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-6, atol=0)
    for name in g0:
        scale = g0[name].abs().max().clamp_min(1e-12)
        assert (g0[name] - g1[name]).abs().max() / scale <= 1e-5, name


def test_planner_counts_one_group():
    from dataclasses import replace
    from pathlib import Path

    from seqpack.plan import PlanOptions, longest_fit, plan_memory, shape_from_config_json
    from seqpack.plan.memory import attention_workspace

    llama8b = shape_from_config_json(Path(__file__).parents[1] / "configs/shapes/llama-3-8b.json")
    opts = PlanOptions(seq_len=1 << 20, gpus=1, checkpoint=1.0, precision="bf16-mixed", device="cuda",
                       chunked_loss=True, tiled_mlp=True, fused_kernels=True, offload_checkpoints=True,
                       offload_optimizer=True, micro_num=1)
    on = replace(opts, tiled_attention=True)
    q, kv = 32 * 128, 8 * 128
    # dout, dq, dk, dv over all heads stay; the kernel's buffers (more than half) shrink 8 times
    assert attention_workspace(llama8b, on, q, kv) < 0.6 * attention_workspace(llama8b, opts, q, kv)
    assert plan_memory(llama8b, on).allocated < plan_memory(llama8b, opts).allocated
    # one H200 (141 GB): past DeepSpeed ALST's 1.2M-token recipe with the KV-group backward, short of it without
    assert longest_fit(llama8b, on, 141 * 10 ** 9).options.seq_len >= 1_200_000
    assert longest_fit(llama8b, opts, 141 * 10 ** 9).options.seq_len < 1_200_000
