"""InternEvo's manual-adaptation API (for a modeling file adapted by hand), over seqpack's attention.

A modeling file patched by hand the InternEvo way keeps working unchanged:

    from seqpack.compat.internevo import gpc, ParallelMode, isp_flash_attn_varlen_func, isp_flash_attn_func

    use_packed_dataset = gpc.config.data.get("use_packed_dataset", False)
    if use_packed_dataset:
        cu_seqlens = gpc.config.data[f"cu_seqlens_data_rank{gpc.get_local_rank(ParallelMode.DATA)}"]
        max_seqlen = gpc.config.data[f"max_seqlen_data_rank{gpc.get_local_rank(ParallelMode.DATA)}"]
        out = isp_flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)

and the training loop fills the slot per micro-batch:

    gpc.bind(topology)                       # once: the data-parallel rank and the SP group (ParallelDims)
    with gpc.micro_batch(batch):             # PackedBatch or ShardedBatch: global cu_seqlens / max_seqlen
        loss = ...model(input_ids=batch.input_ids, position_ids=batch.position_ids)...

Shape legend: B batch rows, S tokens per row on this rank (T/sp under sequence parallel), H heads (Hkv for k/v),
D head dim. This module is the one place seqpack keeps batch metadata in a global slot.
"""

from __future__ import annotations

import contextlib
import enum

import torch

from ..attention.hf import dispatch
from ..attention.kernels import AttnSpec, varlen_attention
from ..batch import check_cu_seqlens
from ..parallel.comm import group_size
from ..parallel.heads import ulysses_attention


class ParallelMode(enum.Enum):
    """InternEvo's process-group names. In seqpack TENSOR (mode "isp") is the sequence-parallel group."""

    GLOBAL = "global"
    DATA = "data"
    TENSOR = "tensor"
    PIPELINE = "pipe"
    WEIGHT = "weight"
    WEIGHT_DATA = "weight_data"
    ZERO1 = "zero1"


