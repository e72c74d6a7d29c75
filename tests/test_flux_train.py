"""`seqpack train` with model_type="flux": loss falls, the sample PNG is written, a checkpoint resumes exactly,
the image-folder path trains, and bad input gives a clear error."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from seqpack.cli import main
from seqpack.diffusion.data import patchify, unpatchify
from seqpack.train import load_config
from seqpack.tasks import train

TINY = ["--model_type", "flux", "--model.hidden_size", "32", "--model.num_layers", "1",
        "--model.num_attention_heads", "2", "--diffusion.single_layers", "1", "--diffusion.resolutions",
        "((8, 8), (8, 16), (16, 8))", "--diffusion.num_images", "48", "--diffusion.sample_steps", "2",
        "--data.seq_len", "96", "--data.micro_num", "2", "--adam.lr", "3e-3", "--lr_scheduler.warmup_ratio", "0",
        "--train.tensorboard", "False", "--ckpt.checkpoint_every", "3", "--ckpt.export_hf", "False"]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_flux_train_learns_writes_png_and_resumes(tmp_path):
    steps = ["--lr_scheduler.total_steps", "8"]
    full = train(load_config(None, TINY + steps + ["--train.run_dir", str(tmp_path / "full")]))
    losses = _losses(full.run_dir)
    assert len(losses) == 8
    assert sum(losses[s] for s in (7, 8)) / 2 < 0.8 * losses[1], losses  # rectified-flow loss falls
    png = Image.open(full.run_dir / "samples.png")
    assert png.size[0] > 100 and (full.run_dir / "samples_step000000.png").is_file()

    cut = tmp_path / "cut"  # the same run, interrupted after step 3 (its checkpoint), then resumed by the CLI
    train(load_config(None, TINY + steps + ["--train.run_dir", str(cut), "--train.max_steps", "3"]))
    assert main(["train", *TINY, *steps, "--run_dir", str(cut)]) == 0
    resumed = _losses(cut)
    assert sorted(resumed) == list(range(1, 9))
    for s in range(4, 9):  # same data, noise, timesteps and optimizer state: the same trajectory
        assert resumed[s] == pytest.approx(losses[s], rel=1e-5), (s, resumed[s], losses[s])


def _folder(tmp, sizes, captions, embedded, latents=False):
    tmp.mkdir()
    g = torch.Generator().manual_seed(0)
    lines = []
    for i, ((h, w), cap) in enumerate(zip(sizes, captions)):
        if latents:
            torch.save(torch.randn(4, h, w, generator=g), tmp / f"{i}.pt")
            lines.append(json.dumps({"file": f"{i}.pt", "caption": cap}))
        else:
            arr = (np.random.default_rng(i).random((h, w, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp / f"{i}.png")
            lines.append(json.dumps({"file": f"{i}.png", "caption": cap}))
    (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    torch.save({c: {"txt": torch.randn(3, 8, generator=g), "pooled": torch.randn(6, generator=g)} for c in embedded},
               tmp / "captions.pt")
    return tmp


def test_flux_trains_from_a_latent_folder(tmp_path):
    folder = _folder(tmp_path / "lat", [(8, 8), (16, 8), (8, 12)], ["a", "b", "a"], ["a", "b"], latents=True)
    args = TINY + ["--diffusion.patch_size", "2", "--data.train_folder", str(folder), "--lr_scheduler.total_steps",
                   "2", "--train.run_dir", str(tmp_path / "run")]
    result = train(load_config(None, args))
    assert result.steps == 2 and (result.run_dir / "samples.png").is_file()


@pytest.mark.parametrize("sizes, captions, embedded, message", [
    ([(8, 8), (10, 8)], ["a", "a"], ["a"], r"metadata.jsonl line 2: 1.png is 10x8 .* not divisible by patch_size=4"),
    ([(8, 8), (8, 8)], ["a", "zebra"], ["a"], r"metadata.jsonl line 2: caption 'zebra' has no embedding in"),
])
def test_flux_folder_bad_input(tmp_path, capsys, sizes, captions, embedded, message):
    folder = _folder(tmp_path / "img", sizes, captions, embedded)
    args = TINY + ["--data.train_folder", str(folder), "--lr_scheduler.total_steps", "1"]
    with pytest.raises(ValueError, match=message):
        train(load_config(None, args + ["--train.run_dir", str(tmp_path / "run")]))
    assert main(["train", *args, "--run_dir", str(tmp_path / "run2")]) == 2  # the CLI: a message, exit code 2
    assert re.search(message, capsys.readouterr().err)


def test_flux_config_errors():
    with pytest.raises(ValueError, match=r"diffusion.resolutions entry \(10, 8\) is not divisible by"):
        load_config(None, TINY + ["--diffusion.resolutions", "((10, 8),)"])
    with pytest.raises(ValueError, match="diffusion.timestep_sampling='cosine'"):
        load_config(None, TINY + ["--diffusion.timestep_sampling", "cosine"])


def test_patchify_roundtrip_and_error():
    x = torch.randn(3, 8, 12)
    tok = patchify(x, 4)
    assert tok.shape == (6, 48)
    torch.testing.assert_close(unpatchify(tok, 2, 3, 4), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="image is 8x10 .* not divisible by patch_size=4"):
        patchify(torch.zeros(3, 8, 10), 4)
