"""``seqpack bench flux``: Flux training steps on packed multi-resolution rows vs padded batches, and per-rank
activation memory for sp = 1, 2, 4 (CPU, fp32).

A batch of images at a mix of resolutions (latent token grids of aspect-ratio buckets, as a Flux fine-tune at
~256-512 px sees them, scaled down for a CPU) with a fixed-length text embedding each, through a small
diffusers ``FluxTransformer2DModel``:

- packed: one row, every sample ``[txt; img]`` attending only to itself (seqpack processor, ``packed_forward``);
- padded: the natural alternative — every image padded (bottom/right) to the largest grid of the batch, so the
  rotary ids stay right, a [B, L] batch through
  diffusers' own forward and processor with a key-padding ``attention_mask``; loss on real tokens only.

Per configuration: median forward + backward time, bytes autograd saves for backward (parameters excluded), and
the growth of the process's peak RSS during the step. The SP part runs the packed row over S gloo ranks (spawned
here) and reports the maxima over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from ..cli_types import positive_int
from .sp import spawn_ranks, write_rank_result

MODEL = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
             num_attention_heads=8, joint_attention_dim=256, pooled_projection_dim=128, axes_dims_rope=(8, 12, 12))
# latent token grids (VAE /8, patch 2) of a 256-512 px multi-resolution, multi-aspect fine-tune: 256^2, 384^2,
# 320x512, 512x320, 384x512, 512x384, 256x512, 512^2
GRIDS = [(16, 16), (24, 24), (20, 32), (32, 20), (24, 32), (32, 24), (16, 32), (32, 32)]
TEXT = 64


def batch(n: int, seed: int):
    """n samples with grids drawn from GRIDS (the first is always the largest, 32 x 32)."""
    import torch

    from seqpack.diffusion import FluxSample, image_position_ids

    g = torch.Generator().manual_seed(seed)
    grids = [(32, 32)] + [GRIDS[int(torch.randint(len(GRIDS), (1,), generator=g))] for _ in range(n - 1)]
    C = MODEL["in_channels"]
    return [FluxSample(img=torch.randn(h * w, C, generator=g), txt=torch.randn(TEXT, MODEL["joint_attention_dim"],
                       generator=g), pooled=torch.randn(MODEL["pooled_projection_dim"], generator=g),
                       img_ids=image_position_ids(h, w), txt_ids=torch.zeros(TEXT, 3),
                       timestep=float(torch.rand(1, generator=g)), target=torch.randn(h * w, C, generator=g))
            for h, w in grids], grids


def _model(seed: int, sp_group=None, seqpack_processor: bool = True):
    import torch
    from diffusers import FluxTransformer2DModel

    from seqpack.diffusion import install

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**MODEL).float()
    return install(model, sp_group=sp_group) if seqpack_processor else model


def _measure(step, params, steps: int) -> dict:
    """Run ``step()`` (forward + backward) once counting saved tensors, then ``steps`` timed times."""
    import torch

    from seqpack.bench.sp import _reset_peak, _status_kib

    saved: dict[int, int] = {}

    def pack_hook(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    base = _status_kib("VmRSS")
    reset = _reset_peak()
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")
    return dict(saved_mib=sum(saved.values()) / 2**20, step_s=statistics.median(times),
                peak_growth_mib=(peak - base) / 1024 if reset else float("nan"))


def _padded_step(samples, grids, seed: int):
    """The padded baseline: (model, step) through diffusers' own forward with a key-padding mask."""
    import torch

    from seqpack.diffusion import image_position_ids

    n = len(samples)
    H, W = max(h for h, _ in grids), max(w for _, w in grids)  # pad every image (bottom/right) to H x W
    L = H * W
    img = torch.zeros(n, L, MODEL["in_channels"])
    target = torch.zeros_like(img)
    valid = torch.zeros(n, L, dtype=torch.bool)
    for i, (s, (h, w)) in enumerate(zip(samples, grids)):
        at = (torch.arange(h)[:, None] * W + torch.arange(w)).reshape(-1)  # row-major cells of the h x w corner
        img[i, at], target[i, at], valid[i, at] = s.img, s.target, True
    ids = image_position_ids(H, W)
    mask = torch.cat([torch.ones(n, TEXT, dtype=torch.bool), valid], 1)[:, None, None, :]  # [B, 1, 1, Lt + L]
    model = _model(seed, seqpack_processor=False)
    txt, pooled = torch.stack([s.txt for s in samples]), torch.stack([s.pooled for s in samples])
    t = torch.tensor([s.timestep for s in samples])

    def step():
        out = model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t, img_ids=ids,
                    txt_ids=samples[0].txt_ids, joint_attention_kwargs={"attention_mask": mask}).sample
        (((out - target) ** 2).sum(-1) * valid).sum().backward()
        model.zero_grad(set_to_none=True)

    return model, step, n * (TEXT + L)


