"""InternEvo / XTuner "ftdp" tokenized files: read, write, validate.

One ``.bin`` file is JSON lines ``{"tokens": [...]}``; a **negative** id means "no loss on this token" (the input id is
``abs(t)``; like InternEvo, id 0 never carries loss). Next to it, ``<file>.bin.meta`` is a NumPy ``.npy`` array
``(N, 2)`` of (byte offset of line i, token count of line i), int32 (InternEvo's tool) or int64 (XTuner's).
A training folder holds ``.bin`` files, usually in per-type subfolders (``folder/<type>/.../*.bin``).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.bin")
    >>> write_ftdp(path, [[5, 6, 7], [8, 9]], loss_masks=[[True, True, True], [False, True]])
    >>> f = FtdpFile(path)
    >>> len(f), f.lengths.tolist(), f.raw(1).tolist()
    (2, [3, 2], [-8, 9])
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

META_SUFFIX = ".meta"
FULL_CHECK_BYTES = 1 << 30
# the shortest line that holds k tokens is {"tokens":[1,2,...,k]} = 2k + 12 bytes (k digits, k - 1 commas)
MIN_LINE_BYTES = 12
# the plain line form the fast parser reads: {"tokens": [JSON integers separated by "," or ", "]}
_WS = b" \t\n\r"  # JSON whitespace
_HEAD = re.compile(rb'[ \t\n\r]*\{[ \t\n\r]*"tokens"[ \t\n\r]*:[ \t\n\r]*\[')
_DIGIT, _MINUS, _COMMA, _SPACE, _OTHER = 0, 1, 2, 3, 4
_CLASS = np.full(256, _OTHER, np.int8)  # byte -> class
_CLASS[np.frombuffer(b"0123456789", np.uint8)], _CLASS[ord("-")], _CLASS[ord(",")] = _DIGIT, _MINUS, _COMMA
_CLASS[np.frombuffer(_WS, np.uint8)] = _SPACE
MAX_FAST_CHARS = 18  # characters between two commas: numbers of at most 18 digits always fit int64
FAST_MIN_BYTES = 8192  # NumPy's fixed cost only pays off for long lines (~1,500 tokens and more)


class FtdpError(ValueError):
    """A problem in an ftdp file. ``kind`` names the class of problem (``"meta"``: missing, unreadable, or not
    matching its .bin; ``"empty"``: a document without tokens; ``"utf8"``; ``"json"``: not an object with an
    integer list ``tokens``; ``"count"``: the meta's token count differs from the line; ``"vocab"``: an id outside
    the vocabulary); ``path`` the file and ``line`` the 1-based line (None for the whole file)."""

    def __init__(self, message: str, kind: str, path, line: int | None = None):
        super().__init__(message)
        self.kind, self.path, self.line = kind, None if path is None else Path(path), line


def to_raw(tokens: Sequence[int], loss_mask: Sequence[bool] | None = None) -> list[int]:
    """Token ids (>= 0) and an optional per-token loss mask -> signed ftdp ids (negative = no loss)."""
    if loss_mask is None:
        return [int(t) for t in tokens]
    if len(loss_mask) != len(tokens):
        raise ValueError(f"loss mask has {len(loss_mask)} entries but the document has {len(tokens)} tokens")
    return [int(t) if m else -int(t) for t, m in zip(tokens, loss_mask)]


def from_raw(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed ftdp ids [n] -> (input ids [n] int64, loss mask [n] bool = ``raw > 0``)."""
    raw = np.asarray(raw, dtype=np.int64)
    return np.abs(raw), raw > 0


