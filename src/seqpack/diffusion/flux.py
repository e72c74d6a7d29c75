"""diffusers' ``FluxTransformer2DModel`` on packed multi-resolution rows, with Ulysses sequence parallelism.

Shape legend: n samples, tt / ti / tj local text / image / joint tokens (S = 1: the whole row), S SP degree,
C model width (N * D), N heads, D head dim.

Two pieces, no edits to diffusers' code:

- :class:`SeqpackFluxAttnProcessor` — a diffusers attention processor (``model.set_attn_processor``) that runs
  Flux's joint attention through seqpack's exact bidirectional varlen kernel. Called by the unmodified diffusers
  forward (batch rows = samples) it is a drop-in for ``FluxAttnProcessor``. Given a packed row (``packed=``
  :class:`~seqpack.diffusion.packing.FluxRow`) it interleaves the two streams into the joint order
  ``[txt_i; img_i]`` per sample, attends within samples by ``cu_seqlens``, and with an SP group wraps the kernel
  in the Ulysses all-to-all (:func:`seqpack.parallel.ulysses_attention`, any head count); with a ring group (2D
  sequence parallel) the kernel is seqpack's bidirectional ring attention (:mod:`seqpack.attention.ring`).
- :func:`packed_forward` — the model's forward over a packed row. diffusers' blocks broadcast one timestep
  embedding over a whole batch row (``gate[:, None]``), which a packed row of samples at different timesteps
  cannot use, so this walks the model's own submodules (the same weights and layers) with the AdaLN modulation
  of each token taken from its sample (:class:`_TokenAffine`, no gathered copy kept for backward). Everything
  else (projections, QK-norm, rotary, MLPs) is the model's own module call. ``tests/test_flux.py`` holds it
  equal to the unmodified diffusers forward of each sample alone, outputs and every gradient.

    >>> model.set_attn_processor(SeqpackFluxAttnProcessor())                   # doctest: +SKIP
    >>> pred = packed_forward(model, pack_flux(samples))  # [1, sum Li, Cout]  # doctest: +SKIP
"""

from __future__ import annotations

import torch

import functools

from ..attention.backends import compute_dtype, resolve_backend
from ..attention.kernels import AttnSpec, varlen_attention
from ..attention.ring import ring_attention
from ..parallel.comm import group_size
from ..parallel.heads import ulysses_attention
from .packing import FluxRow


class SeqpackFluxAttnProcessor:
    """diffusers attention processor for ``FluxAttention``: seqpack's varlen kernel, packed rows, Ulysses SP
    over ``sp_group`` and ring attention over ``ring_group`` (2D: ``topo.ulysses_group``, ``topo.ring_group``)."""

    def __init__(self, backend: str = "auto", sp_group=None, ring_group=None):
        self.backend = backend
        self.sp_group = sp_group if group_size(sp_group) > 1 else None
        self.ring_group = ring_group if group_size(ring_group) > 1 else None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 packed: FluxRow | None = None):
        """hidden_states [B, Li, C] (image stream; joint row in single-stream blocks), encoder_hidden_states
        [B, Lt, C] or None -> [B, Li, C] (and [B, Lt, C])."""
        if attention_mask is not None:
            raise ValueError("SeqpackFluxAttnProcessor takes no attention_mask: pack samples of different sizes "
                             "with seqpack.diffusion.pack_flux instead of padding and masking them")
        if getattr(attn, "fused_projections", False):
            raise ValueError("SeqpackFluxAttnProcessor needs unfused q/k/v projections; call "
                             "model.unfuse_qkv_projections()")
        q, k, v = (_heads(attn, p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))  # [B, Li, N, D]
        q, k = attn.norm_q(q), attn.norm_k(k)
        lt = 0
        if encoder_hidden_states is not None:
            eq, ek, ev = (_heads(attn, p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj,
                                                                           attn.add_v_proj))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            lt = eq.shape[1]
            q, k, v = (torch.cat([e, x], dim=1) for e, x in ((eq, q), (ek, k), (ev, v)))  # [B, Lt + Li, N, D]
            if packed is not None:
                q, k, v = (x[:, packed.perm] for x in (q, k, v))  # streams -> joint order [txt_i; img_i]
        if image_rotary_emb is not None:  # (cos, sin) [L, D] in the same order as q/k
            q, k = (_rotary(x, image_rotary_emb) for x in (q, k))
        out = self._attention(q, k, v, packed).flatten(2)  # [B, L, C]
        if encoder_hidden_states is None:
            return out.to(q.dtype)
        if packed is not None:
            out = out[:, torch.argsort(packed.perm)]  # joint order -> cat([txt, img])
        txt, img = out.split([lt, out.shape[1] - lt], dim=1)
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.contiguous())

    def _attention(self, q, k, v, packed: FluxRow | None) -> torch.Tensor:
        """q/k/v [B, L, N, D] -> [B, L, N, D]; rows are samples, or one packed row with ``packed.cu_seqlens``."""
        spec = AttnSpec(scale=q.shape[-1] ** -0.5, causal=False)
        B, L = q.shape[:2]
        if packed is None:
            if self.sp_group is not None or self.ring_group is not None:
                raise ValueError("sequence parallel Flux needs packed rows: use seqpack.diffusion.packed_forward")
            cu = list(range(0, B * L + 1, L))  # every batch row is one sample
            out = varlen_attention(*(x.reshape(B * L, *x.shape[2:]) for x in (q, k, v)), cu, L, spec, self.backend)
            return out.reshape(B, L, *out.shape[1:])
        cu, longest = packed.cu_seqlens, packed.max_seqlen
        q, k, v = q[0], k[0], v[0]  # [tj, N, D]
        if self.ring_group is not None:  # 2D: this ring rank's chunks, keys/values travel around the ring
            backend = resolve_backend(self.backend, q.device, spec, compute_dtype(q), q.shape[-1])
            attn = functools.partial(ring_attention, cu=cu, spec=spec, group=self.ring_group, backend=backend)
        else:
            attn = functools.partial(varlen_attention, cu=cu, max_seqlen=longest, spec=spec, backend=self.backend)
        if self.sp_group is None:
            return attn(q, k, v)[None]
        return ulysses_attention(q, k, v, self.sp_group, attn)[None]  # [tj, N, D] -> [tj*U, N/U, D] -> back


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))  # [B, L, C] -> [B, L, N, D]


