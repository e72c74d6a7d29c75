"""Step-level operations: what one training step computes, applied to a model from outside — the packed causal LM
loss, the chunked linear cross-entropy (no [T, V] logits), the tiled MLP and Liger's fused kernels.

    loss = seqpack.ops.causal_lm_loss(model(**batch.model_inputs()).logits, batch)
    seqpack.ops.enable_chunked_loss(model, chunk_size=1024)       # model(..., chunked_loss_labels=...) -> summed CE
    seqpack.ops.apply_tiled_mlp(model, tile=2048)                 # MLP over sequence tiles, recomputed in backward

Files: loss.py (token-mean CE over a packed batch), chunked_loss.py (CE from hidden states, in-forward hook),
tiled_mlp.py (ALST's tiled MLP), checkpoint_offload.py (checkpointed layers' inputs in host memory), fused.py
(Liger kernels per model instance), layers.py (a model's decoder layers).
"""

from .checkpoint_offload import offload_checkpoints
from .chunked_loss import chunked_causal_lm_loss, enable_chunked_loss, linear_cross_entropy_sum
from .fused import apply_fused_kernels
from .loss import causal_lm_loss, token_loss_sum
from .tiled_mlp import apply_tiled_mlp

__all__ = ["apply_fused_kernels", "apply_tiled_mlp", "causal_lm_loss", "chunked_causal_lm_loss",
           "enable_chunked_loss", "linear_cross_entropy_sum", "offload_checkpoints", "token_loss_sum"]
