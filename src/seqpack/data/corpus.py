"""The embedded default corpus: the running interpreter's standard-library ``.py`` sources, and a byte-level BPE
tokenizer trained on them locally with the ``tokenizers`` library. Nothing is downloaded.

Real code files have heavy-tailed lengths (a few dozen tokens to ~100K), which is what packing is about.

    >>> tok = default_tokenizer()                                  # trained once (~5 s), then cached on disk
    >>> docs = default_token_docs(tok, limit_docs=4)               # list[list[int]], eos appended to each
    >>> docs[0][-1] == tok.eos_token_id
    True

The cache lives in ``$SEQPACK_CACHE`` (default ``~/.cache/seqpack``); every entry is keyed by a fingerprint of the
stdlib file list, so a different interpreter gets its own tokenizer. Entries are written atomically (tmp + rename).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
from functools import lru_cache
from pathlib import Path

VOCAB_SIZE = 4096
TRAIN_BYTES = 3_000_000  # tokenizer trained on an evenly spaced subset of files of about this size (~10 s on 2 cores)
SPECIAL_TOKENS = dict(pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|endoftext|>")  # ids 0, 1, 2
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]  # ids 3, 4
# ChatML; assistant content is wrapped in {% generation %} so `return_assistant_tokens_mask` also works
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_FORMAT_VERSION = "2"
# third-party packages, and the test suites (2/3 of the bytes; leaving them out keeps the first tokenization ~10 s)
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


def cache_dir() -> Path:
    """``$SEQPACK_CACHE`` or ``~/.cache/seqpack`` (created on demand)."""
    path = Path(os.environ.get("SEQPACK_CACHE") or Path.home() / ".cache" / "seqpack")
    path.mkdir(parents=True, exist_ok=True)
    return path


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """Sorted ``.py`` files of the running interpreter's standard library (without site-packages and the test
    suites), only those that decode as UTF-8 and are not empty."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).parts
        if not path.is_file() or SKIP_DIRS.intersection(rel[:-1]):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            files.append(path)
    return tuple(files)


@lru_cache(maxsize=1)
def corpus_fingerprint() -> str:
    """Short hash of (python version, relative path, size) of every corpus file: the cache key."""
    root = Path(sysconfig.get_paths()["stdlib"])
    h = hashlib.sha1(f"{_FORMAT_VERSION}|{sys.version_info[:2]}|{VOCAB_SIZE}|{TRAIN_BYTES}".encode())
    for path in stdlib_files():
        h.update(f"{path.relative_to(root).as_posix()}:{path.stat().st_size}\n".encode())
    return f"py{sys.version_info[0]}{sys.version_info[1]}-{h.hexdigest()[:12]}"


def default_documents(limit_bytes: int | None = None) -> list[str]:
    """The stdlib source files as strings, in sorted path order. ``limit_bytes`` stops after the file that reaches
    that many UTF-8 bytes in total (deterministic prefix of the full list)."""
    docs, total = [], 0
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8")
        docs.append(text)
        total += len(text.encode("utf-8"))
        if limit_bytes is not None and total >= limit_bytes:
            break
    return docs


def _training_texts() -> list[str]:
    """Evenly spaced files (every k-th in sorted order) totalling about TRAIN_BYTES, so every package is seen."""
    files = stdlib_files()
    total = sum(p.stat().st_size for p in files)
    step = max(1, round(total / TRAIN_BYTES))
    return [p.read_text(encoding="utf-8") for p in files[::step]]


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE on ``texts``; returns a ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos
    (ids 0/1/2), ChatML tokens (3/4) and a ChatML chat template. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS.values(), *CHAT_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=CHAT_TOKENS,
                                   clean_up_tokenization_spaces=False, model_max_length=1 << 30, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def default_tokenizer():
    """The corpus tokenizer (byte-level BPE, vocab 4096, pad/bos/eos = 0/1/2, ChatML chat template).

    Trained on first use from about 3 MB of stdlib sources and saved under ``cache_dir()/tokenizer-<fingerprint>``;
    later calls load it from there."""
    from transformers import PreTrainedTokenizerFast

    target = cache_dir() / f"tokenizer-{corpus_fingerprint()}"
    build_once(target, lambda tmp: train_tokenizer(_training_texts()).save_pretrained(tmp))
    return PreTrainedTokenizerFast.from_pretrained(target)


def build_once(target: Path, build) -> Path:
    """Create the cache directory ``target`` with ``build(tmp_dir)`` unless it exists. Concurrent processes (e.g. the
    ranks of one job) take a file lock, so one builds and the others wait; the result appears atomically."""
    if target.is_dir():
        return target
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                build(tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_token_docs(tokenizer=None, limit_docs: int | None = None) -> list[list[int]]:
    """Every corpus file tokenized (no bos), with ``tokenizer.eos_token_id`` appended. ``limit_docs`` keeps the
    first that many files (sorted order)."""
    tokenizer = tokenizer or default_tokenizer()
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token; set tokenizer.eos_token")
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files()[:limit_docs]]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: ~30 % faster than __call__
    if backend is not None:
        encoded = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids + [tokenizer.eos_token_id] for ids in encoded]


def tokenizer_fingerprint(tokenizer) -> str:
    """Short hash of a tokenizer's full definition (the Rust tokenizer JSON, else the vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def default_corpus_folder(tokenizer=None, max_docs: int | None = None) -> Path:
    """The corpus as an ftdp training folder (``<cache>/corpus-.../stdlib/python.bin``), built on first use from
    ``default_token_docs(tokenizer, max_docs)`` and published atomically. Keyed by corpus, tokenizer and max_docs."""
    from .ftdp import write_ftdp

    tokenizer = tokenizer or default_tokenizer()
    suffix = "all" if max_docs is None else f"first{max_docs}"
    target = cache_dir() / f"corpus-{corpus_fingerprint()}-{tokenizer_fingerprint(tokenizer)}-{suffix}"
    build_once(target, lambda tmp: write_ftdp(tmp / "stdlib" / "python.bin", default_token_docs(tokenizer, max_docs),
                                              meta_dtype="int64"))
    return target
