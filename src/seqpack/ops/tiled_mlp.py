"""Tiled MLP (the technique of DeepSpeed's ALST): each decoder layer's MLP runs over sequence tiles, and backward
recomputes one tile at a time, so the MLP's activation memory stops growing with T.

Shape legend: T tokens, H hidden size, I intermediate size, t tokens per tile.

A plain SwiGLU MLP keeps ~4 tensors of [T, I] for backward (gate, up, their activation and product); with
``t``-token tiles the forward keeps only its input [T, H] and backward holds one tile's [t, I] at a time. The
MLP acts on each token independently, so tiling along T is exact (matmuls over fewer rows: float32 round-off
only). Cost: the MLP forward runs twice (as under activation checkpointing). Applied from outside: the MLP's
``forward`` is wrapped on the instance; parameter names and the modeling code do not change.

    >>> apply_tiled_mlp(model, tile=2048)      # every decoder layer's MLP, in place        # doctest: +SKIP
"""

from __future__ import annotations

import warnings

import torch

from .layers import decoder_layers

MLP_NAMES = ("mlp", "feed_forward")  # transformers families; seqpack's native InternLM2


class _TiledMLPFunction(torch.autograd.Function):
    """out [1, T, H] = concat over tiles of forward(x[:, tile]); params are the MLP's (unsharded) parameters, inputs
    so that their gradients come back through autograd (FSDP2-safe, no ``.grad`` written behind its back)."""

    @staticmethod
    def forward(ctx, forward, tile, x, *params):
        ctx.forward, ctx.tile = forward, tile
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, *params)
        flat = x.detach()  # no graph in forward; a tile must not look like a tensor awaiting its gradient (module
        # hooks such as torch's memory tracker register gradient hooks on inputs that require grad)
        return torch.cat([forward(flat[..., s:s + tile, :]) for s in range(0, x.shape[-2], tile)], dim=-2)

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        want = [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        grad_p = [None] * len(want)
        for s in range(0, x.shape[-2], ctx.tile):
            part = x[..., s:s + ctx.tile, :].detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.forward(part)  # [1, t, H]: recompute one tile
            inputs = ([part] if grad_x is not None else []) + want
            grads = torch.autograd.grad(out, inputs, grad_out[..., s:s + ctx.tile, :], allow_unused=True)
            if grad_x is not None:
                grad_x[..., s:s + ctx.tile, :] = grads[0]
                grads = grads[1:]
            grad_p = [a if b is None else (b if a is None else a + b) for a, b in zip(grad_p, grads)]
        it = iter(grad_p)
        return (None, None, grad_x, *[next(it) if need else None for need in ctx.needs_input_grad[3:]])


def tiled(module: torch.nn.Module, tile: int) -> None:
    """Make ``module`` (a token-wise MLP, input [..., T, H]) run in tiles of ``tile`` tokens; in place, idempotent."""
    if tile < 1:
        raise ValueError(f"model.tiled_mlp tile of {tile} tokens must be >= 1")
    plain = getattr(module, "_seqpack_untiled_forward", None) or module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] <= tile or not torch.is_grad_enabled():
            return plain(x)
        params = [p for p in module.parameters() if p.requires_grad]
        return _TiledMLPFunction.apply(plain, tile, x, *params)

    module._seqpack_untiled_forward = plain
    module.forward = forward


def apply_tiled_mlp(model: torch.nn.Module, tile: int) -> int:
    """Tile the MLP of every decoder layer of ``model`` (``tile`` tokens per tile); returns how many were tiled.
    Mixture-of-experts blocks are left as they are (one warning)."""
    count, skipped = 0, set()
    for layer in decoder_layers(model):
        mlp = next((getattr(layer, n) for n in MLP_NAMES if isinstance(getattr(layer, n, None), torch.nn.Module)),
                   None)
        if mlp is None or hasattr(mlp, "experts"):
            skipped.add(type(mlp).__name__ if mlp is not None else type(layer).__name__)
            continue
        tiled(mlp, tile)
        count += 1
    if skipped:
        warnings.warn(f"tiled MLP: {', '.join(sorted(skipped))} left untiled (mixture of experts or no MLP found)",
                      stacklevel=2)
    return count
