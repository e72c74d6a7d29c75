"""The packed-batch contract, its validation errors, and the varlen kernels against plain math."""

import math

import pytest
import torch

import seqpack
from seqpack.attention.kernels import AttnSpec, resolve_backend, varlen_attention
from seqpack.batch import TENSOR_FIELDS, PackedBatch, length_buckets

from conftest import model_pair


def test_pack_layout():
    b = seqpack.pack([[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert b.shift_labels.tolist() == [[6, 7, -100, 9, -100, 11, 12, 13, -100]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 9] and b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == 4
    padded = seqpack.pack([torch.tensor([1, 2]), torch.tensor([3])], pad_to=6, pad_token_id=0)
    assert padded.input_ids.tolist() == [[1, 2, 3, 0, 0, 0]]
    assert padded.cu_seqlens.tolist() == [0, 2, 3, 6]  # the pad segment has its own entry
    assert padded.shift_labels.tolist() == [[2, -100, -100, -100, -100, -100]]
    assert padded.position_ids.tolist() == [[0, 1, 0, 0, 1, 2]]
    assert padded.max_seqlen == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(docs=[]), "empty document list"),
    (dict(docs=[[1, 2], []]), "document 1 is empty"),
    (dict(docs=[[1, 2, 3]], pad_to=2), "pad_to=2 is shorter than the 3 tokens"),
    (dict(docs=[[1, 2]], loss_masks=[[True]]), "loss mask 0 has 1 entries but document 0 has 2"),
    (dict(docs=[[1, 2]], loss_masks=[[True, True], [True]]), "1 documents but 2 loss masks"),
])
def test_pack_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        seqpack.pack(**kwargs)


def _fields(cu, positions=None):
    T = cu[-1]
    ids = torch.zeros(1, T, dtype=torch.long)
    pos = positions if positions is not None else seqpack.batch.positions_from_cu_seqlens(cu)[None]
    return dict(input_ids=ids, shift_labels=ids.clone(), position_ids=pos,
                cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(b - a for a, b in zip(cu, cu[1:])))


@pytest.mark.parametrize("cu, message", [
    ([1, 3, 5], "must start at 0, got 1"),
    ([0, 3, 3, 5], r"strictly increasing, but cu_seqlens\[2\]=3 <= cu_seqlens\[1\]=3"),
    ([0, 4, 2, 5], "strictly increasing"),
])
def test_packed_batch_rejects_bad_cu_seqlens(cu, message):
    fields = _fields([0, 5])
    fields["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        PackedBatch(**fields)


def test_packed_batch_rejects_cu_seqlens_not_ending_at_T_and_bad_positions():
    fields = _fields([0, 5])
    fields["cu_seqlens"] = torch.tensor([0, 2, 4], dtype=torch.int32)
    fields["max_seqlen"] = 2
    with pytest.raises(ValueError, match="must end at T=5"):
        PackedBatch(**fields)
    with pytest.raises(ValueError, match="position_ids inconsistent with cu_seqlens at token 3: got 3, expected 0"):
        PackedBatch(**_fields([0, 3, 5], positions=torch.arange(5)[None]))
    fields = _fields([0, 3, 5])
    fields["input_ids"] = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="batch dimension 1"):
        PackedBatch(**fields)


