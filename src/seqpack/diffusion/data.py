"""Image data for Flux runs: the embedded procedural shapes, a local image/latent folder, patchify, packed rows.

Shape legend: C channels (3 for pixels, the VAE's for latents), H x W image, p patch size, L = (H/p)(W/p) image
tokens of one sample, Cin = C p^2, Lt text tokens, Dt text width, P pooled width.

Folder format (``data.train_folder``; nothing is downloaded — run your VAE and text encoder beforehand)::

    FOLDER/metadata.jsonl   one JSON object per line: {"file": "img/0001.png", "caption": "a red circle"}
                            "file": an image (.png/.jpg/.jpeg/.webp, trained in pixel space, scaled to [-1, 1])
                            or a cached latent (.pt holding a [C, H, W] tensor, trained as is)
    FOLDER/captions.pt      torch.save({caption: {"txt": Tensor[Lt, Dt], "pooled": Tensor[P]}, ...})

Every image side must be divisible by ``diffusion.patch_size``; every caption needs an entry in captions.pt.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..data.sources import iter_records
from .objective import interpolate, sample_timesteps
from .packing import FluxSample, image_position_ids

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SHAPES = [  # (caption, RGB) of the embedded classes
    ("a red circle", (230, 40, 40)), ("a green square", (40, 200, 60)), ("a blue triangle", (50, 90, 240)),
    ("a yellow cross", (240, 220, 40)), ("a magenta diamond", (220, 50, 220)), ("a cyan ring", (40, 220, 230)),
]
BACKGROUND = (24, 24, 32)


def patchify(x: torch.Tensor, p: int, where: str = "image") -> torch.Tensor:
    """[C, H, W] -> [(H/p)(W/p), C p p] row-major tokens, channels (c, dy, dx) per token."""
    C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"{where} is {H}x{W} (height x width), not divisible by patch_size={p}; crop or resize "
                         f"it to a multiple of {p}, or change diffusion.patch_size")
    return x.reshape(C, H // p, p, W // p, p).permute(1, 3, 0, 2, 4).reshape((H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """[(h)(w), C p p] tokens of an h x w token grid -> [C, h p, w p]."""
    C = tokens.shape[1] // (p * p)
    return tokens.reshape(h, w, C, p, p).permute(2, 0, 3, 1, 4).reshape(C, h * p, w * p)


def draw_shape(cls: int, h: int, w: int, rng: np.random.Generator) -> torch.Tensor:
    """One procedural image of class ``cls`` at h x w pixels -> [3, h, w] in [-1, 1] (drawn at 4x, downsampled)."""
    from PIL import Image, ImageDraw

    s = 4
    img = Image.new("RGB", (w * s, h * s), BACKGROUND)
    d = ImageDraw.Draw(img)
    side = min(h, w) * s * rng.uniform(0.5, 0.75)
    cx = w * s / 2 + rng.uniform(-0.12, 0.12) * w * s
    cy = h * s / 2 + rng.uniform(-0.12, 0.12) * h * s
    r, colour = side / 2, SHAPES[cls][1]
    box = (cx - r, cy - r, cx + r, cy + r)
    kind = cls % len(SHAPES)
    if kind == 0:
        d.ellipse(box, fill=colour)
    elif kind == 1:
        d.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=colour)
    elif kind == 2:
        d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=colour)
    elif kind == 3:
        t = 0.3 * r
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    elif kind == 4:
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:
        d.ellipse(box, outline=colour, width=max(1, int(0.35 * r)))
    img = img.resize((w, h), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def class_embeddings(num_classes: int, text_tokens: int, text_dim: int, pooled_dim: int) -> list[tuple]:
    """The fixed text embedding of each embedded class: [(txt [Lt, Dt], pooled [P])] (seeded, unit scale)."""
    g = torch.Generator().manual_seed(20240613)
    return [(torch.randn(text_tokens, text_dim, generator=g), torch.randn(pooled_dim, generator=g))
            for _ in range(num_classes)]


class ShapesDataset:
    """The embedded dataset: coloured shapes at a mix of resolutions, one fixed caption embedding per class.
    ``item(i)`` -> (image [3, H, W] in [-1, 1], txt [Lt, Dt], pooled [P]); deterministic in i."""

    def __init__(self, d, seed: int = 0):
        self.d, self.seed = d, seed
        for h, w in d.resolutions:
            patchify(torch.zeros(1, h, w), d.patch_size, where=f"diffusion.resolutions entry ({h}, {w})")
        self.classes = class_embeddings(len(SHAPES), d.text_tokens, d.text_dim, d.pooled_dim)
        self.captions = [c for c, _ in SHAPES]

    def __len__(self) -> int:
        return self.d.num_images

    def item(self, i: int):
        rng = np.random.default_rng([self.seed, i])
        cls = i % len(SHAPES)
        h, w = self.d.resolutions[int(rng.integers(len(self.d.resolutions)))]
        return (draw_shape(cls, h, w, rng), *self.classes[cls])

    def sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every item, without drawing them."""
        res = self.d.resolutions
        return [res[int(np.random.default_rng([self.seed, i]).integers(len(res)))] for i in range(len(self))]


