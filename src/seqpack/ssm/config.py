"""Which models are state-space models seqpack adapts, and their from-scratch configs for ``seqpack train``."""

from __future__ import annotations

SSM_MODEL_TYPES = ("mamba", "mamba2")

SP_REFUSAL = ("sequence parallel is not possible for {name}: Ulysses splits the sequence across ranks and "
              "exchanges heads around attention, but an SSM has no attention — its recurrent state runs through "
              "every token of a document in order, so a rank cannot start its shard without the state of the "
              "previous one. Use parallel.tensor.size=1 (data parallel) for Mamba / Mamba-2")


def is_ssm(model_or_config) -> bool:
    """True for transformers' Mamba and Mamba-2 models (or their configs)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in SSM_MODEL_TYPES


def ssm_hf_config(model_type: str, m, vocab_size: int, tie_embeddings: bool):
    """transformers config of a from-scratch Mamba / Mamba-2 from the ``model`` section: hidden_size, num_layers,
    vocab_size, layer_norm_epsilon; Mamba-2 heads = ``num_attention_heads`` (head_dim = 2 * hidden / heads)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  layer_norm_epsilon=m.layer_norm_epsilon, tie_word_embeddings=tie_embeddings, expand=2,
                  state_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "mamba":
        return AutoConfig.for_model("mamba", **common)
    inner = 2 * m.hidden_size
    if inner % m.num_attention_heads:
        raise ValueError(f"model.num_attention_heads={m.num_attention_heads} must divide 2 * model.hidden_size="
                         f"{inner} for mamba2 (its SSM heads have head_dim = 2 * hidden_size / heads)")
    return AutoConfig.for_model("mamba2", num_heads=m.num_attention_heads, head_dim=inner // m.num_attention_heads,
                                n_groups=1, **common)
