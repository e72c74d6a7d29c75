"""Shared fixtures: tiny transformers models built from configs (nothing downloads)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import seqpack  # noqa: F401  (registers attn_implementation="seqpack")

VOCAB = 64

# family -> config overrides; each exercises something the attention must honour
FAMILIES = {
    "llama": dict(),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),  # layer 1 slides
    "qwen3": dict(head_dim=16),
    "mistral": dict(sliding_window=5),  # window shorter than the documents
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "gemma2": dict(sliding_window=5, attn_logit_softcapping=3.0, final_logit_softcapping=8.0, head_dim=16,
                   query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=5, head_dim=16, query_pre_attn_scalar=16),
    "phi3": dict(),
}


def tiny_config(model_type: str, **overrides):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(FAMILIES.get(model_type, {}))
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def model_pair(model_type: str, seed: int = 0, **overrides):
    """(unmodified eager model, seqpack model) with identical fp32 weights."""
    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    model.load_state_dict(ref.state_dict())
    return ref, model


def pytest_collection_modifyitems(config, items):
    """Tests marked ``@pytest.mark.cuda`` run only where CUDA is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