def _rotary(x: torch.Tensor, freqs) -> torch.Tensor:
    """Flux's interleaved real rotary embedding (diffusers' ``apply_rotary_emb``), x [B, L, N, D], cos/sin [L, D]."""
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, freqs, sequence_dim=1)


def install(model, backend: str = "auto", sp_group=None, ring_group=None):
    """Set :class:`SeqpackFluxAttnProcessor` on every attention module of ``model``; returns the model.
    ``sp_group``: Ulysses over the packed joint row; with ``ring_group`` too: 2D sequence parallel (rows from
    ``pack_flux(samples, S, sp_rank, ring_size=C)``)."""
    if type(model).__name__ != "FluxTransformer2DModel" and not hasattr(model, "single_transformer_blocks"):
        raise TypeError(f"{type(model).__name__} is not a diffusers FluxTransformer2DModel")
    model.set_attn_processor(SeqpackFluxAttnProcessor(backend, sp_group, ring_group))
    return model


class _TokenAffine(torch.autograd.Function):
    """out = x * mul[index] + add[index] for x [1, t, C], mul/add [n, C], index [t] — the per-sample AdaLN
    modulation of a packed row. Backward recomputes mul[index] instead of keeping a gathered [t, C] copy, so the
    saved memory matches diffusers' broadcast [B, 1, C] modulation."""

    @staticmethod
    def forward(ctx, x, mul, add, index):
        ctx.save_for_backward(x, mul, index)
        ctx.has_add = add is not None
        out = x * mul[index]
        return out + add[index] if add is not None else out

    @staticmethod
    def backward(ctx, grad):
        x, mul, index = ctx.saved_tensors
        g = grad[0]  # [t, C]
        grad_mul = torch.zeros_like(mul).index_add_(0, index, g * x[0])
        grad_add = torch.zeros_like(mul).index_add_(0, index, g) if ctx.has_add else None
        return grad * mul[index], grad_mul, grad_add, None


def _modulation(norm, temb: torch.Tensor, chunks: int) -> list[torch.Tensor]:
    """diffusers' AdaLN ``norm.linear(norm.silu(temb)).chunk(chunks, dim=1)`` per sample: ``chunks`` x [n + 1, C]."""
    return list(norm.linear(norm.silu(temb)).chunk(chunks, dim=1))


def _modulate(x, scale, shift, index):
    """x * (1 + scale) + shift, per token from its sample ``index`` [t]."""
    return _TokenAffine.apply(x, 1 + scale, shift, index)


