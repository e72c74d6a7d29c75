"""All-or-nothing output folders: write into a temporary folder next to the target, then swap it in."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file or folder entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def folder_swap(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``. On success its files are fsynced and it replaces
    ``target`` (an existing ``target`` is moved aside first and restored if the swap fails); on any error the
    temporary folder is deleted and ``target`` is untouched. Readers never see a half-written ``target``. The
    folder gets the permissions of an ordinary ``mkdir`` (the user's umask), not mkdtemp's owner-only ones."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        mask = umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it owner-only; the result follows the user's umask
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():  # so do the files (some writers, e.g. safetensors', create them owner-only)
                os.chmod(p, 0o666 & ~mask)
                fsync(p)
            elif p.is_dir():
                os.chmod(p, 0o777 & ~mask)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old / "x", target)
            raise
        fsync(target.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
