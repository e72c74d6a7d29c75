"""Packed multimodal rows: several (image(s), conversation) samples in one row for a LLaVA-style model.

Shape legend: T tokens of the row, n samples, I images of the row, C/H_img/W_img image channels/size, S SP degree.

Each sample's conversation is rendered with the tokenizer's chat template (loss only on assistant tokens, as
``seqpack tokenize`` does); every image placeholder (``processor.image_token``, e.g. ``<image>``, written in a
message's content) is expanded to as many placeholder tokens as the image has features, so the model's
``masked_scatter`` puts each image's features inside its own sample. Positions restart per sample
(``cu_seqlens``), image tokens never carry a target, and the images of the row are stacked in sample order.

    >>> row = pack_multimodal([
    ...     {"images": [img_a], "messages": [{"role": "user", "content": "<image>\\nWhat is it?"},
    ...                                      {"role": "assistant", "content": "A red square."}]},
    ...     {"images": [img_b], "messages": [...]}], processor)                 # doctest: +SKIP
    >>> out = model(**row.model_inputs())                                      # doctest: +SKIP
    >>> loss = seqpack.causal_lm_loss(out.logits, row.shift_labels)            # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..batch import IGNORE_INDEX, PackedBatch, pack
from ..data.sources import encode_chat
from ..parallel.ring_split import SplitPlan


@dataclass
class MultimodalBatch:
    """One packed multimodal row, or (after :meth:`shard`) one SP rank's view of it.

    text              PackedBatch [1, T]: ids (image placeholders expanded), shift_labels, positions, cu_seqlens
    pixel_values      [I, C, H_img, W_img] float, the row's images in sample order (None: no image in the row)
    images_per_sample n ints (a trailing pad segment has none)
    sp_size, sp_rank  S and this rank; the model still gets the WHOLE row (its image features are merged before
                      the split, :mod:`seqpack.attention.multimodal`); ``shift_labels`` is this rank's share
    ring_size         C of 2D sequence parallel (S = C ring x S/C Ulysses ranks); > 1: this rank's share is its
                      chunks of the ring's balanced split (:mod:`seqpack.parallel.ring_split`), as for text rows
    """

    text: PackedBatch
    pixel_values: torch.Tensor | None
    images_per_sample: tuple
    sp_size: int = 1
    sp_rank: int = 0
    ring_size: int = 1

    @property
    def input_ids(self) -> torch.Tensor:
        return self.text.input_ids

    @property
    def position_ids(self) -> torch.Tensor:
        return self.text.position_ids

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return self.text.cu_seqlens

    @property
    def max_seqlen(self) -> int:
        return self.text.max_seqlen

    @property
    def num_tokens(self) -> int:
        """Tokens whose logits this rank computes: T, or T/S after :meth:`shard`."""
        return self.text.num_tokens // self.sp_size

    @property
    def split(self) -> SplitPlan:
        """How the row is split over the SP group (the language model's pre-hook cuts its embeddings the same way)."""
        return SplitPlan(ring=self.ring_size, ulysses=self.sp_size // self.ring_size)

    @property
    def shift_labels(self) -> torch.Tensor:
        """[1, T/S] targets of this rank's tokens (labels were shifted before the split)."""
        labels = self.text.shift_labels
        return labels[:, self.split.cut(self.text.cu_seqlens.tolist(), self.sp_rank, labels.device)]

    @property
    def num_valid_targets(self) -> int:
        return int((self.shift_labels != IGNORE_INDEX).sum())

    def model_inputs(self, with_labels: bool = False) -> dict:
        """``model(**...)`` keywords: the whole row's ids, positions and packed metadata, plus ``pixel_values``;
        ``with_labels`` adds this rank's ``labels``/``shift_labels``."""
        inputs = self.text.model_inputs()
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values
        if with_labels:
            inputs.update(labels=self.shift_labels, shift_labels=self.shift_labels)
        return inputs

    def map_tensors(self, fn) -> "MultimodalBatch":
        """A copy with ``fn`` applied to every tensor (ids, labels, positions, cu_seqlens, pixel values), e.g.
        ``lambda t: t.to(device, non_blocking=True)`` or ``torch.Tensor.pin_memory``; no re-validation."""
        pixels = fn(self.pixel_values) if self.pixel_values is not None else None
        return replace(self, text=self.text.map_tensors(fn), pixel_values=pixels)

    def to(self, device) -> "MultimodalBatch":
        return self.map_tensors(lambda t: t.to(device))

    def shard(self, sp_size: int, sp_rank: int, pad_token_id: int = 0, ring_size: int = 1) -> "MultimodalBatch":
        """This rank's view for sequence parallel: the row padded to a multiple of ``sp_size`` (with a ring: of
        16 x ``sp_size``; one dummy segment with -100 labels) and ``shift_labels`` cut to rank ``sp_rank``'s
        tokens, as :func:`seqpack.parallel.shard_batch` cuts a text row. ``shard_batch`` calls it."""
        from ..parallel.shard import pad_to_multiple

        if sp_size < 1 or not 0 <= sp_rank < sp_size:
            raise ValueError(f"invalid sequence parallel position sp_rank={sp_rank} of sp_size={sp_size}")
        if ring_size < 1 or sp_size % ring_size:
            raise ValueError(f"ring_size={ring_size} must be a positive divisor of sp_size={sp_size}")
        if self.sp_size != 1:
            raise ValueError("this MultimodalBatch is already sharded; shard the whole row")
        if self.text.num_tokens < sp_size:
            raise ValueError(f"sequence parallel degree sp={sp_size} is larger than the packed row "
                             f"({self.text.num_tokens} tokens); pack longer rows or use a smaller sp")
        plan = SplitPlan(ring=ring_size, ulysses=sp_size // ring_size)
        text = pad_to_multiple(self.text, plan.multiple, pad_token_id)
        extra = (0,) if text is not self.text else ()
        return replace(self, text=text, images_per_sample=tuple(self.images_per_sample) + extra,
                       sp_size=sp_size, sp_rank=sp_rank, ring_size=ring_size)


def load_image(image, where: str = "sample"):
    """A PIL image in RGB from a PIL image or a local path (ValueError naming the path when it cannot be read)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"{where}: cannot read image {os.fspath(image)!r}: {err}") from err
    raise TypeError(f"{where}: an image must be a PIL image or a local path, got {type(image).__name__}")


def image_token_counts(processor, image_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Placeholder tokens per image of size (height, width), as the processor's own rule computes them
    (LLaVA-1.5: (crop / patch)² patches, the CLS feature dropped by the "default" selection strategy)."""
    if not image_sizes:
        return []
    data = processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in image_sizes])
    return list(data.num_image_tokens)


def encode_sample(processor, messages, image_sizes: Sequence[tuple[int, int]], where: str = "sample"
                  ) -> tuple[list[int], list[bool]]:
    """(ids, loss mask) of one conversation; the k-th image placeholder is expanded to the k-th image's feature
    count, with no loss on image tokens. ValueError (naming ``where``) when placeholders and images disagree."""
    ids, mask = encode_chat(processor.tokenizer, messages, where)
    image_id = processor.image_token_id
    if ids.count(image_id) != len(image_sizes):
        raise ValueError(f"{where}: the conversation has {ids.count(image_id)} image placeholder(s) "
                         f"{processor.image_token!r} but {len(image_sizes)} image(s) were given; write one "
                         f"{processor.image_token!r} in the message content where each image goes")
    counts = iter(image_token_counts(processor, image_sizes))
    out_ids, out_mask = [], []
    for tok, m in zip(ids, mask):
        n = next(counts) if tok == image_id else 1
        out_ids += [tok] * n
        out_mask += [m and tok != image_id] * n
    return out_ids, out_mask


def pack_multimodal(samples: Sequence[dict], processor, pad_to: int | None = None,
                    pad_token_id: int | None = None) -> MultimodalBatch:
    """Pack samples ``{"messages": [...], "images": [PIL image or path, ...]}`` (``"image"``: one image) into one
    row with ``processor`` (a LlavaProcessor: tokenizer with a chat template + image processor). ``pad_to`` pads
    the row to that many tokens (one pad segment, no loss)."""
    if not samples:
        raise ValueError("pack_multimodal() got no samples; give at least one")
    docs, masks, images, per_sample = [], [], [], []
    for i, sample in enumerate(samples):
        where = sample.get("where", f"sample {i}") if isinstance(sample, dict) else f"sample {i}"
        if not isinstance(sample, dict) or "messages" not in sample:
            raise ValueError(f"{where}: a multimodal sample is a dict with 'messages' and 'images' (or 'image')")
        pics = [load_image(x, where) for x in sample_images(sample, where)]
        ids, mask = encode_sample(processor, sample["messages"], [(p.height, p.width) for p in pics], where)
        docs.append(ids)
        masks.append(mask)
        images += pics
        per_sample.append(len(pics))
    pad_id = pad_token_id if pad_token_id is not None else (processor.tokenizer.pad_token_id or 0)
    text = pack(docs, loss_masks=masks, pad_to=pad_to, pad_token_id=pad_id)
    if text.num_tokens > sum(map(len, docs)):
        per_sample.append(0)  # the pad segment
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"] if images else None
    return MultimodalBatch(text=text, pixel_values=pixels, images_per_sample=tuple(per_sample))


def sample_images(sample: dict, where: str) -> list:
    """The images of a sample: ``"images"`` (a list) or ``"image"`` (one, or None for a text-only sample)."""
    if "images" in sample and "image" in sample:
        raise ValueError(f"{where}: give 'image' or 'images', not both")
    images = sample.get("images", sample.get("image"))
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]
