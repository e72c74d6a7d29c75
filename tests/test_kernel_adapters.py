"""The CUDA kernel adapters and the backend resolver, on CPU: stand-in kernels with each real signature (torch
2.10, 2.11, 2.12+ ``varlen_attn``, flash-attn 2.6 ``flash_attn_varlen_func``) run every branch of the adapter
and must equal the exact SDPA path; the resolver is checked with device objects and patched availability."""

import pytest
import torch

import stand_in_kernels as si
from conftest import tiny_config
from seqpack.attention import backends
from seqpack.attention.kernels import AttnSpec, varlen_attention

CU = [0, 1, 9, 10, 23, 24, 40]  # 1-token documents included
N, D = 6, 8


@pytest.fixture
def kernels(monkeypatch):
    """install(flash=..., torch_varlen=...): these stand-ins become the installed kernels, CPU tensors allowed."""
    return lambda flash=None, torch_varlen=None: si.install(monkeypatch, flash, torch_varlen)


def _adapter(sig):
    fn = si.SIGNATURES[sig]
    return backends.adapt_flash_attn(fn) if sig == "flash" else backends.adapt_torch_varlen(fn)


def _qkv(nkv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(CU[-1], h, D, generator=g).to(dtype).requires_grad_() for h in (N, nkv, nkv)]


SPECS = {  # name -> (spec, signatures that must refuse it)
    "plain": (AttnSpec(scale=D ** -0.5), set()),
    "scale": (AttnSpec(scale=0.3), {"2.10"}),  # 0.3 * sqrt(8) is not a power of two: 2.10 cannot pre-scale exactly
    "scale_pow2": (AttnSpec(scale=2 * D ** -0.5), set()),  # 2.10 pre-scales q by 2, exactly
    "window": (AttnSpec(scale=0.3, sliding_window=3), {"2.10"}),
    "softcap": (AttnSpec(scale=0.3, softcap=2.0), {"2.10", "2.11", "2.12"}),
    "alibi": (AttnSpec(scale=0.3, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03, 0.01])),
              {"2.10", "2.11", "2.12"}),
}


@pytest.mark.parametrize("sig", list(si.SIGNATURES))
@pytest.mark.parametrize("case", list(SPECS))
@pytest.mark.parametrize("nkv", [2, 6])
def test_adapter_equals_exact_sdpa_path(sig, case, nkv):
    spec, refused_by = SPECS[case]
    adapter = _adapter(sig)
    reason = adapter.refusal(spec, torch.bfloat16, D)
    if sig in refused_by:
        assert reason is not None and si.SIGNATURES[sig].__name__ in reason
        return
    assert reason is None
    q, k, v = _qkv(nkv)
    si.CALLS.clear()
    out = adapter(q, k, v, torch.tensor(CU, dtype=torch.int32), 16, spec)  # float32 straight into the adapter
    ref = varlen_attention(q, k, v, CU, 16, spec, "sdpa")
    assert (out - ref).abs().max() <= 1e-5
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert (a - b).abs().max() <= 1e-5
    call = si.CALLS[-1]
    shares_kv = sig in ("flash", "2.12")  # the others get KV repeated to N heads
    assert call["k"].shape[1] == (nkv if shares_kv else N)
    if sig == "2.12":
        assert call["enable_gqa"] is (nkv != N)
    if sig in ("2.11", "2.12", "flash"):
        left = spec.sliding_window - 1 if spec.sliding_window else -1
        assert call["window_size"] == (left, 0) and type(call["window_size"]) is tuple
        assert call["scale" if sig != "flash" else "softmax_scale"] == spec.scale
    if sig == "2.10":
        assert call["is_causal"] is True


@pytest.mark.parametrize("sig", list(si.SIGNATURES))
def test_adapter_non_causal(sig):
    """causal=False: is_causal=False / window (-1, -1) / causal=False; each document attends to all of itself."""
    spec = AttnSpec(scale=D ** -0.5, causal=False)
    q, k, v = _qkv(2)
    si.CALLS.clear()
    out = _adapter(sig)(q, k, v, torch.tensor(CU, dtype=torch.int32), 16, spec)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), enable_gqa=True).transpose(0, 1)
        for a, b in zip(CU, CU[1:])])
    assert (out - ref).abs().max() <= 1e-5
    call = si.CALLS[-1]
    assert call.get("is_causal", call.get("causal", False)) is False
    assert call.get("window_size", (-1, -1)) == (-1, -1)
    assert _adapter(sig).refusal(AttnSpec(scale=0.3, causal=False, sliding_window=3), torch.bfloat16, D) is not None


