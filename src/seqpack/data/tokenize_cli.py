"""``seqpack tokenize``: JSONL (text or chat), parquet, or ``datasets`` folders -> an ftdp training folder.

    seqpack tokenize data/raw -o data/tokenized --tokenizer ./my_tokenizer
    seqpack tokenize chats.jsonl -o data/tokenized --type sft          # -> data/tokenized/sft/chats.bin

Each input file becomes one ``.bin`` (+ ``.bin.meta``) at the same relative path under the output folder; a
folder input mirrors its tree (so per-type subfolders stay per-type). Text records get ``[bos] + ids + [eos]``
with loss everywhere; chat records (``messages``) are rendered with the tokenizer's chat template and only
assistant tokens carry loss (the others are written negated, the ftdp convention). Nothing is downloaded: the
tokenizer is a local path (``AutoTokenizer.from_pretrained(path)``) or, by default, the embedded corpus tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..cli_types import non_negative_int
from .check import length_stats
from .corpus import load_tokenizer
from .ftdp import META_SUFFIX, FtdpWriter
from .sources import encode_chat, encode_text, find_inputs, iter_records, record_kind


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help=".jsonl/.json/.parquet files, datasets save_to_disk folders, or "
                                                  "folders of them")
    parser.add_argument("-o", "--output", required=True, help="output ftdp folder")
    parser.add_argument("--tokenizer", default=None,
                        help="local tokenizer folder (default: the embedded stdlib BPE tokenizer)")
    parser.add_argument("--type", default="", help="subfolder (data type) under the output folder")
    parser.add_argument("--text-key", default="text", help="field holding plain text (default: text)")
    parser.add_argument("--messages-key", default="messages", help="field holding a chat (default: messages)")
    parser.add_argument("--split", default=None, help="split of a DatasetDict folder (default: train)")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True,
                        help="prepend the bos token to text records when the tokenizer has one (default: on)")
    parser.add_argument("--eos", action=argparse.BooleanOptionalAction, default=True,
                        help="append the eos token to text records (default: on)")
    parser.add_argument("--max-length", type=non_negative_int, default=0,
                        help="truncate documents to this many tokens (0: off)")
    parser.add_argument("--meta-dtype", choices=("int32", "int64"), default="int32",
                        help="dtype of .bin.meta (int32 like InternEvo, int64 for files > 2 GiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def tokenize_inputs(inputs, output, tokenizer, *, type_="", text_key="text", messages_key="messages", split=None,
                    bos=True, eos=True, max_length=0, meta_dtype="int32", progress=True) -> dict:
    """Tokenize every input into ``output`` (see the module docstring). Returns the summary dict: files,
    documents, tokens, loss_tokens, chat/text document counts, length percentiles. All-or-nothing: the files are
    written into a staging folder and moved into ``output`` only when every input is tokenized."""
    jobs = [(src, rel) for path in inputs for src, rel in find_inputs(path)]
    out_root = Path(output) / type_ if type_ else Path(output)
    made = [p for p in (out_root, *out_root.parents) if not p.exists()]  # removed again if nothing is written
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".seqpack-tokenize-", dir=out_root))  # all files, or none of them
    try:
        try:
            summary = _tokenize_jobs(jobs, out_root, staging, tokenizer, text_key, messages_key, split, bos, eos,
                                     max_length, meta_dtype, progress)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            for folder in made:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        for written in summary["files"]:  # every input tokenized: move the files into place
            rel = Path(written).relative_to(out_root)
            for suffix in ("", META_SUFFIX):
                (out_root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / f"{rel}{suffix}", out_root / f"{rel}{suffix}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _tokenize_jobs(jobs, out_root, staging, tokenizer, text_key, messages_key, split, bos, eos, max_length,
                   meta_dtype, progress) -> dict:
    from tqdm.auto import tqdm

    lengths, loss_tokens, kinds, written = [], 0, {"text": 0, "chat": 0}, []
    bar = tqdm(total=None, unit=" docs", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for src, rel in jobs:
        target = out_root / f"{rel}.bin"
        bar.set_description(str(src)[-40:])
        with FtdpWriter(staging / f"{rel}.bin", meta_dtype=np.dtype(meta_dtype)) as writer:
            for where, record in iter_records(src, split):
                kind = record_kind(record, where, text_key, messages_key)
                if kind == "chat":
                    ids, mask = encode_chat(tokenizer, record[messages_key], where)
                else:
                    ids, mask = encode_text(tokenizer, record[text_key], where, bos, eos)
                if max_length:
                    ids, mask = ids[:max_length], mask[:max_length]
                if not ids:
                    continue
                writer.add(ids, mask)
                kinds[kind] += 1
                lengths.append(len(ids))
                loss_tokens += sum(1 for t, m in zip(ids, mask) if m and t > 0)
                bar.update(1)
        written.append(str(target))
    bar.close()
    return dict(files=written, documents=len(lengths), tokens=int(sum(lengths)), loss_tokens=loss_tokens,
                text_documents=kinds["text"], chat_documents=kinds["chat"], length=length_stats(lengths))


def format_summary(s: dict, seconds: float) -> str:
    L = s["length"]
    return (f"wrote {len(s['files'])} ftdp files: {s['documents']} documents ({s['text_documents']} text, "
            f"{s['chat_documents']} chat), {s['tokens']} tokens ({s['loss_tokens']} with loss) in {seconds:.1f} s\n"
            f"document length: min {L['min']}  p50 {L['p50']}  p90 {L['p90']}  p99 {L['p99']}"
            f"  max {L['max']}")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        summary = tokenize_inputs(args.inputs, args.output, tokenizer, type_=args.type, text_key=args.text_key,
                                  messages_key=args.messages_key, split=args.split, bos=args.bos, eos=args.eos,
                                  max_length=args.max_length, meta_dtype=args.meta_dtype,
                                  progress=not args.no_progress)
    except ValueError as err:
        print(f"seqpack tokenize: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary, time.perf_counter() - t0))
    return 0
