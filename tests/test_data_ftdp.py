"""ftdp files: round trip of tokens and loss masks, int32/int64 meta as written by InternEvo's and XTuner's tools,
and clear errors naming the file and line for every kind of broken input."""

import json

import numpy as np
import pytest

from seqpack.data import FtdpFile, build_packed_loader, list_bin_files, write_ftdp
from seqpack.data.ftdp import FAST_MIN_BYTES, FtdpError, parse_tokens


def write_like_internevo_tool(path, docs, dtype):
    """The tools' way: json.dumps({"tokens": ...}) + newline per document, np.save of (offset, count) rows."""
    offsets, counts, pos = [], [], 0
    with open(path, "wb") as f:
        for d in docs:
            line = (json.dumps({"tokens": d}) + "\n").encode()
            offsets.append(pos)
            counts.append(len(d))
            f.write(line)
            pos += len(line)
    rows = [[o, c] for o, c in zip(offsets, counts)]
    np.save(f"{path}.meta", np.array(rows, dtype=dtype) if dtype else np.array(rows))  # xtuner: Python ints -> int64
    (path.parent / f"{path.name}.meta.npy").rename(f"{path}.meta")


def test_round_trip_tokens_and_loss_masks(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, size=int(rng.integers(1, 50))).tolist() for _ in range(30)]
    masks = [(rng.random(len(d)) < 0.7).tolist() for d in docs]
    write_ftdp(tmp_path / "t" / "a.bin", docs, loss_masks=masks)
    f = FtdpFile(tmp_path / "t" / "a.bin")
    assert len(f) == 30 and f.lengths.tolist() == [len(d) for d in docs]
    for i, (d, m) in enumerate(zip(docs, masks)):
        ids, mask = f.document(i)
        assert ids.tolist() == d and mask.tolist() == m
    assert not list(tmp_path.rglob("*.tmp*")), "no temporary files left behind"


@pytest.mark.parametrize("dtype", [np.int32, np.int64, None])
def test_reads_meta_written_by_internevo_and_xtuner_tools(tmp_path, dtype):
    docs = [[1, -2, 3], [4, 5], [-6, 7, 8, 9]]
    write_like_internevo_tool(tmp_path / "x.bin", docs, dtype)
    meta = np.load(tmp_path / "x.bin.meta")
    assert meta.dtype == (dtype or np.int64)
    f = FtdpFile(tmp_path / "x.bin")
    assert [f.raw(i).tolist() for i in range(3)] == docs
    assert f.document(0)[1].tolist() == [True, False, True]


def test_folder_listing_order_and_data_order_file(tmp_path):
    for rel in ["zh/b.bin", "en/sub/c.bin", "en/a.bin", "root.bin"]:
        write_ftdp(tmp_path / rel, [[1, 2]])
    assert list_bin_files(tmp_path) == ["root.bin", "en/a.bin", "en/sub/c.bin", "zh/b.bin"]  # os.walk, sorted
    order = tmp_path / "order.txt"
    order.write_text("zh/b.bin\n\nen/a.bin\n")
    assert list_bin_files(tmp_path, order) == ["zh/b.bin", "en/a.bin"]
    order.write_text("zh/b.bin\nen/missing.bin\n")
    with pytest.raises(ValueError, match=r"order.txt line 2: 'en/missing.bin' is not a file under"):
        list_bin_files(tmp_path, order)


def save_meta(path, meta):
    with open(f"{path}.meta", "wb") as f:
        np.save(f, meta)


def broken(tmp_path, edit):
    path = tmp_path / "d" / "bad.bin"
    write_ftdp(path, [[1, 2, 3], [4, 5], [6, 7, 8, 9]], meta_dtype=np.int64)
    edit(path)
    return path


def test_corrupt_json_line_names_file_and_line(tmp_path):
    def corrupt(path):
        lines = path.read_bytes().split(b"\n")
        lines[1] = b'{"tokens": [4, 5'.ljust(len(lines[1]))  # same byte length: offsets stay valid
        path.write_bytes(b"\n".join(lines))

    path = broken(tmp_path, corrupt)
    f = FtdpFile(path)
    assert f.raw(0).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"bad\.bin line 2 \(byte \d+\): not a JSON object"):
        f.raw(1)


def test_meta_offsets_not_at_line_starts(tmp_path):
    def shift(path):
        meta = np.load(f"{path}.meta")
        meta[2, 0] += 3
        save_meta(path, meta)

    with pytest.raises(ValueError, match=r"bad\.bin\.meta .*row 2 \(line 3\): offset \d+ does not point at the start"):
        FtdpFile(broken(tmp_path, shift))


def test_meta_count_differs_from_line(tmp_path):
    def recount(count):
        def edit(path):
            meta = np.load(f"{path}.meta")
            meta[1, 1] = count
            save_meta(path, meta)
        return edit

    # more tokens than the line's bytes can hold: a stale meta, found on open (at the start of training)
    with pytest.raises(ValueError, match=r"row 1 \(line 2\): the meta says 7 tokens but the line has only 19 bytes"):
        FtdpFile(broken(tmp_path / "a", recount(7)))
    f = FtdpFile(broken(tmp_path / "b", recount(1)))  # fewer: found when the line is read
    with pytest.raises(ValueError, match=r"bad\.bin line 2 .*meta says 1 tokens but the line has 2"):
        f.raw(1)


