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

from ..ops.layers import decoder_layers


def apply_fsdp(model: torch.nn.Module, topo, reshard_after_forward: bool = True, mp_policy=None,
               offload_policy=None) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 over all ranks of ``topo`` (each decoder layer, then the root); in place.

    ``mp_policy``: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 params over fp32 master weights,
    fp32 gradient reduction); ``offload_policy``: a ``CPUOffloadPolicy`` (parameter shards, gradients and so the
    optimizer step on the host). With one process and neither policy this returns the model unchanged; with a
    policy, FSDP2 runs on a one-rank group (created here, torn down by ``topo.destroy()``), so one process gets
    exactly the numerics of many.

        >>> model = apply_fsdp(seqpack.dispatch(model, sp_group=topo.sp_group), topo)   # doctest: +SKIP
    """
    if topo.world_size == 1 and mp_policy is None and offload_policy is None:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = topo.fsdp_mesh() or one_rank_mesh(topo)
    kwargs = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    layers = decoder_layers(model)
    if not layers:
        warnings.warn(f"apply_fsdp found no decoder layers in {type(model).__name__}; sharding the model as one unit",
                      stacklevel=2)
    move_model(model, topo.device)
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again at once by backward: keep them gathered
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
            reduce_unused_parameters(m)
    return model


def move_model(model: torch.nn.Module, device: torch.device) -> None:
    """``model.to(device)`` unless every parameter is there already (a move to the same device would still swap
    tensor subclasses such as FakeTensorMode's, which fails)."""
    if any(p.device != device for p in model.parameters()):
        model.to(device)


def one_rank_mesh(topo):
    """A one-rank DeviceMesh for FSDP2 in a single process (no torchrun): the process group lives in memory
    (``HashStore``) and belongs to ``topo``, whose ``destroy()`` tears it down."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_initialized():
        dist.init_process_group("nccl" if topo.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        topo._owns_process_group = True  # noqa: SLF001 (the topology tears down what its run created)
    assert dist.get_world_size() == 1, "one_rank_mesh inside a world of several ranks: pass a topology's mesh"
    return DeviceMesh.from_group(dist.group.WORLD, topo.device.type, mesh_dim_names=("dp_sp",))


def reduce_unused_parameters(module) -> None:
    """Make every rank reduce-scatter every parameter of ``module``'s FSDP group, with a zero gradient where it got
    none on this rank (a LLaVA vision tower on a rank whose row has no image, a branch not every row takes).

    Without this, a rank that has no gradient for some parameter leaves it out of the reduce-scatter while another
    rank puts it in: the collectives disagree (gloo aborts, nccl may hang or mix up tensors). torch 2.13's FSDP2 does
    it when asked (``set_reduce_scatter_unused_params``); torch 2.9-2.11 lack that switch, so there each group's
    ``post_backward`` first gives such parameters zero gradients, which is what the switch does."""
    if hasattr(module, "set_reduce_scatter_unused_params"):
        module.set_reduce_scatter_unused_params(True, recurse=False)
        return
    group = module._get_fsdp_state()._fsdp_param_group  # FSDP2 internals of torch 2.9-2.11
    if group is None:
        return
    post_backward = group.post_backward

    def post_backward_with_unused(*args):
        if group.reduce_grads:  # the gradients are reduced in this backward: give every parameter one
            for p in group.fsdp_params:
                if hasattr(p, "_unsharded_param") and p.unsharded_param.requires_grad \
                        and p.unsharded_accumulated_grad is None and p.unsharded_param.grad is None:
                    p.unsharded_param.grad = torch.zeros_like(p.unsharded_param)
        return post_backward(*args)

    group.post_backward = post_backward_with_unused
