"""seqpack: packed variable-length training and sequence parallelism for Hugging Face causal LMs.

    import seqpack                                   # registers attn_implementation="seqpack" and native models
    batch = seqpack.pack([[5, 6, 7], [8, 9]])
    model = seqpack.dispatch(model)
    loss = seqpack.causal_lm_loss(model(**batch.model_inputs()).logits, batch)
"""

from .versions import check_versions

check_versions()  # before anything that relies on them: a clear ImportError instead of a failure mid-run

from .attention import dispatch, register  # noqa: E402
from .batch import IGNORE_INDEX, PackedBatch, pack  # noqa: E402
from .data import build_packed_loader  # noqa: E402
from .models import load_model, register_models  # noqa: E402
from .ops import causal_lm_loss, chunked_causal_lm_loss, enable_chunked_loss  # noqa: E402
from .parallel import StepLoss, apply_fsdp, init_topology, shard_batch  # noqa: E402
from .ssm import register_ssm_models  # noqa: E402

register()  # attn_implementation="seqpack"
register_models()  # InternLM / InternLM2 / Baichuan2 official folders load without trust_remote_code
register_ssm_models()  # Mamba / Mamba-2 from the Auto classes: adapted (attn_implementation="seqpack") or guarded

__version__ = "0.1.0"
__all__ = ["IGNORE_INDEX", "PackedBatch", "StepLoss", "apply_fsdp", "build_packed_loader", "causal_lm_loss",
           "chunked_causal_lm_loss", "dispatch", "enable_chunked_loss", "init_topology", "load_model", "pack",
           "register", "register_models", "shard_batch"]