def test_meta_rows_differ_from_lines(tmp_path):
    def drop_row(path):
        meta = np.load(f"{path}.meta")
        save_meta(path, meta[:2])

    with pytest.raises(ValueError, match=r"has 2 rows but .*bad\.bin has 3 lines"):
        FtdpFile(broken(tmp_path, drop_row))


def test_meta_rows_differ_from_lines_in_files_too_large_to_count(tmp_path, monkeypatch):
    from seqpack.data import ftdp

    monkeypatch.setattr(ftdp, "FULL_CHECK_BYTES", 0)  # as for a file over 1 GiB: lines are not counted
    assert len(FtdpFile(broken(tmp_path / "ok", lambda path: None))) == 3
    with pytest.raises(ValueError, match=r"bad\.bin has more lines after row 1's line"):
        FtdpFile(broken(tmp_path, lambda path: save_meta(path, np.load(f"{path}.meta")[:2])))


def test_missing_meta_and_empty_folder(tmp_path):
    path = broken(tmp_path, lambda p: (p.parent / f"{p.name}.meta").unlink())
    with pytest.raises(ValueError, match=r"bad\.bin: meta file .*bad\.bin\.meta is missing"):
        FtdpFile(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \.bin files under .*empty"):
        build_packed_loader(train_folder=tmp_path / "empty", seq_len=4)
    with pytest.raises(ValueError, match="does not exist"):
        build_packed_loader(train_folder=tmp_path / "nope", seq_len=4)


def test_token_id_beyond_vocab_named_before_training(tmp_path):
    docs = [[1, 2, 3, 4]] * 10 + [[1, 2, 300, 4]] + [[5, 6, 7, 8]] * 10
    write_ftdp(tmp_path / "a.bin", docs)
    loader = build_packed_loader(train_folder=tmp_path, seq_len=8)
    assert loader.check_vocab(400) == 300
    with pytest.raises(ValueError, match=r"a\.bin line 11: token id 300 >= the model's vocab_size 256"):
        loader.check_vocab(256)
    checked = build_packed_loader(train_folder=tmp_path, seq_len=8, vocab_size=256)
    with pytest.raises(ValueError, match=r"a\.bin line 11: token id 300"):
        for _ in range(checked.stats["steps_per_epoch"]):
            next(checked)


def test_line_with_other_keys_reads_its_tokens_key(tmp_path):
    """The fast parser must never disagree with json.loads: here "tokens" is not the first list on the line."""
    path = tmp_path / "k.bin"
    line = b'{"kind": "tokens", "ids": [7,8,9], "tokens": [1,-2,3]}\n'
    path.write_bytes(line)
    save_meta(path, np.array([[0, 3]], dtype=np.int32))
    assert FtdpFile(path).raw(0).tolist() == [1, -2, 3]
    long = json.dumps({"kind": "tokens", "ids": [7] * 3000, "tokens": [1, -2, 3] * 1000}).encode()
    assert len(long) > FAST_MIN_BYTES and parse_tokens(long, "x").tolist() == [1, -2, 3] * 1000


def json_tokens(line: bytes):
    try:
        tokens = json.loads(line)["tokens"]
    except (ValueError, KeyError, TypeError):
        return "error"
    return tokens if isinstance(tokens, list) and all(type(t) is int for t in tokens) else "error"


def test_fast_parser_agrees_with_json_on_long_lines():
    """Lines long enough for the NumPy path, plain and with every kind of near-miss: same ids as json.loads, or
    an FtdpError where json.loads fails (or gives something other than integers)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(-5000, 5000, size=2000).tolist()
    plain = json.dumps({"tokens": ids})
    variants = [plain, plain.replace(", ", ","), plain.replace(", ", ",\t "), " " + plain + " \r\n",
                plain.replace("[", "[ ").replace("]", " ]"), plain.replace(", ", ", 0", 1),  # leading zero
                plain.replace(", ", ", , ", 1), plain.replace(", ", " ", 1), plain.replace(", ", ",- ", 1),
                plain.replace(", ", "-", 1), plain.replace(", ", ", --", 1), plain.replace("]", ", ]"),
                plain.replace("[", "[, "), plain.replace(", ", ".0, ", 1),
                plain.replace(", ", ", 12345678901234567890, ", 1),
                plain.replace(", ", ", 123456789012345678, ", 1), plain.replace(", ", ", -0, ", 1),
                plain.replace(", ", ", true, ", 1), plain.replace("}", ', "tokens": [1]}'),
                plain.replace("}", ', "ids": [1, 2]}'), '{"ids": [1], ' + plain[1:], plain + "x",
                plain.replace(", ", " , ", 1), plain[:-1]]
    for text in variants:
        line = text.encode()
        assert len(line) > FAST_MIN_BYTES
        want = json_tokens(line)
        try:
            got = parse_tokens(line, "line").tolist()
        except FtdpError:
            got = "error"
        if want != "error" and max(map(abs, want)) >= 2 ** 63:
            want = "error"  # json's unbounded int: not an int64 token id
        assert got == want, text[:60]
