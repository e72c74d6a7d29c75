"""Where each token of a packed row goes under 2D sequence parallelism (ring × Ulysses): a balanced chunk split.

Shape legend: T tokens of the padded row, C ring degree, U Ulysses degree, S = C × U, m chunks per ring rank
(``CHUNKS_PER_RANK``), K = m × C chunks of L = T / K tokens.

The row is padded (one dummy segment, labels -100, never an assert) to a multiple of ``m × C × U`` and cut into
K equal chunks. Each ring rank gets m of them — which ones is decided from the GLOBAL ``cu_seqlens`` (every rank
computes the same plan): chunks are taken from the most to the least attention work (the causal query-key pairs
of their queries) and each goes to the ring rank with the least work so far that still has room. A rank keeps its
chunks in row order (adjacent ones merged into one range); inside its Ulysses group those T/C tokens are cut into
U contiguous slices. The logical SP rank is ``c × U + u``. With C = 1 this is the contiguous split of
:func:`seqpack.parallel.shard_batch`.

Why not zigzag (rank c holds chunks c and 2C-1-c, as ring-flash-attention and InternEvo split unpacked rows):
zigzag balances ONE causal document filling the row. A packed row's work sits in its long documents (quadratic
in length), wherever they happen to lie, and zigzag ignores that: on log-normal documents (median 400 / 4000 /
32000 tokens, T = 32K and 128K, C = 2..8, 8 rows each) its per-rank work is 15-114 % above the mean on average
(up to 340 %), a contiguous split 12-146 %. The balanced split above with m = 16 stays at 0.0-0.8 % on average
and at most 1.5 % on the same rows (m = 2 / 4 / 8: up to 148 / 110 / 18 %): each rank's work is the sum over its
own queries (keys travel, queries stay), so it is known before any attention runs. The price is padding of at
most m × C × U - 1 tokens and more, smaller blocks per ring step; nothing else changes (equal shard sizes keep
the all-to-alls and the ring buffers uniform). :func:`attention_work` measures it (``seqpack bench sp``).

    >>> ring_chunks((0, 64), ring=2, ring_rank=0)[:2]   # one document: 32 chunks of 2 tokens, 16 per rank
    ((0, 2), (6, 10))
    >>> [sum(b - a for a, b in ring_chunks((0, 64), 2, c)) for c in range(2)]
    [32, 32]
"""

from __future__ import annotations

import bisect
import functools

import torch

CHUNKS_PER_RANK = 16


def split_multiple(ring: int, ulysses: int) -> int:
    """The row length must be a multiple of this: S for a plain Ulysses split, m × C × U with a ring."""
    return ulysses if ring == 1 else CHUNKS_PER_RANK * ring * ulysses


def _pairs(n0: int, n1: int, length: int | None = None) -> int:
    """Keys seen by queries at document positions n0 .. n1-1: sum of (p + 1) (causal), or (n1 - n0) x the
    document ``length`` (bidirectional: every query sees the whole document)."""
    if length is not None:
        return (n1 - n0) * length
    return (n1 * (n1 + 1) - n0 * (n0 + 1)) // 2


def chunk_work(cu: tuple[int, ...], num_chunks: int, causal: bool = True) -> list[int]:
    """Query-key pairs (causal, or bidirectional within documents) of the queries of each of ``num_chunks``
    equal chunks of the row."""
    T = cu[-1]
    L = T // num_chunks
    work = []
    for i in range(num_chunks):
        a, b = i * L, (i + 1) * L
        total, d = 0, bisect.bisect_right(cu, a) - 1
        while d < len(cu) - 1 and cu[d] < b:
            total += _pairs(max(cu[d], a) - cu[d], min(cu[d + 1], b) - cu[d],
                            None if causal else cu[d + 1] - cu[d])
            d += 1
        work.append(total)
    return work


@functools.lru_cache(maxsize=64)
def assignment(cu: tuple[int, ...], ring: int, causal: bool = True) -> tuple[tuple[int, ...], ...]:
    """The chunk indices each ring rank holds (sorted), balanced by attention work (module docstring)."""
    m = CHUNKS_PER_RANK
    work = chunk_work(cu, m * ring, causal)
    load, owned = [0] * ring, [[] for _ in range(ring)]
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        r = min((r for r in range(ring) if len(owned[r]) < m), key=lambda r: (load[r], r))
        load[r] += work[i]
        owned[r].append(i)
    return tuple(tuple(sorted(o)) for o in owned)


