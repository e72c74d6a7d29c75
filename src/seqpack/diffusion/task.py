"""The Flux task of ``seqpack train`` (``model_type="flux"``): rectified flow on packed multi-resolution rows, with SP.

The training engine (:mod:`seqpack.train.loop`) runs the steps; this task builds the model and the loader and does
one step. One optimizer step (every rank):

    micro_num packed rows of samples (x_t, velocity target, text embedding, timestep) from FluxLoader (dp rank's)
      -> pack_flux(row, S, sp_rank): this rank's slice of the joint row [txt_i; img_i ...]
      -> C = squared errors of the whole step over all ranks (one all-reduce)
      -> per row: packed_forward -> sum of squared errors / C -> backward
      -> gradients summed over all ranks -> clip -> AdamW -> lr schedule
    end of run (and every diffusion.sample_every steps): Euler sampling of every class at several resolutions in
    one packed row -> RUN_DIR/samples_step*.png and RUN_DIR/samples.png

Parameters are replicated on every rank (gradients all-reduced); FSDP2 sharding of the packed Flux forward is not
wired (FSDP2's hooks run on module ``forward`` calls, and the packed forward calls the blocks' submodules).

    seqpack train --model_type flux                       # embedded procedural shapes, CPU, a few minutes
    seqpack train configs/flux_demo.py --nproc 2 --parallel.tensor.size 2
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..atomic import folder_swap
from ..parallel import all_reduce_gradients
from ..parallel.comm import all_reduce_sum
from ..train.task import RunParts
from .data import FluxLoader, FolderDataset, ShapesDataset, grid_image, unpatchify
from .flux import SeqpackFluxAttnProcessor, install, packed_forward
from .objective import euler_sample, loss_count, loss_sum
from .packing import FluxSample, image_position_ids, pack_flux


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux's (index, row, column) rotary split of the head dim: even parts summing to head_dim, most of it for
    the two spatial axes (Flux.1: 16/56/56 of 128), so that even small heads see several frequencies per axis."""
    a = 2 * ((head_dim - max(2, 2 * (head_dim // 16))) // 4)
    return head_dim - 2 * a, a, a


def build_flux(cfg, in_channels: int, text_dim: int, pooled_dim: int, topo):
    """The Flux transformer of the run (from scratch, or a local diffusers folder), seqpack processor installed."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(cfg.train.seed)
    info, m = cfg.ckpt.load_ckpt_info, cfg.model
    if info is not None:
        path = info.path.removeprefix("local:")
        if not Path(path).is_dir():
            raise ValueError(f"ckpt.load_ckpt_info.path={path!r} is not a local diffusers folder")
        sub = Path(path) / "transformer"
        model = FluxTransformer2DModel.from_pretrained(sub if sub.is_dir() else path, torch_dtype=torch.float32)
        got = (model.config.in_channels, model.config.joint_attention_dim, model.config.pooled_projection_dim)
        if got != (in_channels, text_dim, pooled_dim):
            raise ValueError(f"{path}: the model takes (in_channels, joint_attention_dim, pooled_projection_dim) = "
                             f"{got} but the data gives {(in_channels, text_dim, pooled_dim)}")
    else:
        if m.hidden_size % m.num_attention_heads or (m.hidden_size // m.num_attention_heads) % 2:
            raise ValueError(f"model.hidden_size={m.hidden_size} must be num_attention_heads="
                             f"{m.num_attention_heads} times an even head dim")
        head_dim = m.hidden_size // m.num_attention_heads
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=in_channels, num_layers=m.num_layers,
            num_single_layers=cfg.diffusion.single_layers, attention_head_dim=head_dim,
            num_attention_heads=m.num_attention_heads, joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim,
            guidance_embeds=False, axes_dims_rope=rope_axes(head_dim))
    model = model.float().to(topo.device).train()
    ulysses = getattr(topo, "ulysses_size", topo.sp_size)  # 2D: the heads are split over the Ulysses ranks only
    if ulysses > 1:
        from ..parallel.heads import plan_heads

        plan_heads(model.config.num_attention_heads, model.config.num_attention_heads, ulysses)
    groups = topo.attention_groups() if hasattr(topo, "attention_groups") else dict(sp_group=topo.sp_group)
    return install(model, backend=m.attn_backend, **groups)


def build_data(cfg, topo) -> FluxLoader:
    d, f = cfg.data, cfg.diffusion
    if d.train_folder is None:
        dataset = ShapesDataset(f, seed=d.seed)
    else:
        folder = d.train_folder.removeprefix("local:")
        if not Path(folder).is_dir():
            raise ValueError(f"data.train_folder={folder!r} does not exist; give a Flux image folder "
                             "(metadata.jsonl + captions.pt, see seqpack.diffusion.data)")
        dataset = FolderDataset(folder, f.patch_size)
    return FluxLoader(dataset, f.patch_size, d.seq_len * d.micro_bsz, d.micro_num, d.seed, topo.dp_rank,
                      topo.dp_size, f.timestep_sampling, f.logit_mean, f.logit_std)


class Flux:
    """Task (:mod:`seqpack.train.task`): a diffusers Flux transformer trained with rectified flow on packed rows of
    multi-resolution images, parameters replicated on every rank, gradients all-reduced."""

    def build(self, cfg, topo) -> RunParts:
        """No tokenizer (the data brings text embeddings); the loader first (its data fixes the model's widths)."""
        loader = build_data(cfg, topo)
        x0, txt, pooled = loader.dataset.item(0)
        p = cfg.diffusion.patch_size
        model = build_flux(cfg, x0.shape[0] * p * p, txt.shape[1], pooled.shape[0], topo)
        n_params = sum(q.numel() for q in model.parameters())
        return RunParts(None, model, loader, n_params, n_params)

    def prepare(self, rows: list, topo) -> list:
        """This rank's share of each packed joint row (``pack_flux``), on the host."""
        return [pack_flux(row, topo.sp_size, topo.sp_rank, getattr(topo, "ring_size", 1)) for row in rows]

    def begin(self, cfg, parts: RunParts, topo, run_dir: Path, start_step: int) -> None:
        """A new run draws the sample grid of the initial weights (``samples_step000000.png``)."""
        if start_step == 0:
            write_samples(parts.model, parts.loader, cfg, topo, run_dir, 0)

    def step(self, cfg, model, micro: list, topo) -> float:
        """Forward + backward of every row; the loss is the mean squared error over the whole step (all rows, all
        ranks); gradients summed over all ranks (replicated parameters)."""
        shards = [s.to(topo.device) for s in micro]
        checkpoint = bool(float(cfg.model.checkpoint))
        count = int(all_reduce_sum(torch.tensor(sum(loss_count(s) for s in shards), device=topo.device),
                                   topo.world_group))
        local = torch.zeros((), dtype=torch.float64, device=topo.device)
        for s in shards:
            loss = loss_sum(packed_forward(model, s, checkpoint=checkpoint), s) / count
            loss.backward()
            local += loss.detach()
        all_reduce_gradients(model, topo.world_group)  # replicated parameters: sum over SP and DP ranks
        return float(all_reduce_sum(local, topo.world_group))

    def work(self, parts: RunParts, rows: list, micro: list, topo) -> tuple[float, float]:
        """(tokens of this rank's slices, 6 x parameters x those tokens)."""
        tokens = sum(s.img.shape[1] + s.txt.shape[1] for s in micro)
        return tokens, 6.0 * parts.flop_params * tokens

    def after_step(self, cfg, parts: RunParts, topo, run_dir: Path, step: int, last: int) -> None:
        """The sample grid at the end of the run and every ``diffusion.sample_every`` steps."""
        every = cfg.diffusion.sample_every
        if step == last or (every and step % every == 0):
            write_samples(parts.model, parts.loader, cfg, topo, run_dir, step)

    def describe(self, cfg, parts: RunParts, topo, run_dir: Path, peak) -> str:
        return (f"seqpack train (flux): {run_dir}  FluxTransformer2DModel {parts.params / 1e6:.2f}M params  "
                f"world={topo.world_size} (dp={topo.dp_size}, sp={topo.sp_size}"
                + (f" = {topo.ring_size} ring x {topo.ulysses_size} ulysses" if getattr(topo, "ring_size", 1) > 1
                   else "") + f")  {len(parts.loader.dataset)} images, "
                f"rows of <= {parts.loader.row_tokens} tokens")

    def export(self, cfg, parts: RunParts, run_dir: Path) -> Path:
        """A diffusers folder ``RUN_DIR/diffusers`` (written by rank 0)."""
        out_dir = run_dir / "diffusers"
        if not dist.is_initialized() or dist.get_rank() == 0:
            with folder_swap(out_dir) as tmp:  # a full disk leaves the previous export, never half of one
                parts.model.save_pretrained(tmp)
        return out_dir

    def outputs(self, run_dir: Path, exported: Path | None) -> str:
        return f"samples {run_dir / 'samples.png'}" + (f", diffusers export {exported}" if exported else "")


@torch.no_grad()
def generate(model, loader: FluxLoader, sizes: list[tuple[int, int]], per_class: int, steps: int, seed: int,
             device) -> list[torch.Tensor]:
    """Euler-sample ``per_class`` images of every class (one packed row; image i has size sizes[i % len]) ->
    images [C, H, W], class-major. Embedded dataset: the class embeddings; a folder: its first captions."""
    p, ds = loader.p, loader.dataset
    conds = ds.classes if isinstance(ds, ShapesDataset) else [ds.item(i)[1:] for i in range(min(6, len(ds)))]
    g = torch.Generator().manual_seed(seed)
    specs = [(c, sizes[k % len(sizes)]) for c in range(len(conds)) for k in range(per_class)]
    channels = ds.item(0)[0].shape[0] * p * p
    noise = [torch.randn((h // p) * (w // p), channels, generator=g) for _, (h, w) in specs]

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:  # x: all samples' tokens concatenated [sum L, Cin]
        parts = x.split([n.shape[0] for n in noise])
        samples = [FluxSample(img=xi, txt=conds[c][0], pooled=conds[c][1], img_ids=image_position_ids(h // p, w // p),
                              txt_ids=torch.zeros(conds[c][0].shape[0], 3), timestep=t)
                   for xi, (c, (h, w)) in zip(parts, specs)]
        return packed_forward(model, pack_flux(samples).to(device))[0].cpu()

    model.eval()
    try:
        x = euler_sample(velocity, torch.cat(noise), steps)
    finally:
        model.train()
    return [unpatchify(xi, h // p, w // p, p) for xi, (_, (h, w)) in zip(x.split([n.shape[0] for n in noise]), specs)]


def write_samples(model, loader: FluxLoader, cfg, topo, run_dir: Path, step: int) -> Path | None:
    """Rank 0 draws the sample grid (classes x resolutions) into RUN_DIR/samples_step{step}.png and samples.png."""
    out = None
    if topo.rank == 0:
        f = cfg.diffusion
        res = sorted(set(loader.dataset.sizes()), key=lambda s: s[0] * s[1])
        sizes = [tuple(f.sample_size)] if f.sample_size else [res[0], res[len(res) // 2], res[-1], res[-1]]
        procs = model.attn_processors
        model.set_attn_processor(SeqpackFluxAttnProcessor(cfg.model.attn_backend))  # one process, no SP group
        try:
            images = generate(model, loader, sizes, len(sizes), f.sample_steps, cfg.train.seed + 7, topo.device)
        finally:
            model.set_attn_processor(procs)
        if images[0].shape[0] != 3:
            images = [x[:3] for x in images]  # latents: show the first three channels
        out = run_dir / f"samples_step{step:06d}.png"
        grid_image(images, cols=len(sizes)).save(out)
        shutil.copyfile(out, run_dir / "samples.png")
    if dist.is_initialized():
        dist.barrier()
    return out


__all__ = ["Flux", "build_flux", "generate", "write_samples"]
