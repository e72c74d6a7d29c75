"""Diffusion transformers (diffusers' Flux) with packed multi-resolution rows and sequence parallelism.

Files: packing.py (packed joint rows and SP shards), flux.py (attention processor, packed forward), objective.py
(rectified flow), data.py (images, loader), task.py (the Flux run of ``seqpack train``).
"""

from .flux import SeqpackFluxAttnProcessor, install, packed_forward
from .packing import FluxRow, FluxSample, image_position_ids, pack_flux

__all__ = ["FluxRow", "FluxSample", "SeqpackFluxAttnProcessor", "image_position_ids", "install", "pack_flux",
           "packed_forward"]
