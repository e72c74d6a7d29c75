"""The LLaVA task of ``seqpack train``: a local vision-language model folder (weights + processor) trained on a
JSONL of ``{"image", "messages"}`` samples, packed whole into rows.

Everything but the processor and the loader is the causal LM task's (:class:`seqpack.train.task.CausalLM`): the
model loads through ``seqpack.load_model`` (seqpack attention for the language model, SDPA for the vision tower),
the loss is the packed token-mean cross-entropy, and the HF export saves the processor with the weights.
"""

from __future__ import annotations

from ..train.model import model_source
from ..train.task import CausalLM
from .data import build_multimodal_loader, is_multimodal_folder, load_processor


def is_multimodal_run(cfg) -> bool:
    """True when the config's model folder (ckpt.load_ckpt_info) holds a vision-language model (LLaVA)."""
    return is_multimodal_folder(model_source(cfg))


class Llava(CausalLM):
    """Task: a vision-language model (LLaVA) on packed rows of whole (image, conversation) samples."""

    def tokenizer(self, cfg):
        """The folder's processor (tokenizer + image processor)."""
        return load_processor(model_source(cfg), cfg.model.trust_remote_code)

    def loader(self, cfg, processor, topo, vocab_size: int):
        """Rows of whole samples from the JSONL in ``data.train_folder`` (:func:`build_multimodal_loader`)."""
        return build_multimodal_loader(cfg, processor, topo)
