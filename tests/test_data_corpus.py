"""The embedded corpus: deterministic documents, a locally trained tokenizer cached atomically, eos-terminated docs."""

import sysconfig
import threading
import time

import pytest

from seqpack.data import build_packed_loader, corpus
from seqpack.data.corpus import default_documents, default_token_docs, default_tokenizer, train_tokenizer


def test_documents_are_sorted_stdlib_sources():
    files = corpus.stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    rels = [str(p)[len(root) + 1:] for p in files]
    assert len(files) > 500 and rels == sorted(rels, key=lambda r: r.replace("\\", "/"))
    assert not any("site-packages" in r for r in rels)
    docs = default_documents(limit_bytes=200_000)
    assert docs == default_documents(limit_bytes=200_000)
    texts, total = [], 0  # whole files, up to the one that reaches 200 kB
    for f in files:
        texts.append(f.read_text(encoding="utf-8"))
        total += len(texts[-1].encode())
        if total >= 200_000:
            break
    assert "".join(docs) == "".join(texts) and len(docs) > 3 * len(texts)  # the files, cut at their definitions


def test_documents_are_the_definitions_of_each_file():
    """Each document is a function, a class header, a method or the module code between definitions; a file's
    documents joined are the file, so nothing is lost or reordered."""
    source = ('"""Doc."""\nimport os\n\n\n# Helper.\n@decorate\ndef f(x):\n    return x\n\n\nclass A(B):\n'
              '    """A class."""\n    n = 1\n\n    def g(self):\n        return 2\n\n    @property\n'
              '    def h(self):\n        return 3\n\n\nif __name__ == "__main__":\n    f(1)\n')
    docs = corpus.split_definitions(source)
    assert "".join(docs) == source
    assert [d.strip().splitlines()[0] for d in docs] == ['"""Doc."""', "# Helper.", "class A(B):", "def g(self):",
                                                        "@property", 'if __name__ == "__main__":']
    assert docs[2] == 'class A(B):\n    """A class."""\n    n = 1\n\n'
    assert corpus.split_definitions("def broken(:\n") == ["def broken(:\n"]  # not Python: kept whole
    for f in corpus.stdlib_files()[:40]:
        text = f.read_text(encoding="utf-8")
        assert "".join(corpus.split_definitions(text)) == text, f


def test_default_rows_hold_several_documents():
    """What the main job shows: a 256-token row of the embedded corpus holds several documents."""
    loader = build_packed_loader(seq_len=256, micro_num=2, max_docs=1500)
    counts = [len(b.cu_seqlens) - 1 for _ in range(50) for b in next(loader)]
    assert sum(counts) / len(counts) > 2 and sum(c == 1 for c in counts) < 0.5 * len(counts), counts


def test_tokenizer_training_is_deterministic_and_complete():
    texts = default_documents(limit_bytes=300_000)
    a, b = train_tokenizer(texts, vocab_size=600), train_tokenizer(texts, vocab_size=600)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 600
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (0, 1, 2)
    assert a.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    text = "def f(x):\n    return x  # ünïcode ✓\n"
    assert a.decode(a(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless


def test_default_tokenizer_cached_atomically(tmp_path, monkeypatch):
    shared = default_tokenizer()  # the usual cache (trained there once)
    monkeypatch.setenv("SEQPACK_CACHE", str(tmp_path))
    fresh = default_tokenizer()  # trained again in an empty cache: the same tokenizer
    assert fresh.backend_tokenizer.to_str() == shared.backend_tokenizer.to_str()
    entries = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert len(entries) == 1 and entries[0].startswith("tokenizer-py")  # no leftover temporary folder
    stamp = (tmp_path / entries[0] / "tokenizer.json").stat().st_mtime_ns
    default_tokenizer()
    assert (tmp_path / entries[0] / "tokenizer.json").stat().st_mtime_ns == stamp  # loaded, not retrained
    assert len(fresh) == corpus.VOCAB_SIZE and fresh.chat_template == corpus.CHAT_TEMPLATE


def test_token_docs_end_with_eos():
    tok = default_tokenizer()
    docs = default_token_docs(tok, limit_docs=5)
    texts = default_documents(limit_docs=5)
    assert len(docs) == 5 and all(d[-1] == tok.eos_token_id and tok.eos_token_id not in d[:-1] for d in docs)
    assert tok.decode(docs[3][:-1]) == texts[3]


def test_build_once_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        time.sleep(0.3)
        (tmp / "done").write_text("ok")

    workers = [threading.Thread(target=corpus.build_once, args=(tmp_path / "entry", build)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and (tmp_path / "entry" / "done").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock", "entry"]  # no temporary folder left

    def failing(tmp):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        corpus.build_once(tmp_path / "other", failing)
    assert not (tmp_path / "other").exists() and len(list(tmp_path.iterdir())) == 3  # + .other.lock only


def test_generated_tables_are_left_out():
    """Codec maps, Unicode tables and other generated files teach a model nothing about writing Python."""
    root = sysconfig.get_paths()["stdlib"]
    rels = {str(p)[len(root) + 1:].replace("\\", "/") for p in corpus.stdlib_files()}
    for generated in ("encodings/cp437.py", "encodings/cp1125.py", "stringprep.py", "html/entities.py",
                      "pydoc_data/topics.py"):
        assert generated not in rels, generated
    assert {"encodings/__init__.py", "json/decoder.py", "dataclasses.py"} <= rels  # real code stays
    assert corpus.is_generated_table("# Auto-generated by Tools/scripts/generate_re_casefix.py\n_EXTRA = {}\n")
    assert corpus.is_generated_table("t = (\n    '\\x00'  # 0x00\n    '\\x01'  # 0x01\n    '\\x02'  # 0x02\n)\n")
    assert not corpus.is_generated_table("def f(x):\n    return x & 0xFF\n\n\nprint(f(3))\n")
