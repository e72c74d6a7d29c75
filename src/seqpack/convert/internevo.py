"""InternEvo checkpoint folders: ``model_tp{t}_pp{p}.pt`` shards plus ``model_config.pt``.

A folder saved by InternEvo also holds optimizer, sampler, scheduler and context files; only the model files are
read. ``model_config.pt`` is InternEvo's ``gpc.config.model``, pickled as ``internlm...Config`` (a ``dict``
subclass): it is unpickled with ``weights_only=True`` and that one class allowed, so no code from the file runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .layouts import merge_pp

SHARD_RE = re.compile(r"^model_tp(\d+)_pp(\d+)\.pt$")
UNSUPPORTED = [(re.compile(r"^model_wp\d+_pp\d+\.pt$"), "ISP weight-parallel (model_wp*) checkpoints"),
               (re.compile(r"^model_tp\d+_pp\d+_dp\d+\.pt$"), "FSDP (model_tp*_pp*_dp*) checkpoints"),
               (re.compile(r"^model_moe_layer.*\.pt$"), "MoE expert checkpoints")]


# InternEvo's ``Config`` is a plain dict subclass: read it as a dict
_CONFIG_AS_DICT = (dict, "internlm.core.context.parallel_context.Config")


def _load(path: Path):
    try:
        with torch.serialization.safe_globals([_CONFIG_AS_DICT]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; report the file either way
        raise ValueError(f"{path}: cannot be read as a tensor/dict checkpoint ({type(exc).__name__}: {exc})") from exc


def read_config(folder: Path) -> dict:
    path = folder / "model_config.pt"
    if not path.is_file():
        raise ValueError(f"{folder}: no model_config.pt; an InternEvo checkpoint folder holds model_config.pt and "
                         "model_tp{t}_pp{p}.pt files")
    cfg = _load(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a dict of model settings, got {type(cfg).__name__}")
    return cfg


def shard_grid(folder: Path) -> tuple[int, int]:
    """(tp, pp) of the folder's ``model_tp*_pp*.pt`` files; every file of the grid must exist."""
    if not folder.is_dir():
        raise ValueError(f"--src {folder} is not a folder")
    names = os.listdir(folder)
    for name in names:
        for pattern, what in UNSUPPORTED:
            if pattern.match(name):
                raise ValueError(f"{folder / name}: {what} are not supported; save with tensor parallel "
                                 "(mtp/msp/fsp) or convert with InternEvo's universal converter first")
    found = {(int(m.group(1)), int(m.group(2))) for n in names if (m := SHARD_RE.match(n))}
    if not found:
        raise ValueError(f"{folder}: no model_tp{{t}}_pp{{p}}.pt files")
    tp = max(t for t, _ in found) + 1
    pp = max(p for _, p in found) + 1
    missing = [f"model_tp{t}_pp{p}.pt" for t in range(tp) for p in range(pp) if (t, p) not in found]
    if missing:
        raise ValueError(f"{folder}: missing shard file(s) {missing} of a tp={tp} x pp={pp} checkpoint")
    return tp, pp


def read_shards(folder: Path, normalize) -> tuple[int, int, list[dict[str, torch.Tensor]]]:
    """Load every shard, pass each through ``normalize(state, filename) -> state`` (key aliases, unknown-key
    checks), and join each tp rank's pipeline stages. Returns (tp, pp, [state of tp rank t])."""
    tp, pp = shard_grid(folder)
    per_rank = []
    for t in range(tp):
        stages, names = [], []
        for p in range(pp):
            name = f"model_tp{t}_pp{p}.pt"
            state = _load(folder / name)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{folder / name}: expected a state dict of tensors")
            stages.append(normalize(state, folder / name))
            names.append(str(folder / name))
        per_rank.append(merge_pp(stages, names))
    keys0 = set(per_rank[0])
    for t, state in enumerate(per_rank[1:], start=1):
        if set(state) != keys0:
            diff = sorted(set(state) ^ keys0)[:4]
            raise ValueError(f"{folder}: tp rank {t} and tp rank 0 hold different tensors (e.g. {diff}); the shard "
                             "files do not belong to one checkpoint")
    return tp, pp, per_rank


def write_folder(folder: Path, model_config: dict, grid: list[list[dict[str, torch.Tensor]]]) -> list[Path]:
    """Write ``grid[t][p]`` as ``model_tp{t}_pp{p}.pt`` and ``model_config.pt`` into ``folder`` (a fresh temp
    folder; :func:`seqpack.convert.atomic.staging` moves it into place)."""
    written = []
    for t, stages in enumerate(grid):
        for p, state in enumerate(stages):
            path = folder / f"model_tp{t}_pp{p}.pt"
            torch.save(state, path)
            written.append(path)
    torch.save(model_config, folder / "model_config.pt")
    return written


def holds_model(folder: Path) -> bool:
    return (folder / "model_config.pt").exists() or any(SHARD_RE.match(n) for n in os.listdir(folder))
