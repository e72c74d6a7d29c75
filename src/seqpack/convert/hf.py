"""Hugging Face model folders: ``config.json`` plus safetensors (sharded with an index) or ``pytorch_model*.bin``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no config.json; --src must be a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: {exc.msg}") from exc


def weight_files(folder: Path, require_safetensors: bool = False) -> list[Path]:
    """The folder's weight files, from the index when there is one (a file it names must exist)."""
    folder = Path(folder)
    for index, single, kind in ((SAFE_INDEX, "model.safetensors", "safetensors"),
                                (BIN_INDEX, "pytorch_model.bin", "bin")):
        if kind == "bin" and require_safetensors:
            break
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text()).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
            if missing := [f for f in files if not (folder / f).is_file()]:
                raise ValueError(f"{folder / index} names missing shard file(s) {missing}")
            return [folder / f for f in files]
        if (folder / single).is_file():
            return [folder / single]
    what = "safetensors weights (--safetensors)" if require_safetensors else "model.safetensors / pytorch_model.bin"
    raise ValueError(f"{folder}: no {what} (with or without an index json)")


def read_state(folder: Path, require_safetensors: bool = False) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder, require_safetensors):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                part = {k: f.get_tensor(k) for k in f.keys()}
        else:
            part = torch.load(path, map_location="cpu", weights_only=True)
        if dup := sorted(set(part) & set(state)):
            raise ValueError(f"{path}: tensor(s) {dup[:4]} also appear in another shard")
        state.update(part)
    return state


def write_weights(folder: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[Path]:
    """Write ``state`` as safetensors: ``model.safetensors`` if it fits in one shard, else
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (transformers' layout; a tensor
    larger than the limit gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.fspath(folder / name), metadata={"format": "pt"})
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard}}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [folder / name for name in names]


def write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def holds_model(folder: Path) -> bool:
    return any((folder / n).exists() for n in ("config.json", "model.safetensors", SAFE_INDEX, "pytorch_model.bin",
                                               BIN_INDEX))
