"""Vision-language models (LLaVA-1.5): packed multimodal rows, sequence parallel over the language model, and the
``seqpack train`` data path.

    from seqpack.multimodal import pack_multimodal
    model = seqpack.dispatch(llava)                          # language model: seqpack; vision tower: sdpa
    row = pack_multimodal(samples, processor)                # [{"images": [...], "messages": [...]}, ...]
    loss = seqpack.causal_lm_loss(model(**row.model_inputs()).logits, row.shift_labels)

Files: batch.py (samples -> packed row), data.py (JSONL of {"image", "messages"} -> loader of ``seqpack train``),
task.py (the LLaVA run of ``seqpack train``). The attention of each sub-model and the SP split after the image
merge: :mod:`seqpack.attention.multimodal`.
"""

from ..attention.multimodal import attn_implementation_for, is_multimodal, prepare_multimodal
from .batch import MultimodalBatch, encode_sample, pack_multimodal
from .data import MultimodalLoader, read_records

__all__ = ["MultimodalBatch", "MultimodalLoader", "attn_implementation_for", "encode_sample", "is_multimodal",
           "pack_multimodal", "prepare_multimodal", "read_records"]