@functools.lru_cache(maxsize=256)
def ring_chunks(cu: tuple[int, ...], ring: int, ring_rank: int, causal: bool = True) -> tuple[tuple[int, int], ...]:
    """The global [start, end) ranges ring rank c holds, in local (row) order, adjacent chunks merged;
    ``causal=False``: balanced for bidirectional attention within documents."""
    T = cu[-1]
    if ring == 1:
        return ((0, T),)
    if T % (CHUNKS_PER_RANK * ring):
        raise ValueError(f"row of {T} tokens is not a multiple of {CHUNKS_PER_RANK * ring} (ring={ring}); pad it "
                         "with seqpack.parallel.pad_to_multiple first")
    L = T // (CHUNKS_PER_RANK * ring)
    ranges: list[list[int]] = []
    for i in assignment(tuple(cu), ring, causal)[ring_rank]:
        if ranges and ranges[-1][1] == i * L:
            ranges[-1][1] += L
        else:
            ranges.append([i * L, (i + 1) * L])
    return tuple(tuple(r) for r in ranges)


def split_positions(cu, ring: int, ulysses: int, ring_rank: int, ulysses_rank: int = 0,
                    causal: bool = True) -> torch.Tensor:
    """Global token positions [T/S] int64 of SP rank (ring_rank, ulysses_rank), in the order the rank holds them;
    ``cu`` the boundaries of the padded row (list, tuple or tensor); ``causal=False``: the split balanced for
    bidirectional attention."""
    cu = tuple(cu.tolist() if isinstance(cu, torch.Tensor) else cu)
    T = cu[-1]
    if T % split_multiple(ring, ulysses):
        raise ValueError(f"row of {T} tokens is not a multiple of {split_multiple(ring, ulysses)} (ring={ring}, "
                         f"ulysses={ulysses}); pad it with seqpack.parallel.pad_to_multiple first")
    ring_tokens = torch.cat([torch.arange(a, b) for a, b in ring_chunks(cu, ring, ring_rank, causal)])  # [T/C]
    size = ring_tokens.numel() // ulysses
    return ring_tokens[ulysses_rank * size:(ulysses_rank + 1) * size]


def attention_work(cu, ring: int, zigzag: bool = False, causal: bool = True) -> list[int]:
    """Causal (``causal=False``: bidirectional) query-key pairs (∝ attention FLOPs) each ring rank computes on a
    row with boundaries ``cu`` (T a multiple of m × C); ``zigzag=True``: under the zigzag split instead.

        >>> attention_work((0, 64), ring=2), attention_work((0, 64), ring=2, zigzag=True)
        ([1040, 1040], [1040, 1040])
    """
    cu = tuple(cu)
    if zigzag:
        work = chunk_work(cu, 2 * ring, causal)
        return [work[c] + work[2 * ring - 1 - c] for c in range(ring)]
    work = chunk_work(cu, CHUNKS_PER_RANK * ring, causal)
    return [sum(work[i] for i in owned) for owned in assignment(cu, ring, causal)]


def imbalance(work: list[int]) -> float:
    """max / mean - 1 of per-rank work (0 = perfectly balanced)."""
    mean = sum(work) / len(work)
    return max(work) / mean - 1 if mean else 0.0


class SplitPlan:
    """Degrees of one SP group: ``ring`` × ``ulysses`` ranks; the logical SP rank is ``ring_rank * ulysses +
    ulysses_rank``. ``causal=False``: the ring's chunks are balanced for bidirectional attention (Flux)."""

    def __init__(self, ring: int = 1, ulysses: int = 1, causal: bool = True):
        self.ring, self.ulysses, self.causal = ring, ulysses, causal

    @property
    def multiple(self) -> int:
        return split_multiple(self.ring, self.ulysses)

    @property
    def size(self) -> int:
        """S, the ranks of the SP group."""
        return self.ring * self.ulysses

    def positions(self, cu, sp_rank: int) -> torch.Tensor:
        """Global positions [T/S] of logical SP rank ``sp_rank`` in a padded row with boundaries ``cu``."""
        return split_positions(cu, self.ring, self.ulysses, *divmod(sp_rank, self.ulysses), causal=self.causal)

    def cut(self, cu, sp_rank: int, device=None) -> slice | torch.Tensor:
        """The tokens of a padded row that logical SP rank ``sp_rank`` holds, as an index of the row's token
        dimension (``x[:, cut]``): a slice of T/S tokens without a ring (a view), else :meth:`positions`."""
        if self.ring == 1:
            T = int(cu[-1])
            if T % self.ulysses:
                raise ValueError(f"row of {T} tokens is not a multiple of sp={self.ulysses}; pad it with "
                                 "seqpack.parallel.pad_to_multiple first")
            size = T // self.ulysses
            return slice(sp_rank * size, (sp_rank + 1) * size)
        return self.positions(cu, sp_rank).to(device)
