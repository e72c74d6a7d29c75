"""Activation-checkpoint offload (the technique of DeepSpeed's ALST and torchtitan): the inputs that checkpointed
decoder layers keep for backward live in host memory between the layer's forward and its backward.

Shape legend: T tokens (of this rank's shard), H hidden size.

A checkpointed layer keeps only its input, the residual stream [1, T, H], which torch's non-reentrant checkpoint
saves as an autograd saved tensor. Around each checkpointed layer's checkpoint call this module installs
``torch.autograd.graph.saved_tensors_hooks``: packing copies that input to host memory (pinned, on a side CUDA
stream, while the layer computes), unpacking brings it back — on CUDA the copy of the layer below is started as
soon as a layer's backward begins, so it overlaps with that layer's recomputation and backward. Only tensors are
moved: losses and gradients are bitwise those without offload. On the CPU the same hooks run end to end (the
"host" copy is a second CPU tensor, and unpacking copies it back as a GPU run does), which is how the tests check
what moves.

    >>> offload = offload_checkpoints(model)      # after apply_activation_checkpointing   # doctest: +SKIP
    >>> offload.record = []                        # (layer, shape, dtype, bytes) of every offloaded tensor
    >>> offload.on_host = budget.host              # called with every host copy (seqpack bench longest)
"""

from __future__ import annotations

import weakref

import torch

from .layers import decoder_layers


class _Offloaded:
    """One saved tensor in host memory; ``ready`` is the CUDA event of its copy (None on the CPU)."""

    __slots__ = ("host", "device", "ready", "layer", "back", "back_ready", "__weakref__")

    def __init__(self, host, device, ready, layer):
        self.host, self.device, self.ready, self.layer = host, device, ready, layer
        self.back = self.back_ready = None  # the prefetched device copy and its event


class CheckpointOffload:
    """The saved-tensor hooks of :func:`offload_checkpoints`. ``record``: None, or a list that receives
    ``(layer, shape, dtype, nbytes)`` for every tensor offloaded (tests, ``seqpack bench``). ``on_host``: None, or
    a function called with every host copy as it is made (a device-memory tracker stops counting it)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.cuda = torch.cuda.is_available()
        self.stream = None  # side CUDA stream of the copies, made on first use
        self.saved: dict[int, list] = {}  # layer -> weak references to its offloaded tensors (autograd owns them)
        self.record: list | None = None
        self.on_host = None

    def _side_stream(self):
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def pack(self, layer: int, tensor: torch.Tensor):
        if (not tensor.is_floating_point() or tensor.is_sparse or isinstance(tensor, torch.nn.Parameter)
                or tensor.numel() == 0):  # an empty placeholder (older torch's checkpoint saves one) has no bytes
            return tensor
        if tensor.device.type == "cuda":
            stream = self._side_stream()
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
            tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        elif tensor.device.type == "cpu":
            host, ready = tensor.clone(memory_format=torch.contiguous_format), None
        else:
            return tensor
        if self.on_host is not None:
            self.on_host(host)
        item = _Offloaded(host, tensor.device, ready, layer)
        if self.cuda:  # for the prefetch; dead references (graphs already freed) are dropped here
            alive = [ref for ref in self.saved.get(layer, ()) if ref() is not None]
            self.saved[layer] = alive + [weakref.ref(item)]
        if self.record is not None:
            self.record.append((layer, tuple(tensor.shape), tensor.dtype, tensor.numel() * tensor.element_size()))
        return item

    def unpack(self, item):
        if not isinstance(item, _Offloaded):
            return item
        if item.device.type == "cpu":  # a device copy, as the way back from pinned memory makes one
            return item.host.clone()
        if item.back is None:
            self._fetch(item)
        torch.cuda.current_stream(item.device).wait_event(item.back_ready)
        out = item.back
        out.record_stream(torch.cuda.current_stream(item.device))
        item.back = item.back_ready = None
        for ref in self.saved.pop(item.layer - 1, ()):  # one layer ahead: the next to run backward
            below = ref()
            if below is not None and below.back is None:
                self._fetch(below)
        return out

    def _fetch(self, item: _Offloaded) -> None:
        """Start copying ``item`` back to its device on the side stream."""
        stream = self._side_stream()
        if item.ready is not None:
            stream.wait_event(item.ready)
        with torch.cuda.stream(stream):
            item.back = torch.empty(item.host.shape, dtype=item.host.dtype, device=item.device)
            item.back.copy_(item.host, non_blocking=True)
            item.back_ready = torch.cuda.Event()
            item.back_ready.record(stream)

    def wrap(self, layer: int, checkpoint_fn):
        """``checkpoint_fn`` (a layer's ``_gradient_checkpointing_func``) run under this layer's hooks."""

        def checkpoint_offloaded(fn, *args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: self.pack(layer, t), self.unpack):
                return checkpoint_fn(fn, *args, **kwargs)

        checkpoint_offloaded.seqpack_offloaded = True
        return checkpoint_offloaded


def offload_checkpoints(model: torch.nn.Module) -> CheckpointOffload:
    """Offload the saved inputs of every checkpointed decoder layer of ``model`` to host memory; in place. Call it
    after activation checkpointing is applied (``seqpack.train.model.apply_activation_checkpointing``); layers
    that do not checkpoint are left alone. ValueError when no layer checkpoints (nothing would be offloaded)."""
    layers = decoder_layers(model)
    offload = CheckpointOffload(len(layers))
    count = 0
    for index, layer in enumerate(layers):
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        if not getattr(layer, "gradient_checkpointing", False) or fn is None:
            continue
        if getattr(fn, "seqpack_offloaded", False):
            fn = fn.__wrapped_checkpoint__
        wrapped = offload.wrap(index, fn)
        wrapped.__wrapped_checkpoint__ = fn
        layer._gradient_checkpointing_func = wrapped
        count += 1
    if not count:
        raise ValueError(f"model.offload_checkpoints: no decoder layer of {type(model).__name__} is checkpointed; "
                         "set model.checkpoint (True or a fraction of layers) to offload their inputs")
    model._seqpack_checkpoint_offload = offload
    return offload
