"""Checksums of a checkpoint's files: ``SHA256SUMS``, written before the COMPLETE marker and checked on load.

The list has the format of coreutils' ``sha256sum``, so it can also be checked by hand::

    cd runs/x/checkpoints/step_00000200 && sha256sum -c SHA256SUMS

Why SHA-256 rather than CRC32: both catch flipped bytes and truncation, hashlib's SHA-256 runs at 1-2 GB/s per core
(OpenSSL, SHA-NI) — not the bottleneck next to the disk — and every machine can check the file with a standard tool.
The work is split over the ranks: when saving, each rank hashes the files it wrote; when loading, each rank checks
every W-th file; the results are gathered, so a checkpoint of W ranks costs about 1/W of its bytes per rank.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch.distributed as dist

MANIFEST = "SHA256SUMS"
_CHUNK = 1 << 22


class CorruptCheckpoint(ValueError):
    """A checkpoint marked complete whose files are missing, truncated or changed (the message names them)."""


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(obj) -> list:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _own_files(folder: Path, rank: int) -> list[str]:
    """The files of ``folder`` this rank hashes when saving: DCP's ``__{rank}_*.distcp`` and ``rank{rank}.pt``;
    rank 0 also every file no rank claims (``.metadata``, ``train_state.pt``, ...)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)

    def owner(name: str) -> int | None:
        if name.startswith("__") and name.endswith(".distcp"):
            return int(name[2:].split("_")[0])
        if name.startswith("rank") and name.endswith(".pt") and name[4:-3].isdigit():
            return int(name[4:-3])
        return None

    return [n for n in names if owner(n) == rank or (rank == 0 and owner(n) is None)]


def write_manifest(folder: Path) -> None:
    """Collective: every rank hashes its own files of ``folder``; rank 0 writes and fsyncs ``SHA256SUMS``."""
    from ..atomic import fsync

    folder = Path(folder)
    rank, _ = _rank_world()
    sums: dict[str, str] = {}
    for part in _gather({name: sha256(folder / name) for name in _own_files(folder, rank)}):
        sums.update(part)
    if rank == 0:
        path = folder / MANIFEST
        path.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
        fsync(path)


def read_manifest(folder: Path) -> dict[str, str] | None:
    """{file name: hex digest} of ``folder``'s ``SHA256SUMS``; None when it has none (older seqpack)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise CorruptCheckpoint(f"{path}, line {n}: not a sha256sum line ({line[:80]!r})")
        sums[name] = digest
    return sums


def verify_checkpoint(folder: Path) -> bool:
    """Collective: check every file of ``folder`` against its ``SHA256SUMS`` (each rank a share). Raises
    CorruptCheckpoint naming each missing or changed file; returns False when there is no list to check against."""
    folder = Path(folder)
    sums = read_manifest(folder)  # every rank reads the same list: a bad one raises on every rank
    if sums is None:
        return False
    rank, world = _rank_world()
    problems = []
    for name in sorted(sums)[rank::world]:
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256(path) != sums[name]:
            problems.append(f"{path} does not match its checksum ({os.path.getsize(path)} bytes; truncated or "
                            "changed after it was written)")
    problems = sorted(p for part in _gather(problems) for p in part)
    if problems:
        raise CorruptCheckpoint(f"checkpoint {folder} is damaged: " + "; ".join(problems))
    return True
