"""State-space models (transformers' Mamba, Mamba-2) on packed rows: state and convolution reset per document."""

from .adapter import adapt_ssm, install_guard, register_ssm_models
from .config import SSM_MODEL_TYPES, is_ssm
from .segments import Segments

__all__ = ["SSM_MODEL_TYPES", "Segments", "adapt_ssm", "install_guard", "is_ssm", "register_ssm_models"]