def _worker(rank: int, world: int, init_file: str, mode: str, n: int, steps: int, seed: int, out_dir: str) -> None:
    """One measurement in a fresh process (so peak RSS is this configuration's own)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    from seqpack.diffusion import pack_flux, packed_forward
    from seqpack.diffusion.objective import loss_sum

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        samples, grids = batch(n, seed)
        if mode == "padded":
            model, step, tokens = _padded_step(samples, grids, seed)
            local = tokens
        else:
            model = _model(seed, sp_group=dist.group.WORLD if world > 1 else None)
            row = pack_flux(samples, sp_size=world, sp_rank=rank)
            tokens, local = row.cu_seqlens[-1], row.perm.numel()

            def step():
                if world > 1:
                    dist.barrier()
                loss_sum(packed_forward(model, row), row).backward()
                model.zero_grad(set_to_none=True)

        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        result = dict(mode=mode, sp=world, tokens=tokens, local_T=local, real=sum(TEXT + h * w for h, w in grids),
                      **_measure(step, params, steps))
        write_rank_result(out_dir, rank, result)
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(mode: str, sp: int, n: int, steps: int, seed: int) -> dict:
    """``mode`` ("packed" or "padded") on ``sp`` fresh processes; maxima over ranks."""
    ranks = spawn_ranks(_worker, sp, mode, n, steps, seed)
    out = dict(ranks[0])
    out.update({k: max(r[k] for r in ranks) for k in ("local_T", "saved_mib", "peak_growth_mib", "step_s")})
    return out


EXAMPLES = "examples:\n  seqpack bench flux --samples 8 --steps 1"


def build_parser() -> argparse.ArgumentParser:
    """The options of this benchmark (also the source of its reference page)."""
    parser = argparse.ArgumentParser(prog="seqpack bench flux", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=positive_int, default=8, help="images per batch / packed row")
    parser.add_argument("--sp", type=positive_int, nargs="*", default=[1, 2, 4], help="SP degrees (empty: skip)")
    parser.add_argument("--steps", type=positive_int, default=2, help="timed steps after one counting step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and weights")
    parser.add_argument("--json", help="also write the results to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(f"flux {MODEL}; text {TEXT} tokens/sample; CPU fp32, 1 thread per process, {os.cpu_count()} cores")
    rows = [measure("packed", 1, args.samples, args.steps, args.seed),
            measure("padded", 1, args.samples, args.steps, args.seed)]
    _, grids = batch(args.samples, args.seed)
    print(f"batch of {args.samples} image grids: {grids}")
    pk = rows[0]
    print(f"\n{'mode':>7} {'tokens':>7} {'real':>6} {'step s':>7} {'x packed':>9} {'saved act MiB':>14} "
          f"{'x packed':>9} "
          f"{'peak growth MiB':>16} {'x packed':>9}")
    for r in rows:
        print(f"{r['mode']:>7} {r['tokens']:>7} {r['real']:>6} {r['step_s']:>7.2f} {r['step_s'] / pk['step_s']:>9.2f} "
              f"{r['saved_mib']:>14.1f} {r['saved_mib'] / pk['saved_mib']:>9.2f} {r['peak_growth_mib']:>16.1f} "
              f"{r['peak_growth_mib'] / pk['peak_growth_mib']:>9.2f}")
    sps = [rows[0] if s == 1 else measure("packed", s, args.samples, args.steps, args.seed) for s in args.sp]
    if sps:
        base = sps[0]
        print(f"\n{'sp':>3} {'T/S':>6} {'saved act MiB/rank':>19} {'x sp=' + str(base['sp']):>8} "
              f"{'peak growth MiB':>16} {'step s':>7}")
        for r in sps:
            print(f"{r['sp']:>3} {r['local_T']:>6} {r['saved_mib']:>19.1f} {r['saved_mib'] / base['saved_mib']:>8.2f} "
                  f"{r['peak_growth_mib']:>16.1f} {r['step_s']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=MODEL, grids=grids, packed_vs_padded=rows, sp=sps), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