def _gated(gate, x, index):
    """gate * x, per token from its sample ``index`` [t]."""
    return _TokenAffine.apply(x, gate, None, index)


def _double_block(block, txt, img, temb, rope, row: FluxRow):
    """FluxTransformerBlock with per-sample modulation. txt [1, tt, C], img [1, ti, C] -> (txt, img)."""
    i, t = row.img_sample, row.txt_sample
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _modulation(block.norm1, temb, 6)
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(block.norm1_context, temb, 6)
    attn_img, attn_txt = block.attn(hidden_states=_modulate(block.norm1.norm(img), scale, shift, i),
                                    encoder_hidden_states=_modulate(block.norm1_context.norm(txt), c_scale, c_shift, t),
                                    image_rotary_emb=rope, packed=row)
    img = img + _gated(gate, attn_img, i)
    img = img + _gated(gate_mlp, block.ff(_modulate(block.norm2(img), scale_mlp, shift_mlp, i)), i)
    txt = txt + _gated(c_gate, attn_txt, t)
    txt = txt + _gated(c_gate_mlp, block.ff_context(_modulate(block.norm2_context(txt), c_scale_mlp, c_shift_mlp, t)),
                       t)
    if txt.dtype == torch.float16:
        txt = txt.clip(-65504, 65504)
    return txt, img


def _single_block(block, x, temb, rope, row: FluxRow, sample: torch.Tensor):
    """FluxSingleTransformerBlock with per-sample modulation on the joint row. x [1, tj, C] -> [1, tj, C]."""
    shift, scale, gate = _modulation(block.norm, temb, 3)
    h = _modulate(block.norm.norm(x), scale, shift, sample)
    mlp = block.act_mlp(block.proj_mlp(h))
    attn = block.attn(hidden_states=h, image_rotary_emb=rope, packed=row)
    x = x + _gated(gate, block.proj_out(torch.cat([attn, mlp], dim=2)), sample)
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def packed_forward(model, row: FluxRow, checkpoint: bool = False) -> torch.Tensor:
    """Flux forward over a packed row (this rank's shard). Returns the prediction for the local image-stream
    tokens [1, ti, Cout] (padding rows included; mask them with ``row.img_valid``). ``checkpoint`` recomputes each
    block in backward (activation checkpointing)."""
    if not all(isinstance(p, SeqpackFluxAttnProcessor) for p in model.attn_processors.values()):
        raise ValueError("packed_forward needs seqpack's attention processor: call seqpack.diffusion.install(model)")
    guidance = row.guidance
    if getattr(model.config, "guidance_embeds", False) and guidance is None:
        raise ValueError("this Flux model has guidance_embeds=True: give every FluxSample a guidance value")
    dtype = model.x_embedder.weight.dtype
    img = model.x_embedder(row.img.to(dtype))  # [1, ti, C]
    txt = model.context_embedder(row.txt.to(dtype))  # [1, tt, C]
    t = row.timestep.to(dtype) * 1000
    temb = (model.time_text_embed(t, row.pooled.to(dtype)) if guidance is None or not model.config.guidance_embeds
            else model.time_text_embed(t, guidance.to(dtype) * 1000, row.pooled.to(dtype)))  # [n, C]
    temb = torch.cat([temb, temb.new_zeros(1, temb.shape[1])])  # row n: conditioning of the padding tokens
    rope = model.pos_embed(torch.cat([row.txt_ids, row.img_ids])[row.perm])  # (cos, sin) [tj, D], joint order
    run = _checkpointed if checkpoint and torch.is_grad_enabled() else (lambda f, *a: f(*a))
    for block in model.transformer_blocks:
        txt, img = run(_double_block, block, txt, img, temb, rope, row)
    x = torch.cat([txt, img], dim=1)[:, row.perm]  # streams -> joint order [1, tj, C]
    joint_sample = row.joint_sample
    for block in model.single_transformer_blocks:
        x = run(_single_block, block, x, temb, rope, row, joint_sample)
    img = x[:, torch.argsort(row.perm)[txt.shape[1]:]]  # joint -> image stream [1, ti, C]
    scale, shift = _modulation(model.norm_out, temb, 2)  # AdaLayerNormContinuous: (scale, shift)
    return model.proj_out(_modulate(model.norm_out.norm(img), scale, shift, row.img_sample))


def _checkpointed(fn, *args):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)
