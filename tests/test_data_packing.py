"""Packing strategies: cut/into_one equal an independent re-implementation of InternEvo's packed datasets;
bfd never cuts documents (unless split), reports drops, and fills packs; padded is one document per pack."""

import itertools

import numpy as np
import pytest
import torch

from seqpack.batch import IGNORE_INDEX
from seqpack.data import build_packed_loader, write_ftdp
from seqpack.data.bench_data import bench_packing, lognormal_lengths
from seqpack.data.packing import best_fit_decreasing, check_strategy, plan_bfd, plan_padded, render_row


def random_docs(rng, n, max_len, vocab=50):
    """Signed ftdp documents: ids 1..vocab, about 20 % negated (no loss)."""
    docs = []
    for _ in range(n):
        d = rng.integers(1, vocab, size=int(rng.integers(1, max_len + 1)))
        docs.append(np.where(rng.random(len(d)) < 0.2, -d, d).tolist())
    return docs


def write_folder(root, files):
    for rel, docs in files.items():
        write_ftdp(root / rel, [np.abs(d).tolist() for d in docs], loss_masks=[[t > 0 for t in d] for d in docs])
    return root


def internevo_reference(files_docs, seq_len, micro_bsz, seed=1024, min_length=0, into_one=False):
    """InternEvo's PackedDatasetWithCut / WithoutCuSeqlen, from its description: per file, shuffle the documents
    with RandomState(seed), lay their tokens end to end, cut every L = seq_len * micro_bsz tokens (drop the tail).
    Labels are the next token of the same document (-100 at its end, on a negative id, and — into_one only — at
    the end of every fragment); a fragment gets segments of at most seq_len (cut) or the windows are uniform."""
    L, packs = seq_len * micro_bsz, []
    for docs in files_docs:
        docs = [d for d in docs if len(d) >= min_length]
        order = list(range(len(docs)))
        np.random.RandomState(seed).shuffle(order)
        stream = [(k, i) for k in order for i in range(len(docs[k]))]
        for p in range(len(stream) // L):
            ids, labels, cu, pos = [], [], [0], []
            for k, group in itertools.groupby(stream[p * L:(p + 1) * L], key=lambda x: x[0]):
                idx = [i for _, i in group]
                for j, i in enumerate(idx):
                    ids.append(abs(docs[k][i]))
                    nxt = docs[k][i + 1] if i + 1 < len(docs[k]) else IGNORE_INDEX
                    if into_one and j == len(idx) - 1:
                        nxt = IGNORE_INDEX
                    labels.append(nxt if nxt > 0 else IGNORE_INDEX)
                for a in range(0, len(idx), seq_len):
                    seg = min(seq_len, len(idx) - a)
                    cu.append(cu[-1] + seg)
                    pos += list(range(seg))
            if into_one:
                cu, pos = list(range(0, L + 1, seq_len)), list(range(seq_len)) * micro_bsz
            packs.append((ids, labels, cu, pos))
    return packs


@pytest.mark.parametrize("packing", ["cut", "into_one"])
def test_cut_and_into_one_match_internevo(tmp_path, packing):
    rng = np.random.default_rng(0)
    files = {"en/a.bin": random_docs(rng, 40, 40), "en/b.bin": random_docs(rng, 25, 70),
             "zh/c.bin": random_docs(rng, 60, 12)}
    write_folder(tmp_path, files)
    seq_len, micro_bsz, min_length = 16, 2, 3
    ref = internevo_reference(list(files.values()), seq_len, micro_bsz, min_length=min_length,
                              into_one=packing == "into_one")
    loader = build_packed_loader(train_folder=tmp_path, seq_len=seq_len, micro_bsz=micro_bsz, packing=packing,
                                 min_length=min_length)
    assert loader.stats["filtered"] == sum(len(d) < min_length for docs in files.values() for d in docs) > 0
    # dataset order: pack u of the concatenated per-file datasets
    assert len(ref) == loader.groups[0].plan.num_units > 10
    for u, (ids, labels, cu, pos) in enumerate(ref):
        row = loader._render(0, [u])
        assert row.input_ids[0].tolist() == ids
        assert row.shift_labels[0].tolist() == labels
        assert row.cu_seqlens.tolist() == cu
        assert row.position_ids[0].tolist() == pos
    assert packing == "into_one" or any(len(c) > 3 for *_, c, _ in ref), "some pack must hold several documents"
    assert any(len(set(lab)) > 1 and IGNORE_INDEX in lab[:-1] for _, lab, *_ in ref)  # masked tokens inside packs
    # sampler order (XTuner InternRepoSampler): RandomState(seed + epoch) shuffle of the pack indices
    for epoch in range(2):
        order = np.arange(len(ref))
        np.random.RandomState(1024 + epoch).shuffle(order)
        for u in order:
            assert next(loader)[0].input_ids[0].tolist() == ref[u][0]
        assert loader.epoch == epoch + 1


def naive_bfd_loads(sizes, capacity):
    """Item by item: longest first, into the open bin with the least room that fits."""
    loads = []
    for s in sorted(sizes, reverse=True):
        fits = [i for i, load in enumerate(loads) if capacity - load >= s]
        if fits:
            best = min(fits, key=lambda i: capacity - loads[i])
            loads[best] += s
        else:
            loads.append(s)
    return sorted(loads)


@pytest.mark.parametrize("seed", range(4))
def test_bfd_loads_equal_item_by_item_best_fit(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(8, 64))
    sizes = np.sort(rng.integers(1, capacity + 1, size=400) // int(rng.integers(1, 4)) + 1)[::-1]
    sizes = np.minimum(sizes, capacity)
    bins = best_fit_decreasing(sizes, capacity)
    loads = np.bincount(bins, weights=sizes).astype(int)
    assert loads.max() <= capacity
    assert sorted(loads.tolist()) == naive_bfd_loads(sizes.tolist(), capacity)


def fragments_of(plan):
    out = {}
    for f in range(len(plan.doc)):
        out.setdefault(int(plan.doc[f]), []).append((int(plan.start[f]), int(plan.end[f])))
    return out


def test_bfd_never_cuts_documents_and_counts_overlong():
    rng = np.random.default_rng(1)
    seq_len = 64
    lengths = rng.integers(1, 100, size=500)
    long = lengths > seq_len
    split = plan_bfd(lengths, seq_len, overlong="split")
    frags = fragments_of(split)
    for d, n in enumerate(lengths):
        spans = sorted(frags[d])
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert len(spans) == (1 if n <= seq_len else -(-n // seq_len))  # whole, or ceil(n / seq_len) pieces
    assert split.stats["split"] == long.sum() > 0
    dropped = plan_bfd(lengths, seq_len, overlong="drop")
    assert dropped.stats["dropped"] == long.sum()
    assert sorted(fragments_of(dropped)) == np.flatnonzero(~long).tolist()
    assert all(spans == [(0, lengths[d])] for d, spans in fragments_of(dropped).items())
    for plan in (split, dropped):
        loads = np.diff(np.concatenate([[0], np.cumsum(plan.end - plan.start)])[plan.unit_ptr])
        assert loads.max() <= seq_len
    with pytest.raises(ValueError, match="overlong policy 'cut'.*split, drop"):
        plan_bfd(lengths, seq_len, overlong="cut")


def test_bfd_fill_ratio_lognormal():
    lengths = lognormal_lengths(50_000, max_len=4096)  # some longer than the pack: split
    rows = {r["strategy"]: r for r in bench_packing(lengths, 2048, repeats=1)}
    assert rows["bfd"]["fill"] > 0.99 and rows["cut"]["fill"] > 0.99 and rows["padded"]["fill"] < 0.5
    assert rows["bfd"]["packs"] == plan_bfd(lengths, 2048).num_units >= lengths.sum() / 2048


def test_padded_and_bfd_rows(tmp_path):
    rng = np.random.default_rng(2)
    docs = random_docs(rng, 30, 20)
    write_folder(tmp_path, {"a.bin": docs})
    seq_len, micro_bsz = 16, 3
    for packing in ("padded", "bfd"):
        with pytest.warns(UserWarning, match=r"dropped 7 documents \(\d+ tokens\) longer than seq_len=16"):
            loader = build_packed_loader(train_folder=tmp_path, seq_len=seq_len, micro_bsz=micro_bsz,
                                         packing=packing, overlong="drop")
        assert loader.stats["dropped"] == sum(len(d) > seq_len for d in docs) == 7
        plan = loader.groups[0].plan
        if packing == "padded":
            assert np.all(np.diff(plan.unit_ptr) == 1)
        seen = []
        for _ in range(loader.stats["steps_per_epoch"]):
            row = next(loader)[0]
            assert row.input_ids.shape == (1, seq_len * micro_bsz)
            cu = row.cu_seqlens.tolist()
            assert set(range(0, seq_len * micro_bsz + 1, seq_len)) <= set(cu)  # every pack ends on a boundary
            for a, b in zip(cu, cu[1:]):
                seg = row.input_ids[0, a:b].tolist()
                if all(t == 0 for t in seg) and (row.shift_labels[0, a:b] == IGNORE_INDEX).all():
                    continue  # pad segment
                seen.append(seg)
                assert row.shift_labels[0, b - 1] == IGNORE_INDEX  # documents are whole: no continuation label
        whole = sorted(np.abs(d).tolist() for d in docs if len(d) <= seq_len)
        used = loader.groups[0].units_per_epoch
        assert len(seen) <= len(whole) and all(s in whole for s in seen)
        if used == plan.num_units:
            assert sorted(seen) == whole


def test_render_label_continues_across_packs():
    raw = np.array([5, 6, -7, 8, 9], dtype=np.int64)
    plan = plan_padded(np.array([5]), unit_len=2)  # pieces [0,2) [2,4) [4,5)
    rows = [render_row(plan, [u], lambda d: raw, 2, "padded", pad_token_id=0) for u in range(3)]
    assert [r.input_ids[0].tolist() for r in rows] == [[5, 6], [7, 8], [9, 0]]
    assert [r.shift_labels[0].tolist() for r in rows] == [[6, IGNORE_INDEX], [8, 9], [IGNORE_INDEX, IGNORE_INDEX]]
    assert rows[2].cu_seqlens.tolist() == [0, 1, 2]


def test_unknown_strategy_lists_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown packing strategy 'greedy'; choose one of cut, into_one, bfd, padded"):
        check_strategy("greedy")
    write_folder(tmp_path, {"a.bin": [[1, 2, 3]] * 20})
    with pytest.raises(ValueError, match="choose one of"):
        build_packed_loader(train_folder=tmp_path, seq_len=4, packing="greedy")
    assert torch.is_tensor(build_packed_loader(train_folder=tmp_path, seq_len=4).__next__()[0].input_ids)
