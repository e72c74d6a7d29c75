"""Tiny diffusers Flux models and samples shared by the Flux tests (built from a config; nothing downloads)."""

import torch
from diffusers import FluxTransformer2DModel

from seqpack.diffusion import FluxSample, image_position_ids

TXT_DIM, POOLED = 16, 8


def tiny_flux(heads: int = 4, seed: int = 0, guidance: bool = False) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=12, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=heads, joint_attention_dim=TXT_DIM,
                                   pooled_projection_dim=POOLED, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make the AdaLN gates clearly non-zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.float()


def sample(g: torch.Generator, h: int, w: int, text_len: int, t: float) -> FluxSample:
    return FluxSample(img=torch.randn(h * w, 12, generator=g), txt=torch.randn(text_len, TXT_DIM, generator=g),
                      pooled=torch.randn(POOLED, generator=g), img_ids=image_position_ids(h, w),
                      txt_ids=torch.zeros(text_len, 3), timestep=t, target=torch.randn(h * w, 12, generator=g))


def reference(model, s: FluxSample) -> torch.Tensor:
    """The unmodified diffusers forward of one sample alone -> [Li, Cout]."""
    return model(hidden_states=s.img[None], encoder_hidden_states=s.txt[None], pooled_projections=s.pooled[None],
                 timestep=torch.tensor([s.timestep]), img_ids=s.img_ids, txt_ids=s.txt_ids).sample[0]
