"""``--verify``: the Hugging Face side (seqpack's native InternLM / InternLM2, loaded from the folder) and the
InternEvo side (:mod:`seqpack.convert.reference` on the tp shards) must give the same logits on a few tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from .families import Arch
from .reference import internevo_logits

NUM_TOKENS = 12


def hf_logits(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[T, V]`` of ``input_ids`` ``[T]`` from the folder's model run in float32 (eager attention)."""
    from transformers import AutoModelForCausalLM

    try:
        from seqpack.models import register_models
    except ImportError as exc:
        raise ValueError("--verify needs seqpack's native InternLM / InternLM2 models (seqpack.models)") from exc
    register_models()

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                     trust_remote_code=False)
    except Exception as exc:  # any loading failure means the folder is not what HF users will get
        raise ValueError(f"--verify: {folder} does not load with AutoModelForCausalLM ({type(exc).__name__}: {exc})") \
            from exc
    with torch.no_grad():
        return model(input_ids[None]).logits[0]


def compare_logits(folder: Path, arch: Arch, ranks: list[dict[str, torch.Tensor]], *, dtype: torch.dtype,
                   interleaved: bool, embed_split_hidden: bool, rope_theta: float, eps: float,
                   norm_head: bool = False) -> float:
    """Max |HF logits - InternEvo logits| over ``NUM_TOKENS`` fixed tokens; raises ``ValueError`` above
    ``1e-3 * max(1, max |logit|)`` (the InternEvo side uses the shards rounded to ``dtype``, as written)."""
    input_ids = torch.randint(0, arch.vocab_size, (NUM_TOKENS,), generator=torch.Generator().manual_seed(0))
    ranks = [{k: v.to(dtype) for k, v in r.items()} for r in ranks]
    ref = internevo_logits(arch, ranks, input_ids, interleaved=interleaved, embed_split_hidden=embed_split_hidden,
                           rope_theta=rope_theta, eps=eps, norm_head=norm_head)
    got = hf_logits(folder, input_ids).double()
    diff = (got - ref).abs().max().item()
    tol = 1e-3 * max(1.0, ref.abs().max().item())
    if not diff <= tol:
        raise ValueError(f"--verify failed: max |logit difference| {diff:.3g} > {tol:.3g} between the Hugging Face "
                         "model and the InternEvo shards; nothing was written")
    return diff