def test_stand_in_has_the_installed_torch_signature():
    """The stand-in for this torch's release has exactly the real ``varlen_attn`` parameter list (names, kinds,
    defaults), so the stand-ins cannot drift from torch; run on each torch the suite is run with."""
    import inspect

    varlen = pytest.importorskip("torch.nn.attention.varlen", reason="torch < 2.10 has no varlen_attn")
    release = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    stand_in = si.SIGNATURES["2.10" if release <= (2, 10) else "2.11" if release == (2, 11) else "2.12"]

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(stand_in) == params(varlen.varlen_attn)
    assert backends.adapt_torch_varlen(varlen.varlen_attn).params == backends.adapt_torch_varlen(stand_in).params


def test_unknown_signatures_are_rejected():
    with pytest.raises(TypeError, match="unrecognised varlen_attn signature"):
        backends.adapt_torch_varlen(lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k: None)
    with pytest.raises(TypeError, match="flash-attn >= 2.6"):
        backends.adapt_flash_attn(lambda q, k, v, cu_seqlens_q: None)


def test_resolver_with_a_cuda_device_object(kernels, monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plain, window, soft = AttnSpec(scale=0.125), AttnSpec(scale=0.125, sliding_window=4), \
        AttnSpec(scale=0.125, softcap=30.0)
    kernels(torch_varlen=si.varlen_attn_2_11)
    assert backends.resolve_backend("auto", cuda, plain, torch.float32, 64) == "sdpa"  # float32: exact SDPA path
    assert backends.resolve_backend("auto", cuda, plain, torch.bfloat16, 64) == "torch_varlen"
    assert backends.resolve_backend("auto", cuda, plain, torch.float16, 64) == "torch_varlen"
    assert backends.resolve_backend("auto", cuda, soft, torch.bfloat16, 64) == "sdpa"
    assert backends.resolve_backend("auto", cuda, plain, torch.bfloat16, 512) == "sdpa"  # head dim > 256
    monkeypatch.setattr(backends, "KERNEL_DEVICE_TYPES", ("cuda",))  # the real rule: CPU tensors never
    assert backends.resolve_backend("auto", torch.device("cpu"), plain, torch.bfloat16, 64) == "sdpa"
    with pytest.raises(ValueError, match="'torch_varlen' needs CUDA tensors, got device cpu"):
        backends.resolve_backend("torch_varlen", torch.device("cpu"), plain, torch.bfloat16, 64)
    with pytest.raises(ValueError, match=r"'torch_varlen' .*float16/bfloat16 only, got torch.float32"):
        backends.resolve_backend("torch_varlen", cuda, plain, torch.float32, 64)
    with pytest.raises(ValueError, match="'torch_varlen' .*cannot apply logit softcap"):
        backends.resolve_backend("torch_varlen", cuda, soft, torch.bfloat16, 64)
    with pytest.raises(ValueError, match="'flash_attn' needs the flash-attn package"):
        backends.resolve_backend("flash_attn", cuda, plain, torch.bfloat16, 64)
    kernels(torch_varlen=si.varlen_attn_2_10)  # no window, no scale
    assert backends.resolve_backend("auto", cuda, window, torch.bfloat16, 64) == "sdpa"
    with pytest.raises(ValueError, match="no window_size parameter"):
        backends.resolve_backend("torch_varlen", cuda, window, torch.bfloat16, 64)
    with pytest.raises(ValueError, match="takes no scale"):
        backends.resolve_backend("torch_varlen", cuda, AttnSpec(scale=0.1), torch.bfloat16, 64)
    kernels(flash=si.flash_attn_varlen_func, torch_varlen=si.varlen_attn_2_12)
    for spec in (plain, window, soft):
        assert backends.resolve_backend("auto", cuda, spec, torch.bfloat16, 64) == "flash_attn"
    assert backends.resolve_backend("torch_varlen", cuda, window, torch.bfloat16, 64) == "torch_varlen"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch.cuda.is_available"):
        backends.resolve_backend("flash_attn", cuda, plain, torch.bfloat16, 64)


def test_impossible_explicit_request_fails_before_any_kernel_call(kernels):
    kernels(torch_varlen=si.varlen_attn_2_10)
    q, k, v = _qkv(2, torch.bfloat16)
    for spec, dtype in ((AttnSpec(scale=0.3, sliding_window=3), torch.bfloat16),
                        (AttnSpec(scale=D ** -0.5), torch.float32)):
        with pytest.raises(ValueError, match="attention backend 'torch_varlen'"):
            varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), CU, 16, spec, "torch_varlen")
    assert si.CALLS == []


