"""Where each token of a packed row goes under 2D sequence parallelism (ring × Ulysses): the zigzag split.

Shape legend: T tokens of the padded row, C ring degree, U Ulysses degree, S = C × U, L = T / (2C) chunk length.

The row is padded (one dummy segment, labels -100, never an assert) to a multiple of ``2 × C × U`` and cut into
2C chunks of L tokens. Ring rank c holds chunks ``c`` and ``2C - 1 - c`` (in that order, ``2L`` tokens); inside
its Ulysses group those 2L tokens are cut into U contiguous slices, one per Ulysses rank. The logical SP rank is
``c × U + u``. With C = 1 this is exactly the contiguous split of :func:`seqpack.parallel.shard_batch`.

Why zigzag on packed rows (and not a document-aware split): causal attention work of a chunk grows with how far
into its documents it lies. Pairing an early chunk with the mirrored late one gives every ring rank the same
work when one document fills the row (the worst case for a contiguous split: rank C-1 would do 2C-1 times the
work of rank 0), and when documents are short compared with a chunk the work of a chunk is close to
``L × mean document length / 2`` whatever its place, so zigzag is balanced there too. It needs nothing but T, so
the model, the loss and the data loader see an ordinary shard. A document-aware split would have to move
document boundaries between ranks (variable shard lengths, which the all-to-alls and FSDP dislike) to gain
little on top; :func:`attention_work` measures the imbalance (``seqpack bench sp`` reports it).

    >>> zigzag_positions(16, ring=2, ulysses=1, ring_rank=0).tolist()
    [0, 1, 2, 3, 12, 13, 14, 15]
    >>> zigzag_positions(16, ring=2, ulysses=2, ring_rank=1, ulysses_rank=1).tolist()
    [10, 11, 12, 13]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def split_multiple(ring: int, ulysses: int) -> int:
    """The row length must be a multiple of this: S for a plain Ulysses split, 2 × C × U with a ring."""
    return ulysses if ring == 1 else 2 * ring * ulysses


def ring_chunks(T: int, ring: int, ring_rank: int) -> tuple[tuple[int, int], ...]:
    """The global [start, end) ranges ring rank c holds, in local order: chunk c, then chunk 2C-1-c."""
    if ring == 1:
        return ((0, T),)
    L = T // (2 * ring)
    first, second = ring_rank, 2 * ring - 1 - ring_rank
    return (first * L, (first + 1) * L), (second * L, (second + 1) * L)


def zigzag_positions(T: int, ring: int, ulysses: int, ring_rank: int, ulysses_rank: int = 0) -> torch.Tensor:
    """Global token positions [T/S] int64 of SP rank (ring_rank, ulysses_rank), in the order the rank holds them."""
    if T % split_multiple(ring, ulysses):
        raise ValueError(f"row of {T} tokens is not a multiple of {split_multiple(ring, ulysses)} (ring={ring}, "
                         f"ulysses={ulysses}); pad it with seqpack.parallel.pad_to_multiple first")
    ring_tokens = torch.cat([torch.arange(a, b) for a, b in ring_chunks(T, ring, ring_rank)])  # [T/C]
    size = ring_tokens.numel() // ulysses
    return ring_tokens[ulysses_rank * size:(ulysses_rank + 1) * size]


@dataclass(frozen=True)
class SplitPlan:
    """Degrees of one SP group: ``ring`` × ``ulysses`` ranks; the logical SP rank is ``ring_rank * ulysses +
    ulysses_rank``."""

    ring: int = 1
    ulysses: int = 1

    @property
    def sp(self) -> int:
        return self.ring * self.ulysses

    @property
    def multiple(self) -> int:
        return split_multiple(self.ring, self.ulysses)

    def ranks(self, sp_rank: int) -> tuple[int, int]:
        """(ring_rank, ulysses_rank) of a logical SP rank."""
        return divmod(sp_rank, self.ulysses)

    def positions(self, T: int, sp_rank: int) -> torch.Tensor:
        """Global positions [T/S] of logical SP rank ``sp_rank`` in a padded row of T tokens."""
        return zigzag_positions(T, self.ring, self.ulysses, *self.ranks(sp_rank))


def causal_pairs(lengths: list[int]) -> int:
    """Query-key pairs of causal attention over documents of these lengths (the FLOPs unit)."""
    return sum(n * (n + 1) // 2 for n in lengths)


def attention_work(cu: list[int], ring: int, window: int | None = None) -> list[int]:
    """Causal (query, key) pairs each ring rank computes for a row with boundaries ``cu`` (T = cu[-1], a multiple
    of 2C): a query's work is the number of keys it sees, so this is proportional to the rank's attention FLOPs.

        >>> attention_work([0, 8], ring=2)   # one document: both ranks 18 of the 36 pairs
        [18, 18]
    """
    T = cu[-1]
    doc_start = torch.zeros(T, dtype=torch.long)
    for a, b in zip(cu, cu[1:]):
        doc_start[a:b] = a
    seen = torch.arange(T) - doc_start + 1  # keys visible to each query
    if window is not None:
        seen = seen.clamp(max=window)
    work = []
    for c in range(ring):
        work.append(int(sum(int(seen[a:b].sum()) for a, b in ring_chunks(T, ring, c))))
    return work


def imbalance(work: list[int]) -> float:
    """max / mean - 1 of per-rank work (0 = perfectly balanced)."""
    mean = sum(work) / len(work)
    return max(work) / mean - 1 if mean else 0.0
