"""Tensor layouts of InternEvo checkpoints: tensor-parallel merge/split, pipeline stages, rotary permutation.

Legend: ``H`` hidden size, ``N``/``Nkv`` query/kv heads, ``D`` head dim, ``q = N/Nkv``, ``I`` intermediate size,
``V`` vocab size, ``tp``/``pp`` tensor/pipeline degrees, ``L`` layers.

InternEvo saves one state dict per (tp rank, pp stage). Within a stage the layer indices restart at 0
(``layers.0`` is the stage's first layer); stage ``p`` holds the layers ``partition_uniform`` gives it (later stages
get the remainder). A tensor is split across tp ranks in one of these ways (:class:`Split`):

========== ============================================== ==============================================
split      tensors                                        per-rank shard of a ``[rows, cols]`` tensor
========== ============================================== ==============================================
COL        wqkv (InternLM2, group-major), w1, w3 (up),     ``rows/tp`` contiguous rows (``chunk(tp, 0)``)
           output/head, column biases
ROW        wo/out_proj, down projection                   ``cols/tp`` contiguous columns (``chunk(tp, 1)``)
REPLICATED norms, row-parallel biases                     the whole tensor (all ranks must agree)
EMBED      token embedding                                ``chunk(tp, 1)`` if embed_split_hidden else dim 0
QKV3       InternLM Wqkv ``[3·N·D, H]`` (q; k; v blocks)    ``[3, N·D/tp, H]`` rows of each block, flattened
========== ============================================== ==============================================

InternLM2's ``wqkv`` is ordered group-major: ``[g0: q_0..q_{q-1}, k, v | g1: ...]`` with ``Nkv`` groups of
``(q+2)·D`` rows, so a plain row chunk gives each rank ``Nkv/tp`` whole groups and the matching contiguous range
of ``wo``'s input columns; that is why ``Nkv % tp == 0`` is required.
"""

from __future__ import annotations

import enum
import re

import torch

LAYER_RE = re.compile(r"^(layers|blocks)\.(\d+)\.")


class Split(enum.Enum):
    COL = "col"
    ROW = "row"
    REPLICATED = "replicated"
    EMBED = "embed"
    QKV3 = "qkv3"


def _dim(split: Split, embed_split_hidden: bool) -> int:
    if split is Split.EMBED:
        return 1 if embed_split_hidden else 0
    return {Split.COL: 0, Split.ROW: 1, Split.QKV3: 1}[split]


def merge_tp(name: str, shards: list[torch.Tensor], split: Split, embed_split_hidden: bool = True) -> torch.Tensor:
    """Join the ``tp`` shards of one tensor (see the table in the module docstring).

    >>> merge_tp("w1", [torch.zeros(2, 4), torch.ones(2, 4)], Split.COL).shape
    torch.Size([4, 4])
    """
    if split is Split.REPLICATED:
        for rank, t in enumerate(shards[1:], start=1):
            if t.shape != shards[0].shape or not torch.equal(t, shards[0]):
                raise ValueError(
                    f"tensor {name!r} must be identical on every tp rank but tp rank {rank} differs from rank 0 "
                    f"(shapes {tuple(t.shape)} vs {tuple(shards[0].shape)}): the shard files do not belong to one "
                    "checkpoint")
        return shards[0]
    if split is Split.QKV3:  # each shard: [3·X/tp, ...] -> [3, X/tp, ...]; join the X axis
        shards = [t.reshape(3, -1, *t.shape[1:]) for t in shards]
    dim = _dim(split, embed_split_hidden)
    for rank, t in enumerate(shards[1:], start=1):
        if t.shape != shards[0].shape:  # InternEvo splits evenly, so every rank's shard has the same shape
            raise ValueError(f"tensor {name!r}: tp rank {rank} has shape {tuple(t.shape)} but rank 0 has "
                             f"{tuple(shards[0].shape)}; the shard files do not belong to one checkpoint")
    merged = torch.cat(shards, dim=dim)
    if split is Split.QKV3:
        merged = merged.reshape(-1, *merged.shape[2:])
    return merged