class FtdpWriter:
    """Stream documents into ``path`` (a ``.bin``) and its ``.bin.meta``; both appear atomically on ``close()``.

        with FtdpWriter("out/type/part-000.bin") as w:
            w.add([1, 2, 3])                          # all tokens with loss
            w.add([4, 5], loss_mask=[False, True])    # written as [-4, 5]
    """

    def __init__(self, path: str | os.PathLike, meta_dtype=np.int32):
        self.path = Path(path)
        if self.path.suffix != ".bin":
            raise ValueError(f"ftdp files must end in .bin, got {self.path}")
        self.meta_dtype = np.dtype(meta_dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._f = open(self._tmp, "wb")
        self._offsets: list[int] = []
        self._lengths: list[int] = []
        self._pos = 0

    def add(self, tokens: Sequence[int], loss_mask: Sequence[bool] | None = None) -> None:
        raw = to_raw(tokens, loss_mask)
        if not raw:
            raise ValueError(f"{self.path}: refusing to write an empty document (line {len(self._lengths) + 1})")
        line = (json.dumps({"tokens": raw}) + "\n").encode("utf-8")
        self._offsets.append(self._pos)
        self._lengths.append(len(raw))
        self._f.write(line)
        self._pos += len(line)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self.meta_dtype == np.int32 and self._pos > np.iinfo(np.int32).max:
            raise ValueError(f"{self.path} is {self._pos} bytes, too large for an int32 meta; use meta_dtype=np.int64 "
                             "or write smaller shards")
        meta = np.stack([np.asarray(self._offsets, dtype=np.int64), np.asarray(self._lengths, dtype=np.int64)], axis=1)
        meta_tmp = self._tmp.with_name(self._tmp.name + ".meta.npy")
        with open(meta_tmp, "wb") as f:
            np.save(f, meta.reshape(-1, 2).astype(self.meta_dtype))
        os.replace(self._tmp, self.path)
        os.replace(meta_tmp, str(self.path) + META_SUFFIX)

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.abort() if exc_type else self.close()


def write_ftdp(path, docs: Iterable[Sequence[int]], loss_masks=None, meta_dtype=np.int32) -> None:
    """Write ``docs`` (token-id lists) and optional per-document loss masks to ``path`` (.bin + .bin.meta)."""
    docs = list(docs)
    masks = [None] * len(docs) if loss_masks is None else list(loss_masks)
    if len(masks) != len(docs):
        raise ValueError(f"{len(docs)} documents but {len(masks)} loss masks; give one mask per document")
    with FtdpWriter(path, meta_dtype) as w:
        for doc, mask in zip(docs, masks):
            w.add(doc, mask)


class FtdpFile:
    """One ``.bin`` + ``.bin.meta``, memory-mapped. The structure is validated on open (meta shape, offsets at line
    starts, one meta row per line for files up to 1 GiB); each document's token count is checked when it is read.

    offsets [N] int64  byte offset of line i
    lengths [N] int64  token count of line i (from the meta)
    """

    def __init__(self, path: str | os.PathLike, cache_docs: int = 64):
        self.path = Path(path)
        self.meta_path = Path(str(self.path) + META_SUFFIX)
        if not self.path.is_file():
            raise ValueError(f"ftdp file {self.path} does not exist")
        if not self.meta_path.is_file():
            raise FtdpError(f"{self.path}: meta file {self.meta_path} is missing; every .bin needs a .bin.meta "
                            "(re-create the folder with `seqpack tokenize` or seqpack.data.ftdp.write_ftdp)",
                            "meta", self.meta_path)
        try:
            meta = np.load(self.meta_path, allow_pickle=False)
        except Exception as err:  # numpy raises several types for a corrupt .npy
            raise FtdpError(f"{self.meta_path}: cannot read as a NumPy .npy array ({err})", "meta",
                            self.meta_path) from err
        if meta.ndim != 2 or meta.shape[1] < 2 or not np.issubdtype(meta.dtype, np.integer):
            raise FtdpError(f"{self.meta_path}: expected an integer array of shape (N, 2) = (byte offset, token "
                            f"count), got dtype {meta.dtype} shape {meta.shape}", "meta", self.meta_path)
        self.meta_dtype, self.meta_shape = meta.dtype, meta.shape
        self.offsets = meta[:, 0].astype(np.int64)
        self.lengths = meta[:, -1].astype(np.int64)
        self.size = self.path.stat().st_size
        self._mm = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_docs = cache_docs
        self._validate_structure()

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def _buffer(self) -> np.ndarray:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        return np.frombuffer(self._mm, dtype=np.uint8)

    def _validate_structure(self) -> None:
        """Meta against the .bin without parsing a line (cheap; runs on open, so at the start of training): offsets
        inside the file, increasing, at line starts; counts positive and each line long enough for its count; as
        many rows as lines (files up to 1 GiB; larger ones: nothing after the last row's line)."""
        n, where = len(self.offsets), f"{self.meta_path} (for {self.path})"
        if n == 0:
            return

        def fail(message: str, row: int | None, kind: str = "meta"):
            raise FtdpError(f"{where}{'' if row is None else f' row {row} (line {row + 1})'}{message}", kind,
                            self.path, None if row is None else row + 1)

        bad = np.flatnonzero((self.offsets < 0) | (self.offsets >= self.size))
        if bad.size:
            i = int(bad[0])
            fail(f": offset {self.offsets[i]} is outside the {self.size}-byte file", i)
        bad = np.flatnonzero(np.diff(self.offsets) <= 0)
        if bad.size:
            i = int(bad[0]) + 1
            fail(f": offset {self.offsets[i]} is not after the previous offset {self.offsets[i - 1]}; offsets must "
                 "be strictly increasing", i)
        if (self.lengths <= 0).any():
            i = int(np.flatnonzero(self.lengths <= 0)[0])
            fail(f": token count {self.lengths[i]} must be positive (an empty document); drop empty documents "
                 "when writing the file", i, "empty")
        buf = self._buffer()
        before = np.where(self.offsets > 0, buf[np.maximum(self.offsets - 1, 0)], ord("\n"))  # byte before each line
        if (before != ord("\n")).any() or self.offsets[0] != 0:
            i = 0 if self.offsets[0] != 0 else int(np.flatnonzero(before != ord("\n"))[0])
            fail(f": offset {self.offsets[i]} does not point at the start of a line of {self.path}; the meta does "
                 "not belong to this .bin — regenerate it", i)
        spans = np.diff(np.append(self.offsets, self.size))  # bytes of each row's line (newline included)
        short = np.flatnonzero(spans < 2 * self.lengths + MIN_LINE_BYTES)
        if short.size:
            i = int(short[0])
            fail(f": the meta says {self.lengths[i]} tokens but the line has only {spans[i]} bytes (at least "
                 f"{2 * self.lengths[i] + MIN_LINE_BYTES} needed); the meta is stale — regenerate it", i)
        if self.size <= FULL_CHECK_BYTES:  # counting lines reads the whole file: only for files up to 1 GiB
            lines = int(np.count_nonzero(buf == ord("\n"))) + (buf[-1] != ord("\n"))
            if lines != n:
                fail(f" has {n} rows but {self.path} has {lines} lines; the meta does not belong to this .bin — "
                     "regenerate it", None)
        else:  # the last row's line must run to the end of the file (mmap.find stops at the first newline)
            end = self._mm.find(b"\n", int(self.offsets[-1]))
            if 0 <= end < self.size - 1:
                fail(f": {self.path} has more lines after row {n - 1}'s line; the meta does not belong to this "
                     ".bin — regenerate it", None)

    def raw(self, i: int) -> np.ndarray:
        """Signed tokens of document (line) ``i`` as int64 [length]; a negative id means no loss."""
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        start = int(self.offsets[i])
        end = int(self.offsets[i + 1]) if i + 1 < len(self.offsets) else self.size
        line = bytes(self._buffer()[start:end])
        arr = parse_tokens(line, f"{self.path} line {i + 1} (byte {start})", self.path, i + 1)
        if arr.size != self.lengths[i]:
            raise FtdpError(f"{self.path} line {i + 1} (byte {start}): the meta says {self.lengths[i]} tokens but "
                            f"the line has {arr.size}; regenerate {self.meta_path}", "count", self.path, i + 1)
        self._cache[i] = arr
        if len(self._cache) > self._cache_docs:
            self._cache.popitem(last=False)
        return arr

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids [n] int64, loss mask [n] bool) of document ``i``."""
        return from_raw(self.raw(i))

    def __getstate__(self):
        return {**self.__dict__, "_mm": None, "_cache": OrderedDict()}


def parse_tokens(line: bytes, where: str, path=None, line_no: int | None = None) -> np.ndarray:
    """Signed ids [n] int64 of one ftdp line, exactly as ``json.loads(line)["tokens"]``. A line in the plain form
    ``{"tokens": [ints]}`` longer than ``FAST_MIN_BYTES`` is read by NumPy (1.3-1.7x faster); any other line
    (short, more keys, floats, big ints, malformed) goes through ``json.loads``. ``where`` starts the FtdpError
    message (kind utf8/json)."""
    fast = _parse_plain_line(line) if len(line) >= FAST_MIN_BYTES else None
    if fast is not None:
        return fast
    head = line[:80].decode("utf-8", "replace")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FtdpError(f"{where}: not UTF-8 ({err}); line starts with {head!r}", "utf8", path, line_no) from err
    try:
        tokens = json.loads(text)["tokens"]
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise TypeError("'tokens' is not a list of integers")
        return np.asarray(tokens, dtype=np.int64)
    except (ValueError, KeyError, TypeError, OverflowError) as err:
        raise FtdpError(f"{where}: not a JSON object with an integer list 'tokens' ({type(err).__name__}: {err}); "
                        f"line starts with {head!r}", "json", path, line_no) from err


def _parse_plain_line(line: bytes) -> np.ndarray | None:
    """Ids of a line that is exactly ``{"tokens": [i, j, ...]}`` (JSON integers; whitespace only after commas, as
    ``json.dumps`` writes), read by NumPy; None for any other line. The list is checked byte-wise, vectorised, so
    that NumPy reads exactly what ``json.loads`` would: only digits, commas, minus signs and whitespace after a
    comma; a minus only right before a digit; one comma between numbers; no leading zeros; at most 18 digits."""
    head = _HEAD.match(line)
    tail = line.rstrip(_WS)
    if head is None or not tail.endswith(b"}") or not tail[:-1].rstrip(_WS).endswith(b"]"):
        return None
    body = tail[:-1].rstrip(_WS)[head.end():-1].strip(_WS)
    if not body:
        return np.zeros(0, np.int64)
    chars = np.frombuffer(body, np.uint8)
    cls = _CLASS[chars]
    if cls.max() == _OTHER or cls[0] == _COMMA or cls[-1] != _DIGIT:
        return None
    a, b = cls[:-1], cls[1:]  # every pair of neighbouring bytes
    starts = np.concatenate([[True], a != _DIGIT])[:-1]  # a[i] begins a number (if it is a digit)
    bad = ((a == _DIGIT) & (b == _MINUS)) | ((a == _MINUS) & (b != _DIGIT)) | ((a == _COMMA) & (b == _COMMA)) \
        | ((b == _SPACE) & (a != _COMMA) & (a != _SPACE)) | ((a == _SPACE) & (b == _COMMA)) \
        | (starts & (chars[:-1] == ord("0")) & (b == _DIGIT))  # a leading zero
    commas = np.flatnonzero(cls == _COMMA)
    if bad.any() or np.diff(commas, prepend=-1, append=len(body)).max() > MAX_FAST_CHARS + 1:
        return None
    ids = np.fromstring(body, dtype=np.int64, sep=",")
    return ids if ids.size == commas.size + 1 else None


def check_ids(raw: np.ndarray, vocab_size: int, path, line_no: int) -> None:
    """FtdpError (kind ``"vocab"``) if an id of ``raw`` (signed ids of line ``line_no``) is >= ``vocab_size``."""
    top = int(np.abs(raw).max(initial=0))
    if top >= vocab_size:
        raise FtdpError(f"{path} line {line_no}: token id {top} >= the model's vocab_size {vocab_size}; the data was "
                        "tokenized with a different tokenizer", "vocab", path, line_no)


def list_bin_files(folder: str | os.PathLike, data_order_file: str | os.PathLike | None = None) -> list[str]:
    """Relative POSIX paths of the ``.bin`` files under ``folder``: walk order with directories and files sorted
    (the same order on every file system), or the order listed in ``data_order_file`` (one path per line, relative
    to ``folder``). InternEvo 0.5.2 sorts only the files of each directory and visits directories in the file
    system's order (its ``dirs.sort()`` runs after the walk is listed), so the two orders differ when a folder has
    several subfolders; pass a ``data_order_file`` to reproduce a given InternEvo run's order."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"train_folder {root} does not exist or is not a directory")
    if data_order_file is not None:
        if not Path(data_order_file).is_file():
            raise ValueError(f"data_order_file {str(data_order_file)!r} does not exist; give a text file listing "
                             f"the .bin files to use, one per line, relative to {root}")
        rels = []
        for n, line in enumerate(Path(data_order_file).read_text().splitlines(), start=1):
            rel = line.strip()
            if not rel or rel.startswith("#"):
                continue
            if not (root / rel).is_file():
                raise ValueError(f"{data_order_file} line {n}: {rel!r} is not a file under {root}")
            if not rel.endswith(".bin"):
                raise ValueError(f"{data_order_file} line {n}: {rel!r} is not a .bin file")
            rels.append(Path(rel).as_posix())
        if not rels:
            raise ValueError(f"data_order_file {data_order_file} lists no files")
        return rels
    rels = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rels += [Path(dirpath, f).relative_to(root).as_posix() for f in sorted(filenames) if f.endswith(".bin")]
    if not rels:
        raise ValueError(f"no .bin files under {root}; expected ftdp files (folder/<type>/*.bin + .bin.meta), "
                         "create them with `seqpack tokenize`")
    return rels


def file_type(rel: str) -> str:
    """Type of a file = its top-level subfolder (``"cn/part-0.bin"`` -> ``"cn"``); files at the root: ``""``."""
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else ""
