"""Packed rows of Flux samples of different image sizes (NaViT-style), and their sequence-parallel shards.

Shape legend: n samples in the row, Lt_i / Li_i text / image tokens of sample i, Tj joint tokens of the (padded)
row, S SP degree, Cin patchified image channels, Dt text-embedding width, P pooled width.

Flux's joint attention runs over ``[text tokens; image tokens]`` of one sample. A packed row lays the samples
end to end in that *joint* order::

    joint row:  [txt_0 | img_0 | txt_1 | img_1 | ... | txt_{n-1} | img_{n-1} | pad]   cu_seqlens = segment ends

and keeps two *streams* for the double-stream blocks, which use separate weights for text and image tokens::

    text stream:  [txt_0 | txt_1 | ...]            image stream:  [img_0 | img_1 | ... | pad]

The joint order restricted to text (image) tokens is the text (image) stream order, so a set of joint positions in
row order is a set of positions of each stream in stream order. With sequence parallel each rank holds the joint
slice ``[r*Tj/S, (r+1)*Tj/S)`` (with a ring, ``ring_size`` C > 1: its chunks of the ring's split balanced for
bidirectional attention, :mod:`seqpack.parallel.ring_split`) and the matching stream tokens; ``perm`` maps the
local joint order onto ``cat([local text stream, local image stream])``. The row is padded to a multiple of S
(with a ring: of 16 x S) with one dummy image segment (zero inputs, its own cu_seqlens entry, no loss), never by
splitting a sample's attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parallel.ring_split import SplitPlan


@dataclass
class FluxSample:
    """One training/eval sample. img [Li, Cin] patchified image (or noisy latent) tokens, txt [Lt, Dt] text
    embeddings, pooled [P], img_ids [Li, 3] / txt_ids [Lt, 3] rotary position ids; target [Li, Cout] optional."""

    img: torch.Tensor
    txt: torch.Tensor
    pooled: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    timestep: float = 0.0  # in [0, 1] (the model multiplies by 1000)
    target: torch.Tensor | None = None
    guidance: float | None = None

    def __post_init__(self):
        """Shapes and dtypes checked here, so a wrong one names its field instead of shifting later samples."""
        for name, dims in (("img", 2), ("txt", 2), ("pooled", 1), ("img_ids", 2), ("txt_ids", 2), ("target", 2)):
            x = getattr(self, name)
            if x is None and name == "target":
                continue
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"FluxSample.{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != dims:
                raise ValueError(f"FluxSample.{name} has shape {tuple(x.shape)}; expected {dims} dimensions")
            if name in ("img", "txt", "pooled", "target") and not x.dtype.is_floating_point:
                raise TypeError(f"FluxSample.{name} has dtype {x.dtype}; expected a floating-point tensor")
        if self.target is not None and self.target.shape[0] != self.img.shape[0]:
            raise ValueError(f"FluxSample.target has {self.target.shape[0]} tokens but img has {self.img.shape[0]}; "
                             "the target is one row per image token [Li, Cout]")
        if not 0.0 <= float(self.timestep) <= 1.0:
            raise ValueError(f"FluxSample.timestep={self.timestep} must lie in [0, 1] (the model multiplies by 1000)")


@dataclass
class FluxRow:
    """This rank's view of one packed row (the whole row when S = 1); see the module docstring."""

    img: torch.Tensor  # [1, ti, Cin] local image-stream tokens (padding: zeros)
    txt: torch.Tensor  # [1, tt, Dt] local text-stream tokens
    img_ids: torch.Tensor  # [ti, 3]
    txt_ids: torch.Tensor  # [tt, 3]
    img_sample: torch.Tensor  # [ti] long: sample of each local image token (n = padding)
    txt_sample: torch.Tensor  # [tt] long
    perm: torch.Tensor  # [tj] long: local joint position -> index into cat([txt, img])
    pooled: torch.Tensor  # [n, P]
    timestep: torch.Tensor  # [n] in [0, 1]
    guidance: torch.Tensor | None  # [n] or None
    cu_seqlens: list[int]  # global joint boundaries (n + 1, or n + 2 with the pad segment), 0 ... Tj
    img_lens: list[int]  # image tokens per sample (global)
    target: torch.Tensor | None  # [1, ti, Cout] local targets (padding: zeros)
    img_valid: torch.Tensor  # [ti] bool: False on padding
    sp_size: int = 1
    sp_rank: int = 0
    ring_size: int = 1  # C of 2D sequence parallel (S = C ring x S/C Ulysses ranks)

    @property
    def num_samples(self) -> int:
        return len(self.img_lens)

    @property
    def max_seqlen(self) -> int:
        return max(b - a for a, b in zip(self.cu_seqlens, self.cu_seqlens[1:]))

    @property
    def joint_sample(self) -> torch.Tensor:
        """[tj] long: sample of each local joint token (n = padding)."""
        return torch.cat([self.txt_sample, self.img_sample])[self.perm]

    def to(self, device) -> "FluxRow":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return FluxRow(**moved)


