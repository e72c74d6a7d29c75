"""InternEvo's manual-adaptation API (seqpack.compat.internevo): a modeling file patched by hand with the seed's
~10-line recipe trains packed with the same numbers as seqpack's automatic path; the ops against naive math."""

import math

import pytest
import torch

import seqpack
from seqpack.compat.internevo import (ParallelMode, apply_rotary_emb, gpc, hf_model_dispatch, isp_flash_attn_func,
                                      isp_flash_attn_varlen_func)
from seqpack.models import InternLM2Config, InternLM2ForCausalLM
from seqpack.models.internlm2 import InternLM2Attention, InternLM2Model

VOCAB = 64


def _published_rope_tables(dim, base, length):
    """cos/sin caches [length, D] as the published modeling_internlm2.py builds them (origin RoPE)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.einsum("i,j->ij", torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


class HandAdaptedInternLM2Attention(InternLM2Attention):
    """The published InternLM2 attention forward (wqkv group split, cos/sin caches gathered by position_ids) with
    the seed's Option-2 patch: cu_seqlens / max_seqlen from gpc, then isp_flash_attn_varlen_func /
    isp_flash_attn_func instead of the flash-attn call. It never touches transformers' attention interface."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                position_ids=None, **kwargs):
        bsz, q_len, _ = hidden_states.size()
        # ---- InternEvo patch (seed 001, Option 2) ----
        use_packed_dataset = gpc.config.data.get("use_packed_dataset", False)
        if use_packed_dataset:
            assert bsz == 1, "hidden_states should be packed into bsz=1 when use_packed_dataset=True"
            cu_seqlens = gpc.config.data[f"cu_seqlens_data_rank{gpc.get_local_rank(ParallelMode.DATA)}"]
            max_seqlen = gpc.config.data[f"max_seqlen_data_rank{gpc.get_local_rank(ParallelMode.DATA)}"]
        # ---- published code ----
        gs = 2 + self.num_key_value_groups
        qkv_states = self.wqkv(hidden_states).view(bsz, q_len, -1, gs, self.head_dim)  # "b q (h gs d)"
        query_states = qkv_states[..., : self.num_key_value_groups, :].reshape(bsz, q_len, -1, self.head_dim)
        key_states, value_states = qkv_states[..., -2, :], qkv_states[..., -1, :]
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        cos, sin = _published_rope_tables(self.head_dim, self.config.rope_theta, self.config.max_position_embeddings)
        cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
        query_states = query_states * cos + _rotate_half(query_states) * sin
        key_states = key_states * cos + _rotate_half(key_states) * sin
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)  # [b, q, h, d]
        dropout_rate = 0.0
        # ---- InternEvo patch ----
        if use_packed_dataset:
            attn_output = isp_flash_attn_varlen_func(query_states, key_states, value_states, cu_seqlens, cu_seqlens,
                                                     max_seqlen, max_seqlen, attention_dropout=dropout_rate,
                                                     softmax_scale=None, causal=True)
        else:
            attn_output = isp_flash_attn_func(query_states, key_states, value_states, attention_dropout=dropout_rate,
                                              softmax_scale=None, causal=True)
        attn_output = attn_output.reshape(bsz, q_len, -1).contiguous()
        return self.wo(attn_output), None


class HandAdaptedModel(InternLM2Model):
    attention_class = HandAdaptedInternLM2Attention


class HandAdaptedForCausalLM(InternLM2ForCausalLM):
    model_class = HandAdaptedModel


def tiny_internlm2(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bias=True)
    return InternLM2Config(**{**base, **kw})


def model_pair(seed=0):
    """(seqpack automatic path, hand-adapted copy) with identical weights."""
    torch.manual_seed(seed)
    auto = InternLM2ForCausalLM(tiny_internlm2()).float()
    seqpack.dispatch(auto)
    hand = HandAdaptedForCausalLM(tiny_internlm2()).float()
    hand.load_state_dict(auto.state_dict())
    return auto, hand


def _batches():
    g = torch.Generator().manual_seed(3)
    return [seqpack.pack([torch.randint(3, VOCAB, (n,), generator=g) for n in lengths])
            for lengths in ([9, 1, 14, 6], [20, 3, 7])]


def test_hand_adapted_file_trains_like_automatic_path():
    auto, hand = model_pair()
    opt_a = torch.optim.SGD(auto.parameters(), lr=0.5)
    opt_h = torch.optim.SGD(hand.parameters(), lr=0.5)
    losses = []
    for step in range(2):
        for b in _batches():
            la = seqpack.causal_lm_loss(auto(**b.model_inputs()).logits, b)
            with gpc.micro_batch(b):
                lh = seqpack.causal_lm_loss(hand(input_ids=b.input_ids, position_ids=b.position_ids).logits, b)
            la.backward()
            lh.backward()
            losses.append((la.item(), lh.item()))
        for opt in (opt_a, opt_h):
            opt.step()
            opt.zero_grad()
    assert losses[0][0] != losses[-1][0], "training did not move the loss"
    for a, h in losses:
        assert abs(a - h) <= 1e-6, losses
    hand_params = dict(hand.named_parameters())
    for name, p in auto.named_parameters():
        assert (p - hand_params[name]).abs().max() <= 1e-5, name
    # without the packed slot the hand-adapted file runs its isp_flash_attn_func branch (one causal row)
    doc = _batches()[0].input_ids[:, :9]
    assert "use_packed_dataset" not in gpc.config.data
    with torch.no_grad():
        assert (hand(input_ids=doc).logits - auto(input_ids=doc).logits).abs().max() <= 1e-5


