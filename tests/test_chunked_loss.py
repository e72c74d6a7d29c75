"""Chunked linear cross-entropy == causal_lm_loss on the model's full logits: loss and every gradient (LM head, tied
embeddings, all layers), with padding and loss-masked tokens, for plain, softcapped and scaled heads.

Tolerance: float32 round-off. The chunked path sums the loss chunk by chunk, accumulates the head gradient over
chunks and forms d CE / d logits as softmax - one-hot (autograd: log-softmax backward), so each logit gradient
differs by ~1 ulp; backpropagated, that stays ~1e-7 of the whole gradient (bound: 1e-6 of the norm of all
gradients together, and of the loss). Single small gradients (deep RMSNorm weights: sums with cancellation) show
up to ~6.5e-7 of their own norm, bound at 2e-6."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import seqpack
from seqpack.ops.chunked_loss import LogitPostprocess, enable_chunked_loss, linear_cross_entropy_sum, logit_postprocess
from seqpack.parallel import StepLoss

from conftest import tiny_config

CASES = {
    "llama": dict(),
    "gemma2": dict(),  # final_logit_softcapping=8.0 from conftest's FAMILIES
    "llama_tied": dict(tie_word_embeddings=True),
    "granite": dict(logits_scaling=4.0),
    "cohere": dict(logit_scale=0.5),
}


def build(case: str):
    kind = case.removesuffix("_tied")
    cfg = tiny_config(kind, **CASES[case])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    with torch.no_grad():  # non-trivial head values (tiny random init keeps softcap / scaling effects visible)
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model


def batch_with_padding_and_masks():
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 64, (n,), generator=g) for n in (9, 4, 13, 1, 7)]
    masks = [torch.rand(len(d), generator=g) > 0.3 for d in docs]
    return seqpack.pack(docs, loss_masks=masks, pad_to=40)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-6) -> bool:
    return float((a - b).norm()) <= rel * float(b.norm()) + 1e-12


def assert_same_gradients(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    everything = lambda g: torch.cat([g[n].reshape(-1) for n in sorted(ref)])  # noqa: E731
    assert close(everything(got), everything(ref), rel=1e-6)
    for name in ref:
        assert close(got[name], ref[name]), (name, float((got[name] - ref[name]).norm()), float(ref[name].norm()))


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_loss_equals_full_logits_loss_and_gradients(case):
    batch = batch_with_padding_and_masks()
    assert (batch.shift_labels == -100).sum() > 10  # padding, document ends and masked tokens all present

    model = build(case)
    ref_loss = seqpack.causal_lm_loss(model(**batch.model_inputs()).logits, batch)
    ref_loss.backward()
    ref = grads(model)
    if case == "llama_tied":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    # (1) the functional API on the final hidden states, chunk not dividing T
    model.zero_grad()
    hidden = model.model(**batch.model_inputs()).last_hidden_state
    loss = seqpack.chunked_causal_lm_loss(model, hidden, batch, chunk_size=7)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item(), (loss.item(), ref_loss.item())
    assert_same_gradients(grads(model), ref)

    # (2) inside the model's forward (the training path), normalised by StepLoss's global count
    model.zero_grad()
    hook = enable_chunked_loss(model, chunk_size=16)
    out = model(**batch.model_inputs(), chunked_loss_labels=batch.shift_labels)
    assert out.logits.shape[1] == 0  # no [T, V] logits were made
    step = StepLoss([batch], None)
    step.sum_loss(out.loss).backward()
    assert abs(step.value() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    assert_same_gradients(grads(model), ref)
    # without the keyword the model is unchanged
    assert model(**batch.model_inputs()).logits.shape == (1, batch.num_tokens, model.config.vocab_size)
    hook.remove()


def test_linear_cross_entropy_bias_and_no_grad_paths():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (23,), generator=g)
    y[::4] = -100
    post = LogitPostprocess(softcap=3.0)
    ref = torch.nn.functional.cross_entropy(post.apply(h @ w.t() + b), y, ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    got = linear_cross_entropy_sum(h, w, y, b, post, chunk_size=5)
    got_grads = torch.autograd.grad(got, (h, w, b))
    assert abs(got.item() - ref.item()) <= 1e-6 * ref.item()
    for a, r in zip(got_grads, ref_grads):
        assert close(a, r, rel=1e-6)
    with torch.no_grad():  # evaluation: loss only
        assert abs(float(linear_cross_entropy_sum(h, w, y, b, post, chunk_size=5)) - float(ref)) <= 1e-6 * float(ref)
    with pytest.raises(ValueError, match="chunk_size=0"):
        linear_cross_entropy_sum(h, w, y, chunk_size=0)


def test_unknown_head_falls_back_with_one_line_notice():
    cfg = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2)
    assert logit_postprocess(cfg) is None
    model = AutoModelForCausalLM.from_config(cfg)
    notices = []
    assert enable_chunked_loss(model, notice=notices.append) is None
    assert len(notices) == 1 and "'gpt2'" in notices[0] and "full-logits" in notices[0]
    with pytest.raises(ValueError, match="does not know how 'gpt2'"):
        seqpack.chunked_causal_lm_loss(model, torch.zeros(1, 3, 32), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_chunked_loss_under_bf16_autocast_on_cuda(case):
    """On a GPU under bf16 autocast (how seqpack train runs there): the chunked loss sees the same bf16 logits as the
    model's own head, so loss and gradients agree to bf16 matmul round-off."""
    model = build(case).cuda()
    batch = batch_with_padding_and_masks().to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(**batch.model_inputs()).logits
    ref_loss = seqpack.causal_lm_loss(logits, batch)
    ref_loss.backward()
    ref = grads(model)
    model.zero_grad()
    hook = enable_chunked_loss(model, chunk_size=16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total = model(**batch.model_inputs(), chunked_loss_labels=batch.shift_labels).loss
    (total / batch.num_valid_targets).backward()
    assert abs(total.item() / batch.num_valid_targets - ref_loss.item()) <= 1e-3 * ref_loss.item()
    for name, g in grads(model).items():
        assert close(g, ref[name], rel=2e-2), name
    hook.remove()