def split_tp(name: str, tensor: torch.Tensor, split: Split, tp: int, embed_split_hidden: bool = True
             ) -> list[torch.Tensor]:
    """Inverse of :func:`merge_tp`: ``tp`` contiguous copies (never views, so ``torch.save`` stays small)."""
    if split is Split.REPLICATED:
        return [tensor.clone() for _ in range(tp)]
    dim = _dim(split, embed_split_hidden)
    t = tensor.reshape(3, -1, *tensor.shape[1:]) if split is Split.QKV3 else tensor
    if t.shape[dim] % tp:
        raise ValueError(f"cannot split {name!r} of shape {tuple(tensor.shape)} into {tp} tensor-parallel shards: "
                         f"dimension {dim} ({t.shape[dim]}) is not divisible by {tp}; choose another --tp_size")
    parts = t.chunk(tp, dim=dim)
    if split is Split.QKV3:
        parts = [p.reshape(-1, *p.shape[2:]) for p in parts]
    return [p.contiguous().clone() for p in parts]


def partition_uniform(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """InternEvo's layer ranges per pipeline stage (``num_chunks=1``): later stages take the remainder.

    >>> partition_uniform(5, 2)
    [(0, 2), (2, 5)]
    """
    if pp < 1 or num_layers < pp:
        raise ValueError(f"cannot place {num_layers} layers on {pp} pipeline stages; use --pp_size <= {num_layers}")
    size, left = num_layers // pp, pp - num_layers % pp
    bounds, start = [], 0
    for p in range(pp):
        end = start + size + (p >= left)
        bounds.append((start, end))
        start = end
    return bounds


def merge_pp(stages: list[dict[str, torch.Tensor]], where: list[str]) -> dict[str, torch.Tensor]:
    """Join one tp rank's pipeline stages, renumbering stage-local layer indices to global ones.

    ``where[p]`` names stage ``p``'s file for error messages. A stage's layer count is read from its keys
    (local indices must be 0..n-1), so any partition works, not only ``partition_uniform``.
    """
    merged: dict[str, torch.Tensor] = {}
    offset = 0
    for stage, fname in zip(stages, where, strict=True):
        local = sorted({int(m.group(2)) for k in stage if (m := LAYER_RE.match(k))})
        if local != list(range(len(local))):
            raise ValueError(f"{fname}: layer indices {local} are not 0..{len(local) - 1}; a pipeline stage file "
                             "must number its layers from 0")
        for key, tensor in stage.items():
            m = LAYER_RE.match(key)
            if m:
                key = f"{m.group(1)}.{int(m.group(2)) + offset}.{key[m.end():]}"
            if key in merged:
                raise ValueError(f"{fname}: {key!r} also appears in an earlier pipeline stage")
            merged[key] = tensor
        offset += len(local)
    return merged


def split_pp(state: dict[str, torch.Tensor], num_layers: int, pp: int, first_keys: set[str]
             ) -> list[dict[str, torch.Tensor]]:
    """Inverse of :func:`merge_pp` with ``partition_uniform`` stages; ``first_keys`` go to stage 0 (embedding),
    every other non-layer key (final norm, output head) to the last stage."""
    bounds = partition_uniform(num_layers, pp)
    stages: list[dict[str, torch.Tensor]] = [{} for _ in range(pp)]
    for key, tensor in state.items():
        m = LAYER_RE.match(key)
        if m is None:
            stages[0 if key in first_keys else pp - 1][key] = tensor
            continue
        layer = int(m.group(2))
        p = next(i for i, (s, e) in enumerate(bounds) if s <= layer < e)
        stages[p][f"{m.group(1)}.{layer - bounds[p][0]}.{key[m.end():]}"] = tensor
    return stages


def permute_rotary(w: torch.Tensor, head_dim: int, rotary_slots: list[bool], to_half: bool) -> torch.Tensor:
    """Reorder rows of q/k heads between the interleaved rotary layout (GPT-J pairs ``(2i, 2i+1)``, InternEvo
    ``qk_interleaved=True`` / ``adapt_hf=False``) and Hugging Face's rotate-half layout (pairs ``(i, i+D/2)``).

    ``w``: ``[S·D, ...]`` (weight or bias), viewed as ``S`` slots of ``D`` rows; ``rotary_slots[s]`` says whether
    slot ``s`` is a q or k head (v heads are left alone). ``to_half=True`` maps interleaved -> rotate-half
    (row order ``0, 2, 4, …, 1, 3, 5, …`` inside each head); ``False`` is the inverse.
    """
    slots = len(rotary_slots)
    if w.shape[0] != slots * head_dim:
        raise ValueError(f"rotary permutation: {w.shape[0]} rows is not {slots} heads x head_dim {head_dim}")
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    if not to_half:
        perm = torch.argsort(perm)
    heads = w.reshape(slots, head_dim, *w.shape[1:])  # [S, D, ...]
    mask = torch.tensor(rotary_slots)
    out = heads.clone()
    out[mask] = heads[mask][:, perm]
    return out.reshape(w.shape)
