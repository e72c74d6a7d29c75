"""Packed rows through attn_implementation="seqpack" equal each document run alone through the unmodified
transformers model (eager): logits, loss and every parameter gradient."""

import pytest
import torch

import seqpack
from seqpack.batch import IGNORE_INDEX

from conftest import FAMILIES, VOCAB, model_pair

# (document lengths, pad_to): a length-1 document, documents longer than the sliding window, a padded row
CASES = {
    "mixed": ([7, 1, 12, 3, 9, 1], None),
    "padded": ([6, 11, 1, 4], 30),
    "one-doc-fills-row": ([24], None),
}


def _docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def _reference(ref, docs, loss_masks=None):
    """Per-document eager logits (concatenated) and the token-mean loss over all documents."""
    logits, loss_sum, count = [], 0.0, 0
    for i, d in enumerate(docs):
        out = ref(input_ids=d[None]).logits[0]
        logits.append(out)
        labels = d[1:].clone()
        if loss_masks is not None:
            labels[~torch.as_tensor(loss_masks[i])[1:]] = IGNORE_INDEX
        if labels.numel():
            loss_sum = loss_sum + torch.nn.functional.cross_entropy(out[:-1], labels, ignore_index=IGNORE_INDEX,
                                                                    reduction="sum")
            count += int((labels != IGNORE_INDEX).sum())
    return torch.cat(logits), loss_sum / count


def _assert_grads_close(model, ref, rtol=1e-4):
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g, g_ref = p.grad, ref_params[name].grad
        if g_ref is None:  # e.g. experts no token was routed to
            assert g is None or g.abs().max() == 0, name
            continue
        err = (g - g_ref).norm() / g_ref.norm().clamp(min=1e-12)
        assert err <= rtol, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_equals_per_document(family, case):
    lengths, pad_to = CASES[case]
    ref, model = model_pair(family)
    docs = _docs(lengths)
    batch = seqpack.pack(docs, pad_to=pad_to)
    n_real = sum(lengths)

    logits = model(**batch.model_inputs()).logits
    loss = seqpack.causal_lm_loss(logits, batch)
    loss.backward()
    ref_logits, ref_loss = _reference(ref, docs)
    ref_loss.backward()

    assert logits.shape == (1, batch.num_tokens, VOCAB)
    assert (logits[0, :n_real] - ref_logits).abs().max() <= 1e-5
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    _assert_grads_close(model, ref)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_model_loss_with_shift_labels_equals_causal_lm_loss(family):
    _, model = model_pair(family)
    batch = seqpack.pack(_docs([5, 9, 2]), pad_to=20)
    out = model(**batch.model_inputs(with_labels=True))
    assert torch.allclose(out.loss, seqpack.causal_lm_loss(out.logits, batch), atol=1e-6)


def test_loss_masks_and_document_ends_carry_no_loss():
    ref, model = model_pair("llama")
    docs = _docs([6, 8, 3])
    masks = [[True] * 6, [False] * 4 + [True] * 4, [True, False, True]]
    batch = seqpack.pack(docs, loss_masks=masks)
    labels = batch.shift_labels[0].tolist()
    for end in batch.cu_seqlens[1:].tolist():  # last token of every document has no target
        assert labels[end - 1] == IGNORE_INDEX
    assert labels[6:9] == [IGNORE_INDEX] * 3  # second doc: targets 1..3 are prompt tokens
    assert batch.num_valid_targets == 5 + 4 + 1
    logits = model(**batch.model_inputs()).logits
    _, ref_loss = _reference(ref, docs, masks)
    assert abs(seqpack.causal_lm_loss(logits, batch).item() - ref_loss.item()) <= 1e-5

    # changing a masked target (or a document's last token's logits) cannot change the loss
    poisoned = logits.detach().clone()
    poisoned[0, 6:9] += 100.0
    poisoned[0, 5] += 100.0
    assert seqpack.causal_lm_loss(poisoned, batch).item() == pytest.approx(seqpack.causal_lm_loss(logits, batch).item())


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_nothing_attends_across_documents(family):
    _, model = model_pair(family)
    a, b, c = _docs([9, 7, 5])
    base = model(**seqpack.pack([a, b, c]).model_inputs()).logits
    changed = model(**seqpack.pack([torch.randint(3, VOCAB, (9,)), b, torch.randint(3, VOCAB, (5,))])
                    .model_inputs()).logits
    assert torch.equal(base[0, 9:16], changed[0, 9:16])  # doc b is bit-identical whatever its neighbours are
    assert not torch.equal(base[0, :9], changed[0, :9])


def test_position_ids_alone_give_the_packed_result():
    """Like transformers' flash path, restarting position_ids without cu_seq_lens still separate documents."""
    _, model = model_pair("llama")
    batch = seqpack.pack(_docs([4, 6, 3]))
    full = model(**batch.model_inputs()).logits
    from_positions = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    assert torch.equal(full, from_positions)


def test_dispatch_switches_an_existing_model():
    ref, _ = model_pair("qwen2")
    docs = _docs([5, 7])
    ref_logits, _ = _reference(ref, docs)
    model = seqpack.dispatch(ref)
    assert model.config._attn_implementation == "seqpack"
    assert (model(**seqpack.pack(docs).model_inputs()).logits[0] - ref_logits).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        seqpack.dispatch(model, backend="fast")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_matches_eager(family):
    ref, model = model_pair(family)
    prompt = torch.tensor([[5, 9, 11, 3, 7, 8, 20, 4]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kw), ref.generate(prompt, **kw))
    # a left-padded batch goes through the dense-mask path
    batch = torch.tensor([[0, 0, 5, 9, 11], [6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(model.generate(batch, attention_mask=mask, **kw), ref.generate(batch, attention_mask=mask, **kw))


def test_attention_dropout_is_applied_in_training_only():
    _, model = model_pair("llama", attention_dropout=0.5)
    batch = seqpack.pack(_docs([8, 8]))
    model.train()
    torch.manual_seed(0)
    a = model(**batch.model_inputs()).logits
    b = model(**batch.model_inputs()).logits
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(**batch.model_inputs()).logits, model(**batch.model_inputs()).logits)
