"""Checkpoint conversion between InternEvo (``model_tp{t}_pp{p}.pt`` + ``model_config.pt``) and Hugging Face
folders for InternLM and InternLM2; see :mod:`seqpack.convert.api` and ``seqpack convert --help``."""

from .api import Summary, hf_to_internevo, internevo_to_hf

__all__ = ["Summary", "hf_to_internevo", "internevo_to_hf"]
