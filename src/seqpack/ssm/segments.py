"""The documents of one packed row, as a state-space mixer needs them.

Shape legend: T tokens in the packed row, n documents, L a bucket's longest document, nb documents in a bucket,
C channels.

An SSM mixer carries two kinds of state along the sequence: the causal convolution's last K-1 inputs and the
selective scan's recurrent state. In a packed row both must restart at every ``cu_seqlens`` boundary. seqpack does
that two ways:

- **document rows** (any device): documents are grouped into buckets of similar length, right-padded to the
  bucket's longest and run as a batch of rows [nb, L, C] through the mixer's own, unmodified computation. A causal
  convolution and a scan never look forward, so right padding cannot change a real token's output: exact.
- **seq_idx** (CUDA kernels that take it): ``seq_idx[0, t]`` = index of the document of token t, int32, the
  convention of ``mamba_ssm`` and ``causal_conv1d``.

    >>> s = Segments.from_cu([0, 3, 4, 9])
    >>> s.seq_idx.tolist(), s.num_docs
    ([[0, 0, 0, 1, 2, 2, 2, 2, 2]], 3)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..batch import check_cu_seqlens, length_buckets, validate_packed


@dataclass
class Segments:
    """Document boundaries of one packed row.

    cu       host list [n+1], 0 .. T
    seq_idx  [1, T] int32, document index of each token (on the row's device)
    """

    cu: list[int]
    seq_idx: torch.Tensor
    _rows: list = field(default_factory=list, repr=False)  # cached (token index [nb, L], valid [nb, L]) per bucket

    @classmethod
    def from_cu(cls, cu: list[int], device=None) -> "Segments":
        lengths = torch.tensor([b - a for a, b in zip(cu, cu[1:])], device=device)
        seq_idx = torch.repeat_interleave(torch.arange(len(cu) - 1, dtype=torch.int32, device=device), lengths)
        return cls(cu=list(cu), seq_idx=seq_idx[None])

    @property
    def num_tokens(self) -> int:
        return self.cu[-1]

    @property
    def num_docs(self) -> int:
        return len(self.cu) - 1

    def rows(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per length bucket: token index [nb, L] into the row (pad slots repeat a real token) and valid [nb, L]."""
        if not self._rows:
            device = self.seq_idx.device
            starts, lengths = self.cu[:-1], [b - a for a, b in zip(self.cu, self.cu[1:])]
            for bucket in length_buckets(lengths):
                L = lengths[bucket[0]]
                first = torch.tensor([starts[i] for i in bucket], device=device)
                idx = (first[:, None] + torch.arange(L, device=device)).clamp_(max=self.num_tokens - 1)
                valid = torch.arange(L, device=device)[None, :] < torch.tensor([lengths[i] for i in bucket],
                                                                                device=device)[:, None]
                self._rows.append((idx, valid))
        return self._rows

    def per_document(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Run ``fn`` on the documents of ``x`` [1, T, C] as padded rows [nb, L, C] -> [nb, L, C'];
        returns [1, T, C'] (every token from its own document's row)."""
        outs, token_index = [], []
        for idx, valid in self.rows():
            rows = x[0][idx] * valid[..., None].to(x.dtype)  # [nb, L, C], padding zeroed
            outs.append(fn(rows)[valid])  # [sum l, C']
            token_index.append(idx[valid])
        token_index = torch.cat(token_index)
        inverse = torch.empty_like(token_index)
        inverse[token_index] = torch.arange(self.num_tokens, device=token_index.device)
        return torch.cat(outs)[inverse][None]


def segments_from_inputs(kwargs: dict, length: int, batch: int) -> Segments | None:
    """The documents of a packed forward call, or None when the input is not a packed row of several documents.

    Packed means ``cu_seq_lens_q`` (seqpack's ``PackedBatch.model_inputs()``), or — as transformers' own
    padding-free convention — ``position_ids`` restarting at 0 inside a row with no ``attention_mask``."""
    cu_tensor = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if cu_tensor is not None:
        if batch != 1:
            raise ValueError(f"packed metadata (cu_seq_lens_q) given with batch dimension {batch}; a packed batch "
                             "has one row of shape [1, T] (concatenate the rows)")
        cu = check_cu_seqlens(cu_tensor, length)
        if position_ids is not None:  # the model ignores them, but they must describe the same documents
            validate_packed(None, position_ids, cu_tensor)
        device = cu_tensor.device
    elif position_ids is not None and kwargs.get("attention_mask") is None and position_ids.shape[-1] > 1:
        restarts = (position_ids.reshape(-1, position_ids.shape[-1])[:, 1:] == 0).any(dim=1)
        if not bool(restarts.any()):
            return None
        if batch != 1:
            raise ValueError(f"position_ids restart inside rows of a batch of {batch}: packed documents must be one "
                             "row of shape [1, T]; pass seqpack.pack(docs).model_inputs()")
        starts = (position_ids.reshape(-1) == 0).nonzero().reshape(-1).tolist()
        cu = ([0] if starts[0] != 0 else []) + starts + [length]
        device = position_ids.device
    else:
        return None
    return Segments.from_cu(cu, device) if len(cu) > 2 else None
