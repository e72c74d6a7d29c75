"""The resumable loader: exact resume, epochs, DP sharding, identical batches within an SP group, mixing."""

import json

import numpy as np
import pytest

from seqpack.data import build_packed_loader, write_ftdp


def make_folder(root, groups):
    """groups: {type: (number of files, docs per file, max doc length, first token id)}; ids identify the group."""
    rng = np.random.default_rng(0)
    for name, (n_files, n_docs, max_len, base) in groups.items():
        for i in range(n_files):
            docs = [(base + rng.integers(0, 50, size=int(rng.integers(1, max_len)))).tolist() for _ in range(n_docs)]
            write_ftdp(root / name / f"part-{i}.bin", docs)
    return root


def rows_of(step):
    return [(b.input_ids[0].tolist(), b.cu_seqlens.tolist(), b.shift_labels[0].tolist()) for b in step]


CASES = {
    "cut-dp2-rank1": dict(packing="cut", seq_len=16, micro_bsz=2, micro_num=3, dp_rank=1, dp_size=2),
    "bfd-mixed": dict(packing="bfd", seq_len=24, micro_bsz=2, micro_num=2, dataset_weights={"en": 2, "zh": 1}),
    "into_one": dict(packing="into_one", seq_len=8, micro_bsz=4, micro_num=1),
}


@pytest.mark.parametrize("case", CASES)
def test_resume_equals_uninterrupted(tmp_path, case):
    folder = make_folder(tmp_path, {"en": (2, 40, 30, 1), "zh": (1, 30, 20, 100)})
    kw = dict(train_folder=folder, **CASES[case])
    full = build_packed_loader(**kw)
    k = 2 * full.stats["steps_per_epoch"] + 1 if full.stats["steps_per_epoch"] else 25  # crosses epoch boundaries
    reference = [rows_of(next(full)) for _ in range(k + 5)]

    first = build_packed_loader(**kw)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain data, survives a checkpoint
    resumed = build_packed_loader(**kw)
    resumed.load_state_dict(state)
    assert resumed.step == k and resumed.epoch == first.epoch >= 1
    assert [rows_of(next(resumed)) for _ in range(5)] == reference[k:]


def test_epochs_reshuffle_and_dp_ranks_partition(tmp_path):
    folder = make_folder(tmp_path, {"en": (2, 50, 30, 1)})
    kw = dict(train_folder=folder, packing="cut", seq_len=16, micro_num=2, dp_size=2)
    loaders = [build_packed_loader(dp_rank=r, **kw) for r in range(2)]
    steps = loaders[0].stats["steps_per_epoch"]
    assert steps >= 3
    epochs = []
    for _ in range(2):
        rows = [[tuple(b.input_ids[0].tolist()) for ld in loaders for b in next(ld)] for _ in range(steps)]
        flat = [r for step in rows for r in step]
        assert len(set(flat)) == len(flat)  # ranks and steps never repeat a pack within an epoch
        epochs.append(flat)
    # same packs in a new order (each epoch truncates its permutation to whole steps: at most 3 packs differ)
    assert len(set(epochs[0]) & set(epochs[1])) >= len(epochs[0]) - 3 and epochs[0] != epochs[1]
    assert len(epochs[0]) == steps * 4 > loaders[0].groups[0].plan.num_units - 4
    assert loaders[0].epoch == 2


