"""`seqpack data check`: a clean folder's statistics, and the first problem of every kind named with its file and
line (exit code 1); `seqpack train` stops at startup on a stale meta."""

import json
import re

import numpy as np
import pytest

from seqpack.cli import main
from seqpack.data import write_ftdp
from seqpack.data.check import check_folder


def write_lines(path, lines: list[bytes], counts: list[int], dtype=np.int64):
    """A .bin of exactly these lines (newline added) and a meta with their offsets and the given counts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(data)
    offsets = np.cumsum([0] + [len(line) + 1 for line in lines])[:-1]
    with open(f"{path}.meta", "wb") as f:
        np.save(f, np.stack([offsets, counts], axis=1).astype(dtype))


def tokens(ids) -> bytes:
    return json.dumps({"tokens": ids}).encode()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """The embedded corpus tokenizer (vocab 4096) saved as a local folder."""
    from seqpack.data import default_tokenizer

    path = tmp_path_factory.mktemp("tok")
    default_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def clean(tmp_path):
    folder = tmp_path / "clean"
    write_ftdp(folder / "en" / "a.bin", [[1, 2, 3], [4, 5]], loss_masks=[[True, False, True], [True, True]])
    write_ftdp(folder / "en" / "sub" / "b.bin", [[6] * 10], meta_dtype=np.int64)
    write_ftdp(folder / "code" / "c.bin", [[7, 8, 9, 10]] * 4)
    write_ftdp(folder / "top.bin", [[11]])
    return folder


def test_clean_folder_statistics_per_type(clean, capsys):
    stats = check_folder(clean, vocab_size=12)
    assert list(stats) == [".", "code", "en", "(total)"]
    assert stats["en"] == dict(files=2, documents=3, tokens=15, loss_tokens=14,
                               length=dict(min=2, p50=3, p90=8, p99=9, max=10))
    assert stats["code"]["documents"] == 4 and stats["code"]["loss_tokens"] == 16
    assert stats["(total)"]["files"] == 4 and stats["(total)"]["documents"] == 8
    assert stats["(total)"]["tokens"] == 15 + 16 + 1 and stats["(total)"]["loss_tokens"] == 14 + 16 + 1
    assert main(["data", "check", str(clean), "--vocab-size", "12"]) == 0
    out = capsys.readouterr().out
    assert "valid ftdp folder, every id < 12" in out and out.splitlines()[2].split()[:5] == ["code", "1", "4", "16",
                                                                                            "16"]


CORRUPTIONS = {
    # kind, lines, counts, expected message (file and line)
    "json": ([tokens([1, 2]), b'{"tokens": [3, 4'], [2, 2], r"bad\.bin line 2 \(byte 19\): not a JSON object"),
    "utf8": ([tokens([1]), b'{"tokens": [3, 4], "src": "\xff\xfe"}'], [1, 2], r"bad\.bin line 2 .*: not UTF-8"),
    "count": ([tokens([1, 2]), tokens([1, 2, 3])], [2, 2], r"bad\.bin line 2 .*meta says 2 tokens but the line has 3"),
    "empty": ([tokens([1, 2]), tokens([])], [2, 0], r"row 1 \(line 2\): token count 0 must be positive \(an empty"),
    "vocab": ([tokens([1, 2]), tokens([3]), tokens([-300, 4])], [2, 1, 2],
              r"bad\.bin line 3: token id 300 >= the model's vocab_size 256"),
    "meta": ([tokens([1, 2]), tokens([3, 4, 5])], [2, 9], r"row 1 \(line 2\): the meta says 9 tokens but the line"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_kind_of_corruption_names_kind_file_and_line(clean, kind, capsys):
    lines, counts, message = CORRUPTIONS[kind]
    write_lines(clean / "en" / "bad.bin", lines, counts)
    assert main(["data", "check", str(clean), "--vocab-size", "256"]) == 1
    err = capsys.readouterr().err
    assert f"[{kind}]" in err, err
    assert re.search(message, err), err


@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta[:1], r"has 1 rows but .*bad\.bin has 2 lines"),
    (lambda meta: meta + np.array([[1, 0]]), r"row 0 \(line 1\): offset 1 does not point at the start of a line"),
    (lambda meta: meta.astype(np.float64), r"expected an integer array of shape \(N, 2\)"),
    (lambda meta: meta.astype(np.int16), r"dtype int16 .*int32 or int64"),
    (lambda meta: np.insert(meta, 1, 0, axis=1), r"shape \(2, 3\); ftdp metas are int32 or int64"),
])
def test_meta_problems(clean, edit, message, capsys):
    path = clean / "en" / "bad.bin"
    write_ftdp(path, [[1, 2], [3]])
    meta = np.load(f"{path}.meta")
    with open(f"{path}.meta", "wb") as f:
        np.save(f, edit(meta))
    assert main(["data", "check", str(clean)]) == 1
    err = capsys.readouterr().err
    assert "[meta]" in err and re.search(message, err), err


def test_missing_meta_tokenizer_vocab_and_usage_errors(clean, tmp_path, tok_dir, capsys):
    write_ftdp(clean / "en" / "big.bin", [[4095, 4096]])
    assert main(["data", "check", str(clean), "--tokenizer", str(tok_dir)]) == 1
    assert "[vocab]" in capsys.readouterr().err
    (clean / "en" / "big.bin.meta").unlink()
    assert main(["data", "check", str(clean)]) == 1
    err = capsys.readouterr().err
    assert "[meta]" in err and "big.bin.meta is missing" in err, err
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_stops_at_startup_on_a_stale_meta(clean, tmp_path, tok_dir):
    """The cheap part of the check runs when the loader is built, before the first step."""
    from seqpack.train import load_config, train

    write_ftdp(clean / "en" / "zz.bin", [[1, 2, 3]] * 50)
    meta = np.load(clean / "en" / "zz.bin.meta")
    meta[49, 1] = 40  # the last document: read last of all, hours into a real run
    with open(clean / "en" / "zz.bin.meta", "wb") as f:
        np.save(f, meta)
    cfg = load_config(None, ["--model.hidden_size", "32", "--model.num_layers", "1", "--data.seq_len", "16",
                             "--data.train_folder", str(clean), "--data.tokenizer_path", str(tok_dir),
                             "--train.run_dir", str(tmp_path / "run"), "--train.tensorboard", "False"])
    with pytest.raises(ValueError, match=r"zz\.bin\.meta .*row 49 \(line 50\): the meta says 40 tokens"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