def test_model_rejects_inconsistent_metadata():
    """Bad metadata given straight to model(...) is caught inside the attention, not silently used."""
    _, model = model_pair("llama")
    good = seqpack.pack([[5, 6, 7, 8], [9, 10, 11]]).model_inputs()
    cases = [
        (dict(cu_seq_lens_q=torch.tensor([0, 4, 6], dtype=torch.int32)), "must end at T=7"),
        (dict(cu_seq_lens_q=torch.tensor([2, 4, 7], dtype=torch.int32)), "must start at 0"),
        (dict(cu_seq_lens_q=torch.tensor([0, 5, 4, 7], dtype=torch.int32)), "strictly increasing"),
        (dict(position_ids=torch.arange(7)[None]), "position_ids inconsistent with cu_seqlens at token 4"),
        (dict(input_ids=good["input_ids"].repeat(2, 1), position_ids=good["position_ids"].repeat(2, 1)),
         "batch dimension 2"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**{**good, **change})


def _reference_attention(q, k, v, cu, spec):
    """Plain per-document math with an explicit mask and repeated KV."""
    out = torch.zeros_like(q)
    rep = q.shape[1] // k.shape[1]
    for a, b in zip(cu, cu[1:]):
        qd, kd, vd = q[a:b].transpose(0, 1), k[a:b].repeat_interleave(rep, 1).transpose(0, 1), \
            v[a:b].repeat_interleave(rep, 1).transpose(0, 1)
        s = qd @ kd.transpose(-1, -2) * spec.scale
        if spec.softcap:
            s = spec.softcap * torch.tanh(s / spec.softcap)
        i = torch.arange(b - a)
        mask = i[None, :] <= i[:, None]
        if spec.sliding_window:
            mask &= i[None, :] > i[:, None] - spec.sliding_window
        out[a:b] = (s.masked_fill(~mask, -math.inf).softmax(-1) @ vd).transpose(0, 1)
    return out


@pytest.mark.parametrize("spec", [AttnSpec(scale=0.3), AttnSpec(scale=0.25, sliding_window=3),
                                  AttnSpec(scale=0.25, softcap=2.0), AttnSpec(scale=0.2, sliding_window=4, softcap=1.5)])
@pytest.mark.parametrize("nkv", [1, 2, 6])
def test_sdpa_kernel_matches_math_with_gradients(spec, nkv):
    g = torch.Generator().manual_seed(0)
    cu = [0, 1, 9, 10, 23, 30, 47, 48]
    T, N, D = cu[-1], 6, 8
    q, k, v = (torch.randn(T, h, D, generator=g, requires_grad=True) for h in (N, nkv, nkv))
    out = varlen_attention(q, k, v, cu, 17, spec, "sdpa")
    ref = _reference_attention(q, k, v, cu, spec)
    assert (out - ref).abs().max() <= 1e-5
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5


def test_length_buckets_bound_padding():
    lengths = [100, 3, 80, 76, 1, 2, 60, 74]
    buckets = length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        assert all(lengths[i] >= 0.75 * lengths[b[0]] for i in b)
    assert buckets[0] == [0, 2, 3]


def test_backend_choice_and_errors():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, AttnSpec(scale=1.0)) == "sdpa"
    with pytest.raises(ValueError, match="'flash_attn' needs CUDA tensors"):
        resolve_backend("flash_attn", cpu, AttnSpec(scale=1.0))
    with pytest.raises(ValueError, match="'torch_varlen' needs CUDA tensors"):
        resolve_backend("torch_varlen", cpu, AttnSpec(scale=1.0))
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        resolve_backend("xformers", cpu, AttnSpec(scale=1.0))
    if not torch.cuda.is_available():  # without CUDA the request fails over with a clear message
        with pytest.raises(ValueError, match="needs torch.nn.attention.varlen|not installed|CUDA"):
            resolve_backend("torch_varlen", torch.device("cuda"), AttnSpec(scale=1.0, softcap=2.0))


def test_map_tensors_maps_every_tensor_of_packed_and_sharded_batches():
    """What the prefetcher uses to pin and move batches: every tensor field mapped, host metadata kept."""
    from seqpack.parallel import shard_batch

    batch = seqpack.pack([[5, 6, 7], [8, 9]])
    for b in (batch, shard_batch(batch, 2, 1)):
        seen = []
        out = b.map_tensors(lambda t: seen.append(t) or t + 0)
        assert type(out) is type(b) and out is not b and out.max_seqlen == b.max_seqlen
        assert [id(t) for t in seen] == [id(getattr(b, f)) for f in TENSOR_FIELDS]
        for f in TENSOR_FIELDS:
            assert torch.equal(getattr(out, f), getattr(b, f)) and getattr(out, f) is not getattr(b, f)
    assert shard_batch(batch, 2, 1).map_tensors(torch.clone).sp_rank == 1