class FolderDataset:
    """Images or cached latents with cached caption embeddings (format in the module docstring)."""

    def __init__(self, folder: str | Path, patch_size: int):
        from PIL import Image

        self.folder = Path(folder)
        meta, caps = self.folder / "metadata.jsonl", self.folder / "captions.pt"
        for f in (meta, caps):
            if not f.is_file():
                raise ValueError(f"data.train_folder={str(self.folder)!r} has no {f.name}; a Flux image folder holds "
                                 "metadata.jsonl and captions.pt (see seqpack.diffusion.data)")
        self.embeddings = torch.load(caps, weights_only=True)
        self.records, self._sizes, channels = [], [], None
        for where, rec in iter_records(meta):  # JSON Lines; invalid JSON names the file and line
            if not {"file", "caption"} <= rec.keys():
                raise ValueError(f"{where}: expected an object with \"file\" and \"caption\", got {str(rec)[:80]}")
            path = self.folder / rec["file"]
            if not path.is_file():
                raise ValueError(f"{where}: file {rec['file']!r} does not exist in {self.folder}")
            emb = self.embeddings.get(rec["caption"])
            if not isinstance(emb, dict) or not {"txt", "pooled"} <= emb.keys():
                raise ValueError(f"{where}: caption {rec['caption']!r} has no embedding in {caps} (expected "
                                 "{caption: {'txt': Tensor[Lt, Dt], 'pooled': Tensor[P]}}); encode it first")
            if path.suffix.lower() in IMAGE_SUFFIXES:
                w, h = Image.open(path).size
                c = 3
            elif path.suffix == ".pt":
                c, h, w = torch.load(path, weights_only=True).shape
            else:
                raise ValueError(f"{where}: {rec['file']!r} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor "
                                 "a cached latent (.pt)")
            patchify(torch.zeros(1, h, w), patch_size, where=f"{where}: {rec['file']}")
            if channels is not None and c != channels:
                raise ValueError(f"{where}: {rec['file']!r} has {c} channels but earlier files have {channels}; "
                                 "one folder holds either images or latents of one VAE")
            channels = c
            self.records.append((path, rec["caption"]))
            self._sizes.append((h, w))
        if not self.records:
            raise ValueError(f"{meta} lists no samples")

    def __len__(self) -> int:
        return len(self.records)

    def sizes(self) -> list[tuple[int, int]]:
        return list(self._sizes)

    def item(self, i: int):
        from PIL import Image

        path, caption = self.records[i]
        if path.suffix == ".pt":
            x = torch.load(path, weights_only=True).float()
        else:
            x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
            x = x.permute(2, 0, 1)
        emb = self.embeddings[caption]
        return x, emb["txt"].float(), emb["pooled"].float()


class FluxLoader:
    """Per optimizer step: this data-parallel rank's ``micro_num`` packed rows of training samples.

    Samples are visited in a shuffled order per epoch and packed greedily into rows of at most ``row_tokens``
    joint (text + image) tokens; every rank builds the same rows and takes its own. Timesteps and noise are drawn
    from a generator seeded by (seed, step, row), so a resumed run continues identically.
    State: ``{"epoch", "cursor", "step"}``."""

    def __init__(self, dataset, patch_size: int, row_tokens: int, micro_num: int, seed: int, dp_rank: int = 0,
                 dp_size: int = 1, timestep_sampling: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        self.dataset, self.p, self.row_tokens, self.micro_num = dataset, patch_size, row_tokens, micro_num
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.timesteps = (timestep_sampling, logit_mean, logit_std)
        text = dataset.item(0)[1].shape[0]
        self.tokens = [text + (h // patch_size) * (w // patch_size) for h, w in dataset.sizes()]
        if max(self.tokens) > row_tokens:
            i = int(np.argmax(self.tokens))
            raise ValueError(f"sample {i} has {self.tokens[i]} text + image tokens but a packed row holds "
                             f"data.seq_len * data.micro_bsz = {row_tokens}; raise data.seq_len")
        self.epoch, self.cursor, self.step = 0, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.step = state["epoch"], state["cursor"], state["step"]

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def _next_row(self) -> list[int]:
        """Indices of the next packed row (greedy in epoch order; a row never spans two epochs)."""
        order, row, used = self._order(), [], 0
        while True:
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
                if row:
                    return row
            i = order[self.cursor]
            if used + self.tokens[i] > self.row_tokens:
                return row
            row.append(i)
            used += self.tokens[i]
            self.cursor += 1

    def __iter__(self):
        return self

    def __next__(self) -> list[list[FluxSample]]:
        self.step += 1
        rows = [self._next_row() for _ in range(self.micro_num * self.dp_size)]
        mine = rows[self.dp_rank * self.micro_num:(self.dp_rank + 1) * self.micro_num]
        out = []
        for r, row in enumerate(mine):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step * 1009 + self.dp_rank * 101 + r)
            ts = sample_timesteps(len(row), g, *self.timesteps).tolist()
            out.append([self.training_sample(i, t, g) for i, t in zip(row, ts)])
        return out

    def training_sample(self, i: int, t: float, g: torch.Generator) -> FluxSample:
        x0, txt, pooled = self.dataset.item(i)
        h, w = x0.shape[1] // self.p, x0.shape[2] // self.p
        tokens = patchify(x0, self.p)
        xt, target = interpolate(tokens, torch.randn(tokens.shape, generator=g), t)
        return FluxSample(img=xt, txt=txt, pooled=pooled, img_ids=image_position_ids(h, w),
                          txt_ids=torch.zeros(txt.shape[0], 3), timestep=t, target=target)


def grid_image(images: list[torch.Tensor], cols: int, zoom: int = 4) -> "Image":
    """Images [3, H, W] in [-1, 1] (sizes may differ) -> one PIL grid, each cell as large as the largest image,
    every pixel drawn as a zoom x zoom block."""
    from PIL import Image

    H = max(x.shape[1] for x in images) * zoom + 4
    W = max(x.shape[2] for x in images) * zoom + 4
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * W, rows * H), (255, 255, 255))
    for k, x in enumerate(images):
        arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        cell = Image.fromarray(arr).resize((x.shape[2] * zoom, x.shape[1] * zoom), Image.NEAREST)
        grid.paste(cell, ((k % cols) * W + 2, (k // cols) * H + 2))
    return grid
