"""Diffusion transformers (diffusers' Flux) with packed multi-resolution rows and sequence parallelism.

Files: packing.py (packed joint rows and SP shards), flux.py (attention processor, packed forward).
"""

from .flux import SeqpackFluxAttnProcessor, install, packed_forward
from .packing import FluxRow, FluxSample, image_position_ids, pack_flux

__all__ = ["FluxRow", "FluxSample", "SeqpackFluxAttnProcessor", "image_position_ids", "install", "pack_flux",
           "packed_forward"]
