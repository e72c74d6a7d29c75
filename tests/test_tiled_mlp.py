"""Tiled MLP == plain MLP: outputs and every gradient (MLP weights, its input, the whole model), and its saved
activations stop growing with T. Tiling splits matmuls by rows only, so differences are float32 round-off
(observed ~1e-7 of a gradient's norm; bound 1e-6)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import seqpack
from seqpack.ops.tiled_mlp import apply_tiled_mlp, tiled

from conftest import tiny_config


def close(a, b, rel=1e-6):
    return float((a - b).detach().norm()) <= rel * float(b.detach().norm()) + 1e-12


@pytest.mark.parametrize("family, checkpointing", [("llama", False), ("gemma2", False), ("phi3", False),
                                                   ("llama", True)])
def test_tiled_model_equals_plain_model(family, checkpointing):
    cfg = tiny_config(family)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    tiled_model = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    tiled_model.load_state_dict(plain.state_dict())
    assert apply_tiled_mlp(tiled_model, tile=6) == cfg.num_hidden_layers
    if checkpointing:  # the layer is recomputed in backward, and the tiles again inside it
        from seqpack.train.model import apply_activation_checkpointing

        apply_activation_checkpointing(tiled_model, True)
    batch = seqpack.pack([list(range(3, 20)), list(range(5, 30))], pad_to=45)  # T=45: 8 tiles, last one short
    results = []
    for model in (plain, tiled_model):
        logits = model(**batch.model_inputs()).logits
        seqpack.causal_lm_loss(logits, batch).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref), (got_logits, got) = results
    assert close(got_logits, ref_logits)
    for name in ref:
        assert close(got[name], ref[name]), name
    assert set(tiled_model.state_dict()) == set(plain.state_dict())  # names unchanged: checkpoints, HF export


def saved_bytes(fn, *args) -> int:
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(total), out


def test_mlp_input_gradient_and_activation_memory():
    cfg = tiny_config("llama", hidden_size=32, intermediate_size=96)
    mlp = AutoModelForCausalLM.from_config(cfg).model.layers[0].mlp
    x = torch.randn(1, 50, 32, requires_grad=True)
    plain_bytes, ref = saved_bytes(mlp, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *mlp.parameters()])
    tiled(mlp, tile=16)
    tiled_bytes, out = saved_bytes(mlp, x)
    grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    assert close(out, ref)
    for a, b in zip(grads, ref_grads):
        assert close(a, b)
    weights = sum(p.numel() * 4 for p in mlp.parameters())
    assert tiled_bytes == x.numel() * 4 + weights  # only the input [T, H] (and the weights) kept for backward
    assert plain_bytes > 4 * 50 * 96 * 4  # the plain MLP keeps several [T, I] tensors
    tiled(mlp, tile=16)  # idempotent: still one level of tiling
    assert close(mlp(x), ref)
    with pytest.raises(ValueError, match="tile of 0 tokens"):
        tiled(mlp, tile=0)