def test_micro_batch_slot_is_set_and_restored():
    b = _batches()[0]
    gpc.config.data["use_packed_dataset"] = False
    with gpc.micro_batch(b):
        assert gpc.config.data.use_packed_dataset is True
        assert gpc.config.data["cu_seqlens_data_rank0"] is b.cu_seqlens
        assert gpc.config.data["max_seqlen_data_rank0"] == 14
        assert gpc.get_local_rank(ParallelMode.DATA) == 0 and gpc.get_world_size(ParallelMode.TENSOR) == 1
    assert gpc.config.data == {"use_packed_dataset": False}
    del gpc.config.data["use_packed_dataset"]


def _naive_causal(q, k, v, scale, causal=True):
    """q [S, H, D], k/v [S, Hkv, D] -> [S, H, D], one causal (or bidirectional) sequence, per-head loop."""
    S, H, _ = q.shape
    out = torch.empty_like(q)
    for h in range(H):
        kv = h // (H // k.shape[1])
        s = (q[:, h] @ k[:, kv].T) * scale
        if causal:
            s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf)
        out[:, h] = torch.softmax(s, -1) @ v[:, kv]
    return out


def test_isp_attention_functions_match_naive_math():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 7, 4, 8, generator=g), torch.randn(2, 7, 2, 8, generator=g), torch.randn(2, 7, 2, 8,
                                                                                                       generator=g)
    out = isp_flash_attn_func(q, k, v, softmax_scale=0.3)
    for b in range(2):
        assert (out[b] - _naive_causal(q[b], k[b], v[b], 0.3)).abs().max() <= 1e-6
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = isp_flash_attn_varlen_func(q[:1], k[:1], v[:1], cu, cu, 4, 4)
    ref = torch.cat([_naive_causal(x[0, :3], y[0, :3], z[0, :3], 8 ** -0.5) for x, y, z in [(q, k, v)]] +
                    [_naive_causal(q[0, 3:], k[0, 3:], v[0, 3:], 8 ** -0.5)])
    assert (packed[0] - ref).abs().max() <= 1e-6
    old_style = isp_flash_attn_varlen_func(q[:1], k[:1], v[:1], cu_seqlens=cu, max_seqlen=4, causal=True)
    assert torch.equal(old_style, packed)
    bidirectional = isp_flash_attn_varlen_func(q[:1], k[:1], v[:1], cu, cu, 4, 4, causal=False)
    ref = torch.cat([_naive_causal(q[0, a:b], k[0, a:b], v[0, a:b], 8 ** -0.5, causal=False) for a, b in [(0, 3), (3, 7)]])
    assert (bidirectional[0] - ref).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="max_seqlen_q=3 is shorter than the longest document"):
        isp_flash_attn_varlen_func(q[:1], k[:1], v[:1], cu, cu, 3, 3)
    with pytest.raises(ValueError, match="cu_seqlens_k differs"):
        isp_flash_attn_varlen_func(q[:1], k[:1], v[:1], cu, torch.tensor([0, 7], dtype=torch.int32), 4, 7)
    with pytest.raises(ValueError, match="must end at T=7"):
        isp_flash_attn_varlen_func(q[:1], k[:1], v[:1], torch.tensor([0, 3, 6], dtype=torch.int32))


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb_matches_pairwise_rotation(interleaved):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 10, generator=g)  # rotary dim 6 of head dim 10
    ang = torch.randn(5, 3, generator=g)
    out = apply_rotary_emb(x, ang.cos(), ang.sin(), interleaved=interleaved)
    ref = x.clone()
    for i in range(3):  # pair i: (i, i + 3) for NeoX halves, (2i, 2i + 1) interleaved
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + 3)
        c, s = ang[:, i].cos()[None, :, None], ang[:, i].sin()[None, :, None]
        ref[..., a] = x[..., a] * c - x[..., b] * s
        ref[..., b] = x[..., a] * s + x[..., b] * c
    assert (out - ref).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="must have the same shape"):
        apply_rotary_emb(x, ang.cos(), ang.sin()[:, :2])


def test_hf_model_dispatch_switches_attention_interface_models():
    fresh = InternLM2ForCausalLM(tiny_internlm2())
    assert fresh.config._attn_implementation != "seqpack"
    assert hf_model_dispatch(fresh, auto_dispatch=True) is fresh
    assert fresh.config._attn_implementation == "seqpack" and fresh.model.layers[0].attention.seqpack_options
