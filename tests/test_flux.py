"""Flux on packed multi-resolution rows == each sample alone through the unmodified diffusers model."""

import copy

import pytest
import torch

from seqpack.diffusion import SeqpackFluxAttnProcessor, install, pack_flux, packed_forward

from flux_helpers import reference, sample, tiny_flux

SIZES = [(4, 6, 3, 0.9), (2, 2, 5, 0.1), (1, 1, 1, 0.5), (5, 3, 2, 0.35)]  # (h, w, text tokens, timestep)


def _loss(pred, target):
    return ((pred - target) ** 2).sum()


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "activation-checkpointing"])
def test_packed_row_equals_each_sample_alone(checkpoint):
    g = torch.Generator().manual_seed(0)
    samples = [sample(g, *s) for s in SIZES]
    ref = tiny_flux()
    model = install(copy.deepcopy(ref))
    ref_loss, outs = 0.0, []
    for s in samples:  # the unmodified model (diffusers' own processor), one sample at a time
        out = reference(ref, s)
        outs.append(out)
        ref_loss = ref_loss + _loss(out, s.target)
    ref_loss.backward()
    row = pack_flux(samples)
    pred = packed_forward(model, row, checkpoint=checkpoint)
    torch.testing.assert_close(pred[0], torch.cat(outs).detach(), rtol=1e-5, atol=1e-5)
    loss = _loss(pred[0], row.target[0])
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = ref_params[name].grad
        assert p.grad is not None and g_ref is not None, name
        err = float((p.grad - g_ref).norm() / g_ref.norm().clamp(min=1e-12))
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"  # fp32 round-off of re-ordered sums


def test_processor_is_a_drop_in_for_the_unmodified_forward():
    """With seqpack's processor installed, diffusers' own forward (batch rows = samples) is unchanged."""
    g = torch.Generator().manual_seed(1)
    ref = tiny_flux()
    model = install(copy.deepcopy(ref))
    s = [sample(g, 3, 4, 2, 0.3), sample(g, 3, 4, 2, 0.7)]
    kw = dict(hidden_states=torch.stack([x.img for x in s]), encoder_hidden_states=torch.stack([x.txt for x in s]),
              pooled_projections=torch.stack([x.pooled for x in s]), timestep=torch.tensor([0.3, 0.7]),
              img_ids=s[0].img_ids, txt_ids=s[0].txt_ids)
    torch.testing.assert_close(model(**kw).sample, ref(**kw).sample, rtol=1e-5, atol=1e-5)
    assert all(isinstance(p, SeqpackFluxAttnProcessor) for p in model.attn_processors.values())


def test_packed_forward_needs_the_processor():
    g = torch.Generator().manual_seed(2)
    with pytest.raises(ValueError, match="install"):
        packed_forward(tiny_flux(), pack_flux([sample(g, 2, 2, 1, 0.5)]))