def test_sequence_parallel_group_gets_identical_batches(tmp_path):
    folder = make_folder(tmp_path, {"en": (1, 60, 30, 1), "zh": (1, 60, 30, 100)})
    kw = dict(train_folder=folder, packing="bfd", seq_len=16, micro_bsz=2, micro_num=2, dp_size=2,
              dataset_weights={"en": 1, "zh": 1})
    # world of 4 = dp 2 x sp 2: ranks 0,1 form SP group of dp_rank 0; ranks 2,3 of dp_rank 1
    world = [build_packed_loader(dp_rank=rank // 2, **kw) for rank in range(4)]
    for _ in range(6):
        steps = [rows_of(next(ld)) for ld in world]
        assert steps[0] == steps[1] and steps[2] == steps[3] and steps[0] != steps[2]


def test_mixing_proportions(tmp_path):
    # zh has 9x fewer tokens than en but gets weight 1 vs 3: it cycles through several epochs meanwhile
    folder = make_folder(tmp_path, {"en": (3, 60, 40, 1), "zh": (1, 20, 40, 1000), "code": (1, 20, 40, 5000)})
    kw = dict(train_folder=folder, packing="cut", seq_len=16, micro_num=4, dataset_weights={"en": 3, "zh": 1,
                                                                                           "code": 0})
    loader = build_packed_loader(**kw)
    counts, n_rows = {"en": 0, "zh": 0}, 0
    for i in range(100):
        for b in next(loader):
            ids = b.input_ids[0]
            assert not (ids >= 5000).any(), "weight 0 leaves the group out"
            counts["zh" if (ids >= 1000).all() else "en"] += 1
            assert (ids < 1000).all() or (ids >= 1000).all(), "a row comes from one group"
            n_rows += 1
        if i in (9, 99):  # deterministic schedule: within one row of the target share at all times
            assert abs(counts["en"] - 0.75 * n_rows) <= 1 and abs(counts["zh"] - 0.25 * n_rows) <= 1
    zh = loader.stats["group/zh"]["units"]
    assert loader._cursors[1][0] == (counts["zh"]) // zh >= 2  # zh went through several epochs
    again = build_packed_loader(**kw)
    loader2 = build_packed_loader(**kw)
    assert [rows_of(next(again)) for _ in range(3)] == [rows_of(next(loader2)) for _ in range(3)]


def test_mixing_errors_and_state_mismatch(tmp_path):
    folder = make_folder(tmp_path, {"en": (1, 30, 30, 1), "zh": (1, 30, 30, 100)})
    with pytest.raises(ValueError, match=r"file 'zh/part-0.bin' matches no dataset_weights key"):
        build_packed_loader(train_folder=folder, seq_len=8, dataset_weights={"en": 1})
    with pytest.raises(ValueError, match=r"keys \['fr'\] match no \.bin file"):
        build_packed_loader(train_folder=folder, seq_len=8, dataset_weights={"en": 1, "zh": 1, "fr": 1})
    with pytest.raises(ValueError, match=r"matches several dataset_weights keys \['en', '\*/part-0.bin'\]"):
        build_packed_loader(train_folder=folder, seq_len=8, dataset_weights={"en": 1, "*/part-0.bin": 1})
    with pytest.raises(ValueError, match=r"dataset_weights\['en'\] = -1"):
        build_packed_loader(train_folder=folder, seq_len=8, dataset_weights={"en": -1, "zh": 1})
    with pytest.raises(ValueError, match=r"fewer than the 200 one step needs"):
        build_packed_loader(train_folder=folder, seq_len=8, micro_num=200)
    state = build_packed_loader(train_folder=folder, seq_len=8).state_dict()
    with pytest.raises(ValueError, match=r"seq_len: saved 8, now 16"):
        build_packed_loader(train_folder=folder, seq_len=16).load_state_dict(state)


def test_default_corpus_loader():
    from seqpack.data import default_documents, default_tokenizer
    from seqpack.data.corpus import default_corpus_folder

    loader = build_packed_loader(seq_len=128, micro_bsz=2, micro_num=2, max_docs=12, packing="bfd")
    step = next(loader)
    assert len(step) == 2 and all(b.input_ids.shape == (1, 256) for b in step)
    tok = default_tokenizer()
    assert default_corpus_folder(tok, 12) == default_corpus_folder(tok, 12)  # cached, same folder
    corpus_text = "".join(default_documents(limit_docs=12))
    for b in step:  # every document piece of a row is a piece of a stdlib source file
        cu = b.cu_seqlens.tolist()
        pieces = [tok.decode(b.input_ids[0, s:e].tolist(), skip_special_tokens=True) for s, e in zip(cu, cu[1:])]
        assert all(p.strip("\ufffd") in corpus_text for p in pieces if p.strip("\ufffd")), pieces
    assert loader.stats["documents"] == 12 and loader.stats["split"] > 0  # some definitions are longer than 128


def test_min_length_dict_keys_match_the_full_path_like_internevo(tmp_path):
    """InternEvo tests `key in os.path.join(root, file)`: the folder's own path counts too."""
    folder = tmp_path / "corpus_v2"
    write_ftdp(folder / "en" / "a.bin", [[1] * n for n in (2, 4, 6, 8)])
    write_ftdp(folder / "zh" / "b.bin", [[2] * n for n in (2, 4, 6, 8)])
    kw = dict(train_folder=folder, seq_len=4, min_length=0)
    assert build_packed_loader(**kw, min_length_dict={"en/": 5}).stats["filtered"] == 2  # en's 2 and 4
    assert build_packed_loader(**kw, min_length_dict={"corpus_v2": 5}).stats["filtered"] == 4  # every file
    with pytest.raises(ValueError, match=r"corpus_v2/en/a\.bin' matches several min_length_dict keys"):
        build_packed_loader(**kw, min_length_dict={"corpus_v2": 5, "a.bin": 3})
