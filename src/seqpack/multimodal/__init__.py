"""Vision-language models (LLaVA-1.5): packed multimodal rows, sequence parallel over the language model, and the
``seqpack train`` data path. Files: model.py (attention per sub-model, SP split hook), batch.py (samples ->
packed row), data.py (JSONL of {"image", "messages"} -> loader)."""

from .model import attn_implementation_for, is_multimodal, prepare_multimodal

__all__ = ["attn_implementation_for", "is_multimodal", "prepare_multimodal"]
