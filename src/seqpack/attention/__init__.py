"""Exact packed varlen attention and its transformers registration."""

from .hf import AttentionOptions, dispatch, register, seqpack_attention_forward
from .kernels import BACKENDS, AttnSpec, varlen_attention

__all__ = ["AttentionOptions", "AttnSpec", "BACKENDS", "dispatch", "register", "seqpack_attention_forward",
           "varlen_attention"]
