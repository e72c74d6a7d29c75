"""``seqpack data check FOLDER``: validate a whole ftdp folder before training, and print its statistics.

    seqpack data check data/tokenized --tokenizer ./my_tokenizer     # ids must be < len(tokenizer)
    seqpack data check data/tokenized --vocab-size 92544

Every ``.bin`` (in training order) is opened — which checks its ``.bin.meta`` against the file without parsing a
line: dtype int32/int64 and shape (N, 2), offsets at line starts, as many rows as lines, each line long enough for
its count (``seqpack train`` runs this part at startup, when it builds the loader) — and then every line is read:
UTF-8, a JSON object with an integer list ``tokens``, as many tokens as the meta says, ids below the vocabulary
size. The first problem stops the check with exit code 1 and ``[kind] FILE line N: ...`` (kinds: ``meta``,
``empty``, ``utf8``, ``json``, ``count``, ``vocab``; see :class:`~seqpack.data.ftdp.FtdpError`). A clean folder
prints, per type folder and in total: files, documents, tokens, loss tokens, and document length percentiles.

    >>> stats = check_folder("data/tokenized", vocab_size=92544)         # doctest: +SKIP
    >>> stats["(total)"]["documents"], stats["en"]["length"]["p50"]         # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..cli_types import positive_int
from .ftdp import FtdpError, FtdpFile, check_ids, file_type, list_bin_files

META_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))  # InternEvo's tool writes int32, XTuner's int64


def length_stats(lengths) -> dict:
    """Document lengths [n] -> ``{"min", "p50", "p90", "p99", "max"}`` (zeros when there are none)."""
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.size == 0:
        return dict(min=0, p50=0, p90=0, p99=0, max=0)
    return dict(min=int(lens.min()), **{f"p{q}": int(np.percentile(lens, q)) for q in (50, 90, 99)},
                max=int(lens.max()))


def open_checked(path: Path) -> FtdpFile:
    """``FtdpFile(path)`` (its meta checked against the file, no line parsed), plus the meta's dtype and shape as
    the tools write them: int32 or int64, exactly two columns."""
    f = FtdpFile(path)
    if f.meta_dtype not in META_DTYPES or f.meta_shape[1] != 2:
        raise FtdpError(f"{f.meta_path}: dtype {f.meta_dtype} shape {f.meta_shape}; ftdp metas are int32 or int64 "
                        "arrays of shape (N, 2) = (byte offset, token count) — regenerate it", "meta", f.meta_path)
    return f


def check_file(f: FtdpFile, vocab_size: int | None = None) -> tuple[np.ndarray, int]:
    """Read every line of ``f`` (raises FtdpError on the first bad one); returns (lengths [N], loss tokens)."""
    loss_tokens = 0
    for i in range(len(f)):
        raw = f.raw(i)  # UTF-8, JSON, token count against the meta
        if vocab_size is not None:
            check_ids(raw, vocab_size, f.path, i + 1)
        loss_tokens += int(np.count_nonzero(raw > 0))
    return f.lengths, loss_tokens


def check_folder(folder, vocab_size: int | None = None, data_order_file=None) -> dict:
    """Validate every ``.bin`` under ``folder`` (FtdpError on the first problem). Returns ``{type: stats}`` (type
    ``"."`` = files at the root) plus ``"(total)"``; stats = files, documents, tokens, loss_tokens, length (see
    :func:`length_stats`)."""
    rels = list_bin_files(folder, data_order_file)
    files = {rel: open_checked(Path(folder, rel)) for rel in rels}  # every meta first: the cheap part
    by_type: dict[str, dict] = {}
    for rel, f in files.items():
        lengths, loss = check_file(f, vocab_size)
        t = by_type.setdefault(file_type(rel) or ".", dict(files=0, lengths=[], loss_tokens=0))
        t["files"] += 1
        t["lengths"].append(lengths)
        t["loss_tokens"] += loss
    stats = {name: _summary(t["files"], t["lengths"], t["loss_tokens"]) for name, t in sorted(by_type.items())}
    stats["(total)"] = _summary(len(files), [x for t in by_type.values() for x in t["lengths"]],
                              sum(t["loss_tokens"] for t in by_type.values()))
    return stats


def _summary(files: int, lengths: list, loss_tokens: int) -> dict:
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    return dict(files=files, documents=int(lens.size), tokens=int(lens.sum()), loss_tokens=loss_tokens,
                length=length_stats(lens))


def format_stats(stats: dict) -> str:
    """A table: one row per type folder (``.`` = files at the root) and the total."""
    head = f"{'type':<16} {'files':>6} {'documents':>10} {'tokens':>13} {'loss tokens':>13}   length " \
           f"{'min':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>8}"
    rows = [head]
    for name, s in stats.items():
        L = s["length"]
        rows.append(f"{name:<16} {s['files']:>6} {s['documents']:>10} {s['tokens']:>13} {s['loss_tokens']:>13}"
                    f"          {L['min']:>6} {L['p50']:>7} {L['p90']:>7} {L['p99']:>7} {L['max']:>8}")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="validate an ftdp folder (every line) and print its statistics",
                           description="Validate every .bin and .bin.meta of an ftdp folder (meta against file, "
                           "UTF-8, JSON, token counts, empty documents, ids within the vocabulary) and print "
                           "documents, tokens, loss tokens and length percentiles per type folder. Exit code 1 "
                           "at the first problem, naming its kind, file and line.")
    check.add_argument("folder", help="ftdp training folder (FOLDER/<type>/.../*.bin + *.bin.meta)")
    vocab = check.add_mutually_exclusive_group()
    vocab.add_argument("--tokenizer", default=None, help="local tokenizer folder: ids must be < len(tokenizer)")
    vocab.add_argument("--vocab-size", type=positive_int, default=None, help="ids must be < this")
    check.add_argument("--data-order-file", default=None, help="read the files in this order (as training does)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        vocab_size = args.vocab_size
        if args.tokenizer is not None:
            from .corpus import load_tokenizer

            vocab_size = len(load_tokenizer(args.tokenizer))
        stats = check_folder(args.folder, vocab_size, args.data_order_file)
    except FtdpError as err:
        print(f"seqpack data check: [{err.kind}] {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # no folder, no .bin files, a bad data_order_file or tokenizer
        print(f"seqpack data check: error: {err}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    vocab = f", every id < {vocab_size}" if vocab_size is not None else \
        " (ids not checked: no --tokenizer/--vocab-size)"
    print(f"ok: {args.folder} is a valid ftdp folder{vocab}; checked in {time.perf_counter() - t0:.1f} s")
    return 0