def test_auto_runs_the_kernel_in_half_precision_and_sdpa_in_float32(kernels):
    kernels(torch_varlen=si.varlen_attn_2_12)
    spec = AttnSpec(scale=0.3, sliding_window=5)
    q, k, v = _qkv(2, torch.bfloat16)
    out = varlen_attention(q, k, v, CU, 16, spec)
    assert [c["fn"] for c in si.CALLS] == ["2.12"] and out.dtype == torch.bfloat16
    ref = varlen_attention(q.float(), k.float(), v.float(), CU, 16, spec)  # float32 -> exact SDPA path
    assert len(si.CALLS) == 1 and ref.dtype == torch.float32
    assert (out.float() - ref).abs().max() <= 2e-2  # bf16 inputs and output rounding


def test_autocast_casts_to_the_autocast_dtype_before_the_kernel(kernels):
    """Under autocast RoPE hands over float32 q/k (and bf16 v): the kernel gets bf16, the output is bf16."""
    kernels(flash=si.flash_attn_varlen_func)
    q, k, _ = _qkv(2)
    v = _qkv(2, seed=1)[2].to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen_attention(q, k, v, CU, 16, AttnSpec(scale=D ** -0.5))
        out.float().sum().backward()
    call = si.CALLS[-1]
    assert (call["q"].dtype, call["k"].dtype, call["v"].dtype, out.dtype) == (torch.bfloat16,) * 4
    assert q.grad.dtype == torch.float32  # gradients flow back through the casts


def test_model_under_autocast_reaches_the_kernel_in_bf16(kernels):
    """A whole Llama under CPU bf16 autocast: every layer's kernel call is bf16, and the logits stay within bf16
    error of the float32 model."""
    from transformers import AutoModelForCausalLM

    import seqpack

    kernels(torch_varlen=si.varlen_attn_2_11)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="seqpack")
    batch = seqpack.pack([torch.randint(3, 64, (n,)) for n in (9, 1, 14)])
    ref = model(**batch.model_inputs()).logits  # float32: the SDPA path, no kernel call
    assert si.CALLS == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**batch.model_inputs()).logits
    assert len(si.CALLS) == 2 and all(c[x].dtype == torch.bfloat16 for c in si.CALLS for x in "qkv")
    assert all(c["k"].shape[1] == 4 for c in si.CALLS)  # 2.11 has no enable_gqa: KV repeated 2 -> 4 heads
    assert (logits.float() - ref).abs().max() <= 0.05


def test_internevo_compat_goes_through_the_same_backends(kernels):
    from seqpack.compat.internevo import isp_flash_attn_varlen_func

    kernels(flash=si.flash_attn_varlen_func)
    q, k, v = (x.detach()[None] for x in _qkv(2, torch.bfloat16))
    cu = torch.tensor(CU, dtype=torch.int32)
    out = isp_flash_attn_varlen_func(q, k, v, cu, cu, 16, 16, softmax_scale=0.3)
    assert [c["fn"] for c in si.CALLS] == ["flash"] and si.CALLS[0]["softmax_scale"] == 0.3
    ref = varlen_attention(q[0].float(), k[0].float(), v[0].float(), CU, 16, AttnSpec(scale=0.3), "sdpa")
    assert (out[0].float() - ref).abs().max() <= 2e-2
    si.CALLS.clear()
    isp_flash_attn_varlen_func(q, k, v, cu, cu, 16, 16, causal=False)
    assert si.CALLS[0]["causal"] is False and si.CALLS[0]["window_size"] == (-1, -1)
