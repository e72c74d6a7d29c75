"""``diffusion = dict(...)``: the config section of a Flux run (``model_type="flux"``, trained by
:mod:`seqpack.diffusion.task`), declared here with the other sections so that one loader checks every key of a
config file. The other sections keep their meaning (model.hidden_size / num_layers / num_attention_heads,
data.seq_len / micro_bsz / micro_num / train_folder, parallel.tensor.size, ckpt, adam, lr_scheduler, train).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

FLUX_MODEL_TYPES = ("flux", "flux_from_hf")
TIMESTEP_SAMPLING = ("logit_normal", "uniform")  # diffusion.timestep_sampling


def is_flux(cfg) -> bool:
    """True for a Flux (diffusion transformer) run: ``model_type="flux"`` (from scratch, or a local diffusers
    folder in ckpt.load_ckpt_info)."""
    return cfg.model_type.lower() in FLUX_MODEL_TYPES


@dataclass
class DiffusionConfig:
    """``diffusion = dict(...)``: Flux training (used when model_type="flux")."""

    patch_size: int = 4
    """Pixels (or latent cells) per side of one image token; image sides must be divisible by it."""
    single_layers: int = 2
    """Single-stream Flux blocks (model.num_layers counts the double-stream blocks)."""
    resolutions: tuple = ((16, 16), (16, 24), (24, 16), (24, 24), (32, 32), (32, 16))
    """(height, width) mix of the embedded procedural images (data.train_folder=None)."""
    num_images: int = 4096
    """Size of the embedded procedural dataset."""
    text_tokens: int = 4
    """Text-embedding tokens per caption of the embedded dataset (a fixed embedding per class)."""
    text_dim: int = 32
    """Width of the text embeddings (Flux joint_attention_dim) of the embedded dataset; folders bring their own."""
    pooled_dim: int = 16
    """Width of the pooled text embedding (Flux pooled_projection_dim) of the embedded dataset."""
    timestep_sampling: str = "logit_normal"
    """"logit_normal" (t = sigmoid(logit_mean + logit_std * z)) or "uniform"."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep distribution."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal timestep distribution."""
    sample_steps: int = 24
    """Euler steps of the sampler that draws RUN_DIR/samples_*.png."""
    sample_every: int = 0
    """Also draw a sample grid every this many steps (0 = only at the end of the run)."""
    sample_size: typing.Optional[tuple] = None
    """(height, width) of the sample grid's images; None = the largest training resolution."""


def check_diffusion(cfg, source: str = "config") -> None:
    """Reject diffusion settings seqpack cannot honour (ValueError naming the key)."""
    d = cfg.diffusion
    for key in ("patch_size", "single_layers", "num_images", "text_tokens", "text_dim", "pooled_dim", "sample_steps"):
        if getattr(d, key) < 1:
            raise ValueError(f"{source}: diffusion.{key}={getattr(d, key)!r} must be a positive integer")
    if d.timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"{source}: diffusion.timestep_sampling={d.timestep_sampling!r}: choose one of "
                         f"{', '.join(TIMESTEP_SAMPLING)}")
    for key, sizes in (("resolutions", d.resolutions), ("sample_size", (d.sample_size,) if d.sample_size else ())):
        for hw in sizes:
            if not (isinstance(hw, (tuple, list)) and len(hw) == 2 and all(isinstance(x, int) and x > 0 for x in hw)):
                raise ValueError(f"{source}: diffusion.{key} entry {hw!r} is not a (height, width) pair of ints")
            if hw[0] % d.patch_size or hw[1] % d.patch_size:
                raise ValueError(f"{source}: diffusion.{key} entry {tuple(hw)} is not divisible by "
                                 f"diffusion.patch_size={d.patch_size}; use multiples of {d.patch_size}")
    if cfg.model_type.lower() == "flux_from_hf" and cfg.ckpt.load_ckpt_info is None:
        raise ValueError(f"{source}: model_type='flux_from_hf' needs ckpt.load_ckpt_info=dict(path=DIFFUSERS_FOLDER)")
