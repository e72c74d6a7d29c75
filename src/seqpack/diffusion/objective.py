"""Rectified flow: the training objective and the Euler sampler.

Shape legend: n samples, L image tokens of one sample, C channels per token (patchified), ti local image tokens.

Data x0 and noise e are joined by the straight line x_t = (1 - t) x0 + t e, t in [0, 1]; the model predicts the
velocity v = e - x0 (constant along the line). Timesteps are drawn logit-normal (t = sigmoid(m + s z), SD3 /
Flux fine-tuning practice) or uniform. The step loss is the mean squared error over every valid image-token
channel of the whole optimizer step (all micro-batches, SP and DP ranks): each rank backpropagates its local sum
divided by the global count, and gradients are summed over ranks (seqpack's convention), so the update equals
one process on the whole step.

Sampling integrates dx/dt = v from t = 1 (noise) to t = 0 with Euler steps.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..train.config_diffusion import TIMESTEP_SAMPLING
from .packing import FluxRow


def sample_timesteps(n: int, generator: torch.Generator, mode: str = "logit_normal", mean: float = 0.0,
                     std: float = 1.0) -> torch.Tensor:
    """[n] timesteps in (0, 1)."""
    if mode == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"timestep sampling {mode!r} is not known; choose one of {', '.join(TIMESTEP_SAMPLING)}")


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for data x0 [L, C], noise [L, C] at time t."""
    return (1 - t) * x0 + t * noise, noise - x0


def loss_sum(pred: torch.Tensor, row: FluxRow) -> torch.Tensor:
    """Sum of squared errors over this rank's valid image tokens. pred/row.target [1, ti, C] -> scalar."""
    err = (pred.float() - row.target.float()) ** 2
    return (err.sum(-1) * row.img_valid.to(err.dtype)).sum()


def loss_count(row: FluxRow) -> int:
    """Number of squared errors :func:`loss_sum` adds up on this rank."""
    return int(row.img_valid.sum()) * row.target.shape[-1]


@torch.no_grad()
def euler_sample(velocity: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor,
                 steps: int) -> torch.Tensor:
    """Integrate from noise (t = 1) to data (t = 0). ``velocity(x_t, t)`` -> v, same shape as ``noise``.

        >>> x0 = torch.ones(3, 2)
        >>> torch.allclose(euler_sample(lambda x, t: (x - x0) / max(t, 1e-9), torch.zeros(3, 2), 4), x0)
        True
    """
    x = noise
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t, t_next in zip(ts, ts[1:]):
        x = x + (t_next - t) * velocity(x, t)
    return x
