"""`seqpack tokenize`: JSONL text / chat, parquet, datasets folders -> ftdp; chat loss only on assistant turns."""

import json

import pytest

from seqpack.cli import main
from seqpack.data import FtdpFile, default_tokenizer, list_bin_files
from seqpack.data.sources import encode_chat

CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "add two numbers"},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "and three?"}, {"role": "assistant", "content": "def add3(a, b, c): ..."}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    default_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def loss_text(tok, f, i):
    ids, mask = f.document(i)
    return tok.decode(ids[mask].tolist()), tok.decode(ids.tolist())


def test_text_and_chat_jsonl(tmp_path, tok_dir, capsys):
    tok = default_tokenizer()
    texts = ["import os\nprint(os.getcwd())\n", "x = 1"]
    write_jsonl(tmp_path / "raw" / "mix.jsonl", [{"text": texts[0]}, {"messages": CHAT}, {"text": texts[1], "id": 7}])
    assert main(["tokenize", str(tmp_path / "raw"), "-o", str(tmp_path / "out"), "--tokenizer", str(tok_dir),
                 "--type", "sft", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "3 documents (2 text, 1 chat)" in summary and "p50" in summary and "p99" in summary
    lengths = sorted(int(n) for n in FtdpFile(tmp_path / "out" / "sft" / "mix.bin").lengths)
    assert f"min {lengths[0]}  p50 {lengths[1]}" in summary and summary.rstrip().endswith(f"max {lengths[2]}")
    assert list_bin_files(tmp_path / "out") == ["sft/mix.bin"]
    f = FtdpFile(tmp_path / "out" / "sft" / "mix.bin")
    for i, text in ((0, texts[0]), (2, texts[1])):
        ids, mask = f.document(i)
        body = tok(text, add_special_tokens=False)["input_ids"]
        assert ids.tolist() == [tok.bos_token_id, *body, tok.eos_token_id]
        assert mask[1:].all()
    loss, full = loss_text(tok, f, 1)
    assert loss == "def add(a, b):\n    return a + b<|im_end|>def add3(a, b, c): ...<|im_end|>"
    assert full == tok.apply_chat_template(CHAT, tokenize=False)
    assert f"{summary}".count("wrote 1 ftdp files") == 1


def test_chat_template_without_generation_markers(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids, mask = encode_chat(tok, CHAT)
    loss = tok.decode([t for t, m in zip(ids, mask) if m])
    assert loss == "def add(a, b):\n    return a + b<|im_end|>\ndef add3(a, b, c): ...<|im_end|>\n"
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)


def test_parquet_and_datasets_folder_mirror_tree(tmp_path, tok_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = tmp_path / "raw"
    (raw / "code").mkdir(parents=True)
    pq.write_table(pa.table({"content": ["a = 1", "b = 2", "c = 3"]}), raw / "code" / "p.parquet")
    datasets.Dataset.from_dict({"content": ["def f(): pass"] * 4}).save_to_disk(str(raw / "web" / "hf"))
    assert main(["tokenize", str(raw), "-o", str(tmp_path / "out"), "--tokenizer", str(tok_dir),
                 "--text-key", "content", "--no-bos", "--meta-dtype", "int64", "--no-progress"]) == 0
    assert list_bin_files(tmp_path / "out") == ["code/p.bin", "web/hf.bin"]
    tok = default_tokenizer()
    f = FtdpFile(tmp_path / "out" / "code" / "p.bin")
    assert [tok.decode(f.document(i)[0].tolist()) for i in range(3)] == [f"{c} = {i + 1}<|endoftext|>"
                                                                         for i, c in enumerate("abc")]
    assert len(FtdpFile(tmp_path / "out" / "web" / "hf.bin")) == 4


def test_bad_inputs_name_file_and_line(tmp_path, tok_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "broken\n')
    rc = main(["tokenize", str(bad), "-o", str(tmp_path / "out"), "--tokenizer", str(tok_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl line 3: invalid JSON" in err
    assert not (tmp_path / "out" / "bad.bin").exists() and not list((tmp_path / "out").glob(".*tmp"))
    write_jsonl(tmp_path / "k.jsonl", [{"text": "a"}, {"body": "b"}])
    assert main(["tokenize", str(tmp_path / "k.jsonl"), "-o", str(tmp_path / "o2"), "--tokenizer", str(tok_dir),
                 "--no-progress"]) == 2
    assert "k.jsonl line 2: record has neither 'text' nor 'messages' (keys: ['body'])" in capsys.readouterr().err
    write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert main(["tokenize", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "o3"), "--tokenizer", str(tok_dir),
                 "--no-progress"]) == 2
    assert "c.jsonl line 1: conversation has no assistant turn" in capsys.readouterr().err
    assert main(["tokenize", str(bad), "-o", str(tmp_path / "o4"), "--tokenizer", "org/model", "--no-progress"]) == 2
    assert "not a local folder; seqpack never downloads" in capsys.readouterr().err
