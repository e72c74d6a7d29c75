"""Liger kernel wiring (model.fused_kernels). On CPU, Liger's Triton kernels cannot run: the entry points seqpack
calls are replaced by stand-ins with the same signatures that compute the same math in torch, so these tests check
which modules are swapped, that every kernel is reached, that the fused model gives the unfused model's loss and
gradients (packed position_ids included), and that other models of the family stay untouched. The real kernels'
exactness is checked by the tests marked ``cuda``."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import seqpack
from seqpack.ops.chunked_loss import enable_chunked_loss
from seqpack.ops.fused import apply_fused_kernels

from conftest import tiny_config

pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install 'seqpack[cuda]')")


class Calls(dict):
    def hit(self, name):
        self[name] = self.get(name, 0) + 1


@pytest.fixture
def liger_stand_ins(monkeypatch):
    """Stand-ins for the Liger entry points seqpack reaches, mirroring their signatures (liger-kernel 0.8.5)."""
    from liger_kernel.transformers import functional, geglu, rms_norm, rope, swiglu

    calls = Calls()

    class RMSNormFunction:  # LigerRMSNormFunction.apply(X, W, eps, offset, casting_mode, in_place, row_mode)
        @staticmethod
        def apply(X, W, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None):
            calls.hit("rms_norm")
            x = X.float()
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            return ((offset + W.float()) * y).to(X.dtype)

    class SiLUMulFunction:  # LigerSiLUMulFunction.apply(a, b, gate_multiplier, down_multiplier)
        @staticmethod
        def apply(a, b, gate_multiplier=1.0, down_multiplier=1.0):
            calls.hit("swiglu")
            return F.silu(a * gate_multiplier) * b * down_multiplier

    class GELUMulFunction:  # LigerGELUMulFunction.apply(a, b)
        @staticmethod
        def apply(a, b):
            calls.hit("geglu")
            return F.gelu(a, approximate="tanh") * b

    def rotary(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):  # liger_rotary_pos_emb
        calls.hit("rope")
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        half = lambda x: torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), -1)  # noqa: E731
        return q * cos + half(q) * sin, k * cos + half(k) * sin

    def fused_linear_ce(input, weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
                        label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None,
                        use_token_scaling=False, return_token_accuracy=False, return_predicted_tokens=False,
                        chunk_mem_const=1):  # liger_fused_linear_cross_entropy
        calls.hit("fused_linear_ce")
        logits = F.linear(input, weight, bias)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)

    monkeypatch.setattr(rms_norm, "LigerRMSNormFunction", RMSNormFunction)
    monkeypatch.setattr(swiglu, "LigerSiLUMulFunction", SiLUMulFunction)
    monkeypatch.setattr(geglu, "LigerGELUMulFunction", GELUMulFunction)
    monkeypatch.setattr(rope, "liger_rotary_pos_emb", rotary)
    monkeypatch.setattr(functional, "liger_fused_linear_cross_entropy", fused_linear_ce)
    return calls


@pytest.mark.parametrize("family, mlp_kernel, norms", [("llama", "swiglu", 5), ("gemma2", "geglu", 9),
                                                      ("phi3", "swiglu", 5)])
def test_fused_model_equals_unfused_with_packed_positions(liger_stand_ins, family, mlp_kernel, norms):
    cfg = tiny_config(family)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    model.load_state_dict(ref.state_dict())
    kernels = apply_fused_kernels(model, True, torch.device("cuda"))  # the device check passes; kernels: stand-ins
    assert kernels.swapped == {"rms_norm": norms, "mlp": 2, "rope": 2}
    assert kernels.linear_cross_entropy is not None  # llama: plain head; gemma2: Liger's softcap argument
    enable_chunked_loss(model, fused=kernels.linear_cross_entropy)
    assert set(model.state_dict()) == set(ref.state_dict())

    batch = seqpack.pack([list(range(3, 14)), list(range(20, 27)), list(range(30, 45))])  # positions restart
    ref_loss = seqpack.causal_lm_loss(ref(**batch.model_inputs()).logits, batch)
    ref_loss.backward()
    assert "rope" not in liger_stand_ins  # the unfused model of the same family never reaches Liger
    total = model(**batch.model_inputs(), chunked_loss_labels=batch.shift_labels).loss
    (total / batch.num_valid_targets).backward()
    assert liger_stand_ins["rms_norm"] == norms and liger_stand_ins[mlp_kernel] == 2
    assert liger_stand_ins["rope"] == 2 and liger_stand_ins["fused_linear_ce"] == 1
    assert abs(total.item() / batch.num_valid_targets - ref_loss.item()) <= 1e-6 * ref_loss.item()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert float((p.grad - q.grad).norm()) <= 2e-6 * float(q.grad.norm()) + 1e-12, name


def test_auto_and_errors():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert apply_fused_kernels(model, "auto", torch.device("cpu")) is None  # auto on CPU: off, quietly
    assert apply_fused_kernels(model, False, torch.device("cuda")) is None
    with pytest.raises(ValueError, match=r"fused_kernels=True: it needs a CUDA device \(this run is on cpu\)"):
        apply_fused_kernels(model, True, torch.device("cpu"))
    gpt2 = AutoModelForCausalLM.from_config(tiny_config("gpt2", n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="not 'gpt2'"):
        apply_fused_kernels(gpt2, True, torch.device("cuda"))
    assert apply_fused_kernels(gpt2, "auto", torch.device("cuda")) is None
    with pytest.raises(ValueError, match="choose 'auto', True or False"):
        apply_fused_kernels(model, "on", torch.device("cuda"))


def test_missing_package_is_named(monkeypatch):
    import seqpack.ops.fused as fused

    monkeypatch.setattr(fused, "liger_available", lambda: False)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match=r"pip install 'seqpack\[cuda\]'"):
        fused.apply_fused_kernels(model, True, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_real_liger_kernels_match_unfused_on_cuda(family):
    """On a GPU: the real Liger kernels (fp32) give the unfused model's loss and gradients on a packed row."""
    cfg = tiny_config(family, vocab_size=256, hidden_size=64, intermediate_size=128)
    torch.manual_seed(0)
    with torch.device("cuda"):
        ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    model.load_state_dict(ref.state_dict())
    kernels = apply_fused_kernels(model, True, torch.device("cuda"))
    enable_chunked_loss(model, fused=kernels.linear_cross_entropy)
    g = torch.Generator().manual_seed(1)
    batch = seqpack.pack([torch.randint(3, 256, (n,), generator=g) for n in (40, 7, 81)]).to("cuda")
    ref_loss = seqpack.causal_lm_loss(ref(**batch.model_inputs()).logits, batch)
    ref_loss.backward()
    loss = model(**batch.model_inputs(), chunked_loss_labels=batch.shift_labels).loss / batch.num_valid_targets
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert float((p.grad - q.grad).norm()) <= 1e-4 * float(q.grad.norm()) + 1e-10, name
