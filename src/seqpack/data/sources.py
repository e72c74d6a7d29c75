"""Raw data sources for ``seqpack tokenize``: JSONL, parquet and ``datasets`` folders saved with ``save_to_disk``,
and the encoders that turn a record into (token ids, loss mask).

A record is plain text (``{"text": ...}``) or a chat (``{"messages": [{"role": ..., "content": ...}, ...]}``);
chats are rendered with the tokenizer's own chat template and only assistant turns carry loss.

    >>> tok = default_tokenizer()                                                   # doctest: +SKIP
    >>> ids, mask = encode_chat(tok, [{"role": "user", "content": "hi"},
    ...                               {"role": "assistant", "content": "hello"}])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in DATASETS_MARKERS)


def find_inputs(path: str | os.PathLike) -> list[tuple[Path, str]]:
    """(input, output path relative to the output folder, without suffix) for a file, a ``datasets`` folder, or a
    folder tree of JSONL / parquet files / ``datasets`` folders (the tree is mirrored, e.g. per-type subfolders)."""
    root = Path(path)
    if root.is_file() or is_datasets_folder(root):
        return [(root, root.stem if root.is_file() else root.name)]
    if not root.is_dir():
        raise ValueError(f"input {root} does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        if is_datasets_folder(here) and here != root:
            found.append((here, here.relative_to(root).as_posix()))
            dirnames.clear()
            continue
        for name in sorted(filenames):
            p = here / name
            if p.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES:
                found.append((p, p.relative_to(root).with_suffix("").as_posix()))
    if not found:
        raise ValueError(f"no .jsonl/.json/.parquet files or datasets folders under {root}")
    return found


def iter_records(path: Path, split: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (where, record) — ``where`` names the file and line/row for error messages."""
    if is_datasets_folder(path):
        yield from _iter_datasets(path, split)
    elif path.suffix in JSONL_SUFFIXES:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path} line {n}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                                     f"{err.start + 1}); convert the file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
                                     ) from err
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {n}: invalid JSON ({err.msg} at column {err.colno}); "
                                     f"line starts with {line[:60]!r} (one JSON object per line expected)") from err
                if not isinstance(record, dict):
                    raise ValueError(f"{path} line {n}: expected one JSON object per line (JSON Lines), got a "
                                     f"{type(record).__name__}")
                yield f"{path} line {n}", record
    elif path.suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"{path} row {row}", record
    else:
        raise ValueError(f"{path}: unsupported input; use .jsonl/.json, .parquet or a datasets save_to_disk folder")


def _iter_datasets(path: Path, split: str | None) -> Iterator[tuple[str, dict]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else None)
        if split not in ds:
            raise ValueError(f"{path} is a DatasetDict with splits {list(ds)}; choose one with --split")
        ds = ds[split]
    for row, record in enumerate(ds, start=1):
        yield f"{path} row {row}", record


def record_kind(record: dict, where: str, text_key: str, messages_key: str) -> str:
    if messages_key in record and record[messages_key] is not None:
        return "chat"
    if text_key in record:
        return "text"
    raise ValueError(f"{where}: record has neither {text_key!r} nor {messages_key!r} (keys: {sorted(record)[:10]}); "
                     "set --text-key / --messages-key")


def encode_text(tokenizer, text, where: str, bos: bool, eos: bool) -> tuple[list[int], list[bool]]:
    """Plain text -> ([bos] + ids + [eos], all tokens with loss)."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: text must be a string, got {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if eos:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer has no eos token; pass --no-eos or set one (at {where})")
        ids = ids + [tokenizer.eos_token_id]
    return ids, [True] * len(ids)


def encode_chat(tokenizer, messages, where: str = "chat") -> tuple[list[int], list[bool]]:
    """Render ``messages`` with the tokenizer's chat template -> (ids, loss mask True on assistant turns only).

    Templates with ``{% generation %}`` blocks give the mask directly (``return_assistant_tokens_mask``); for others
    the assistant turn i is the tokens between rendering ``messages[:i]`` + generation prompt and ``messages[:i+1]``
    (which must be prefixes of the full rendering, else ValueError)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the tokenizer has no chat template; chat records need one (tokenizer_config.json "
                         "'chat_template' or chat_template.jinja)")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: conversation has no assistant turn, so no token would carry loss")
    if GENERATION_BLOCK.search(tokenizer.chat_template):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]

    def ids(msgs, gen=False):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(messages)
    mask = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, upto = ids(messages[:i], gen=True), ids(messages[: i + 1])
        if full[: len(upto)] != upto or upto[: len(head)] != head:
            raise ValueError(f"{where}: the chat template does not render turn {i} as a prefix of the conversation, "
                             "so assistant tokens cannot be located; add {% generation %} markers to the template")
        mask[len(head): len(upto)] = [True] * (len(upto) - len(head))
    return full, mask