class _AttrDict(dict):
    """dict with attribute access, like InternEvo's ``Config`` (``gpc.config.data.seq_len``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"gpc.config has no key {key!r}") from None

    def __setattr__(self, key, value):
        self[key] = value


class ParallelContext:
    """The ``gpc`` object: ``config.data`` (per-micro-batch packing metadata), local ranks, world sizes, groups."""

    def __init__(self):
        self.config = _AttrDict(data=_AttrDict(), parallel=_AttrDict(tensor=_AttrDict(size=1, mode="isp")))
        self._groups: dict[ParallelMode, object] = {}
        self._ranks: dict[ParallelMode, tuple[int, int]] = {}

    def bind(self, topology) -> "ParallelContext":
        """Take ranks and groups from a :class:`seqpack.parallel.topology.ParallelDims` (DATA = dp, TENSOR = sp)."""
        self._groups = {ParallelMode.DATA: topology.dp_group, ParallelMode.TENSOR: topology.sp_group,
                        ParallelMode.GLOBAL: topology.world_group}
        self._ranks = {ParallelMode.DATA: (topology.dp_rank, topology.dp_size),
                       ParallelMode.TENSOR: (topology.sp_rank, topology.sp_size),
                       ParallelMode.GLOBAL: (topology.rank, topology.world_size)}
        self.config.parallel.tensor.size = topology.sp_size
        return self

    def unbind(self) -> None:
        """Back to one process: no groups, every rank 0."""
        self._groups, self._ranks = {}, {}
        self.config.parallel.tensor.size = 1

    def get_group(self, mode: ParallelMode):
        return self._groups.get(ParallelMode(mode))

    def get_local_rank(self, mode: ParallelMode) -> int:
        return self._ranks.get(ParallelMode(mode), (0, 1))[0]

    def get_world_size(self, mode: ParallelMode) -> int:
        return self._ranks.get(ParallelMode(mode), (0, 1))[1]

    def is_initialized(self, mode: ParallelMode) -> bool:
        return ParallelMode(mode) in self._ranks

    @contextlib.contextmanager
    def micro_batch(self, batch):
        """Publish ``batch``'s global ``cu_seqlens`` / ``max_seqlen`` as ``gpc.config.data`` answers
        (``use_packed_dataset``, ``cu_seqlens_data_rank{r}``, ``max_seqlen_data_rank{r}``, r = this DATA rank)
        for the duration of the forward/backward of one micro-batch; restores the previous values after."""
        r = self.get_local_rank(ParallelMode.DATA)
        keys = ("use_packed_dataset", f"cu_seqlens_data_rank{r}", f"max_seqlen_data_rank{r}")
        data = self.config.data
        saved = {k: data[k] for k in keys if k in data}
        data.update(zip(keys, (True, batch.cu_seqlens, int(batch.max_seqlen))))
        try:
            yield batch
        finally:
            for k in keys:
                data.pop(k, None)
            data.update(saved)


gpc = ParallelContext()


def _sp_group():
    return gpc.get_group(ParallelMode.TENSOR) if gpc.config.parallel.tensor.get("mode", "isp") == "isp" else None


def isp_flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                               attention_dropout: float = 0.0, softmax_scale: float | None = None,
                               causal: bool = True, cu_seqlens=None, max_seqlen=None):
    """Packed attention, InternEvo signature. q [1, S, H, D], k/v [1, S, Hkv, D] -> [1, S, H, D].

    ``cu_seqlens_*`` [n+1] are the GLOBAL document boundaries of the packed row (``cu_seqlens=`` / ``max_seqlen=``
    are accepted as in InternEvo's older API). With sequence parallel bound (``gpc.bind``), q/k/v are this rank's
    S = T/sp slice and the Ulysses all-to-all runs around the kernel. Same backends as ``attn_implementation=
    "seqpack"`` (flash-attn / torch varlen on CUDA in fp16/bf16, exact per-document SDPA otherwise); ``causal=False``
    runs on the kernels (the SDPA path is causal-only for now).
    """
    cu_q = cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens
    cu_k = cu_seqlens_k if cu_seqlens_k is not None else cu_q
    if cu_q is None:
        raise ValueError("isp_flash_attn_varlen_func needs cu_seqlens_q (the packed row's document boundaries, "
                         "gpc.config.data['cu_seqlens_data_rank{r}'])")
    if cu_k is not cu_q and not torch.equal(cu_k.to(cu_q.device), cu_q):
        raise ValueError("isp_flash_attn_varlen_func: cu_seqlens_k differs from cu_seqlens_q; seqpack supports "
                         "self-attention over one packed row only")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"isp_flash_attn_varlen_func expects [B, S, H, D] tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    group = _sp_group()
    S = group_size(group)
    q3, k3, v3 = (x.flatten(0, 1) for x in (q, k, v))  # [B*S_local, H, D], one packed row as in InternEvo
    cu = check_cu_seqlens(cu_q, q3.shape[0] * S)
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    for name, given in (("max_seqlen_q", max_seqlen_q if max_seqlen_q is not None else max_seqlen),
                        ("max_seqlen_k", max_seqlen_k)):
        if given is not None and int(given) < longest:
            raise ValueError(f"isp_flash_attn_varlen_func: {name}={int(given)} is shorter than the longest "
                             f"document ({longest} tokens) in cu_seqlens")
    spec = AttnSpec(scale=softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5,
                    dropout=attention_dropout if torch.is_grad_enabled() else 0.0, causal=causal)

    def kernel(q, k, v):
        return varlen_attention(q, k, v, cu, longest, spec, "auto", cu_q)

    out = ulysses_attention(q3, k3, v3, group, kernel) if S > 1 else kernel(q3, k3, v3)  # [B*S_local, H, D]
    return out.view(q.shape)


def isp_flash_attn_func(q, k, v, attention_dropout: float = 0.0, softmax_scale: float | None = None,
                        causal: bool = True):
    """Causal attention where every row is one sequence, InternEvo signature. q [B, S, H, D], k/v [B, S, Hkv, D]
    -> [B, S, H, D]; under sequence parallel each row is split S = T/sp per rank."""
    T = q.shape[1] * group_size(_sp_group())
    cu = torch.tensor([0, T], dtype=torch.int32, device=q.device)
    rows = [isp_flash_attn_varlen_func(q[b:b + 1], k[b:b + 1], v[b:b + 1], cu, cu, T, T, attention_dropout,
                                       softmax_scale, causal) for b in range(q.shape[0])]
    return torch.cat(rows)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False):
    """Rotate the first ``2 * cos.shape[-1]`` features of x [B, S, H, D] by cos/sin [S, R/2] (or [B, S, R/2]),
    already gathered by position; NeoX halves (``interleaved=False``) or GPT-J even/odd pairs. Math in fp32,
    returns a new tensor of x's dtype (InternEvo's ``apply_rotary_emb``)."""
    half = cos.shape[-1]
    if sin.shape != cos.shape or 2 * half > x.shape[-1]:
        raise ValueError(f"apply_rotary_emb: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same "
                         f"shape [S, R/2] with R <= head dim {x.shape[-1]}")
    c, s = (t.float()[None, :, None] if t.dim() == 2 else t.float()[:, :, None] for t in (cos, sin))  # [.., S, 1, R/2]
    rot, rest = x[..., :2 * half].float(), x[..., 2 * half:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def hf_model_dispatch(model, auto_dispatch: bool = False, backend: str = "auto"):
    """InternEvo's ``hf_model_dispatch``: prepare a Hugging Face model for packed / ISP training, in place.

    Models whose attention goes through transformers' ``AttentionInterface`` (transformers' own families and
    seqpack's native InternLM/InternLM2/Baichuan2) are switched to ``attn_implementation="seqpack"`` with the SP
    group bound to ``gpc``; a hand-adapted modeling file (calling ``isp_flash_attn_*``) needs nothing more.
    InternEvo's module replacement (``auto_dispatch``) is not needed: FSDP2 shards the weights from outside.
    """
    del auto_dispatch  # accepted for signature compatibility; see the docstring
    if getattr(model, "_supports_attention_backend", False):
        dispatch(model, backend=backend, sp_group=_sp_group())
    return model
