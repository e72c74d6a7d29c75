"""Data pipeline: ftdp files, tokenization, packing strategies, mixing and the resumable loader."""

from .corpus import default_documents, default_token_docs, default_tokenizer

__all__ = ["default_documents", "default_token_docs", "default_tokenizer"]
