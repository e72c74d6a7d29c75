"""FSDP2 (``fully_shard``) as the ZeRO engine, composed with sequence parallel.

Parameters are sharded over every rank — the dp and sp mesh dimensions flattened, as torchtitan's
``dp_shard_cp`` — because SP ranks hold identical parameters whose gradients must be summed anyway: one
reduce-scatter over all ranks does the data-parallel and the sequence-parallel reduction at once.
Gradients are **summed** (divide factor 1, sum-only collectives, which gloo requires); the loss carries the
normalisation (:class:`~seqpack.parallel.StepLoss` divides by the global valid-target count).

Order of application (torchtitan's): attention implementation (``seqpack.dispatch(model, sp_group=...)``) ->
activation checkpointing -> compile -> :func:`apply_fsdp`.
"""

from __future__ import annotations

import warnings

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers causal LM (``model.model.layers`` or the ``*DecoderLayer``s)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        return list(layers)
    return [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]


def apply_fsdp(model: torch.nn.Module, topo, reshard_after_forward: bool = True, mp_policy=None) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 over all ranks of ``topo`` (each decoder layer, then the root); in place.

    With one process this returns the model unchanged. ``mp_policy``: an optional
    ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 params, fp32 reduce on CUDA).

        >>> model = apply_fsdp(seqpack.dispatch(model, sp_group=topo.sp_group), topo)   # doctest: +SKIP
    """
    if topo.world_size == 1:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = topo.fsdp_mesh()
    kwargs = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    layers = decoder_layers(model)
    if not layers:
        warnings.warn(f"apply_fsdp found no decoder layers in {type(model).__name__}; sharding the model as one unit",
                      stacklevel=2)
    model.to(topo.device)
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again at once by backward: keep them gathered
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    # A parameter that gets a gradient on some ranks only (a routed expert of its own, a branch not every row takes)
    # must still join the reduce-scatter on every rank, with a zero gradient: newer FSDP2 does that (torch 2.13).
    # Older FSDP2 drops such parameters from the collective; transformers 5's MoE layers stack their experts into
    # one parameter, so the models seqpack supports do not produce them.
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
            if hasattr(m, "set_reduce_scatter_unused_params"):  # torch 2.13 has it, 2.11 not; see above
                m.set_reduce_scatter_unused_params(True, recurse=False)
    return model