def pack_flux(samples: list[FluxSample], sp_size: int = 1, sp_rank: int = 0, ring_size: int = 1) -> FluxRow:
    """Pack samples into one joint row and return rank ``sp_rank``'s share of it (see the module docstring);
    ``ring_size`` C > 1: 2D sequence parallel, ``sp_rank`` the logical rank ``ring_rank * (S/C) + ulysses_rank``.

        >>> s = lambda li, lt: FluxSample(torch.zeros(li, 4), torch.zeros(lt, 8), torch.zeros(2),
        ...                               torch.zeros(li, 3), torch.zeros(lt, 3))
        >>> row = pack_flux([s(4, 2), s(9, 2)], sp_size=2)
        >>> row.cu_seqlens, row.img.shape[1] + row.txt.shape[1]
        ([0, 6, 17, 18], 9)
    """
    if not samples:
        raise ValueError("pack_flux: empty sample list")
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise ValueError(f"pack_flux: sp_rank={sp_rank} must lie in 0..sp_size-1 (sp_size={sp_size})")
    if ring_size < 1 or sp_size % ring_size:
        raise ValueError(f"pack_flux: ring_size={ring_size} must be a positive divisor of sp_size={sp_size} "
                         "(sp = ring x ulysses)")
    plan = SplitPlan(ring=ring_size, ulysses=sp_size // ring_size, causal=False)  # joint attention: bidirectional
    ref = samples[0]
    for i, s in enumerate(samples):
        for name, x, cols in (("img", s.img, ref.img.shape[1]), ("txt", s.txt, ref.txt.shape[1]),
                              ("img_ids", s.img_ids, 3), ("txt_ids", s.txt_ids, 3)):
            if x.dim() != 2 or x.shape[1] != cols:
                raise ValueError(f"pack_flux: sample {i}: {name} has shape {tuple(x.shape)}, expected [tokens, {cols}]")
        if s.img.shape[0] < 1 or s.img_ids.shape[0] != s.img.shape[0] or s.txt_ids.shape[0] != s.txt.shape[0]:
            raise ValueError(f"pack_flux: sample {i}: img ({s.img.shape[0]}), img_ids ({s.img_ids.shape[0]}), txt "
                             f"({s.txt.shape[0]}) and txt_ids ({s.txt_ids.shape[0]}) token counts disagree or are 0")
        if (s.target is None) != (ref.target is None) or (s.guidance is None) != (ref.guidance is None):
            raise ValueError(f"pack_flux: sample {i} sets target/guidance differently from sample 0")
        if s.target is not None and s.target.shape != (s.img.shape[0], ref.target.shape[1]):
            raise ValueError(f"pack_flux: sample {i}: target has shape {tuple(s.target.shape)}, expected "
                             f"[{s.img.shape[0]}, {ref.target.shape[1]}] (one row per image token)")
        if s.pooled.shape != ref.pooled.shape:
            raise ValueError(f"pack_flux: sample {i}: pooled has shape {tuple(s.pooled.shape)}, sample 0's is "
                             f"{tuple(ref.pooled.shape)}")
    n = len(samples)
    txt_lens = [s.txt.shape[0] for s in samples]
    img_lens = [s.img.shape[0] for s in samples]
    cu = [0]
    for lt, li in zip(txt_lens, img_lens):
        cu.append(cu[-1] + lt + li)
    pad = -cu[-1] % plan.multiple
    if pad:
        cu.append(cu[-1] + pad)
    Tj, Tt = cu[-1], sum(txt_lens)
    # joint position -> ("text stream index" or Tt + "image stream index"), samples in order
    order, t0, i0 = [], 0, Tt
    for lt, li in zip(txt_lens, img_lens):
        order += list(range(t0, t0 + lt)) + list(range(i0, i0 + li))
        t0, i0 = t0 + lt, i0 + li
    order += list(range(i0, i0 + pad))
    order = torch.tensor(order)
    local = order[plan.cut(cu, sp_rank)]  # [tj] this rank's joint tokens, in row order
    is_txt = local < Tt
    txt_idx, img_idx = local[is_txt], local[~is_txt] - Tt  # increasing positions of each stream
    perm = torch.empty(len(local), dtype=torch.long)
    perm[is_txt.nonzero().reshape(-1)] = torch.arange(len(txt_idx))
    perm[(~is_txt).nonzero().reshape(-1)] = len(txt_idx) + torch.arange(len(img_idx))
    # perm[j] = position of local joint token j in cat([txt_local, img_local])

    def stream(xs: list[torch.Tensor], extra: int, idx: torch.Tensor) -> torch.Tensor:
        full = torch.cat(xs + ([xs[0].new_zeros(extra, *xs[0].shape[1:])] if extra else []))
        return full[idx]

    sample_of_img = torch.repeat_interleave(torch.arange(n + 1), torch.tensor(img_lens + [pad]))
    sample_of_txt = torch.repeat_interleave(torch.arange(n), torch.tensor(txt_lens))
    return FluxRow(
        img=stream([s.img for s in samples], pad, img_idx)[None],
        txt=stream([s.txt for s in samples], 0, txt_idx)[None],
        img_ids=stream([s.img_ids for s in samples], pad, img_idx),
        txt_ids=stream([s.txt_ids for s in samples], 0, txt_idx),
        img_sample=sample_of_img[img_idx], txt_sample=sample_of_txt[txt_idx], perm=perm,
        pooled=torch.stack([s.pooled for s in samples]),
        timestep=torch.tensor([float(s.timestep) for s in samples]),
        guidance=None if ref.guidance is None else torch.tensor([float(s.guidance) for s in samples]),
        cu_seqlens=cu, img_lens=img_lens,
        target=None if ref.target is None else stream([s.target for s in samples], pad, img_idx)[None],
        img_valid=sample_of_img[img_idx] < n, sp_size=sp_size, sp_rank=sp_rank, ring_size=ring_size,
    )


def image_position_ids(h: int, w: int) -> torch.Tensor:
    """Flux's rotary ids of an h x w token grid: [h*w, 3] = (0, row, column), row-major."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros_like(ys), ys, xs], dim=-1).reshape(h * w, 3).float()
