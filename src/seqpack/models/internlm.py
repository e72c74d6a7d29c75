"""InternLM (v1): the ``model_type: "internlm"`` checkpoints (internlm/internlm-7b, -20b, chat variants).

Llama layout (``model.embed_tokens``, ``layers.i.self_attn.{q,k,v,o}_proj`` with biases when ``bias``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``lm_head``),
multi-head attention, RoPE configured by ``rotary = {"base": 10000, "type": "origin"|"dynamic",
"scaling_factor": f}``.

Shape legend: B batch rows, T tokens, N heads, D head dim.
"""

from __future__ import annotations

from torch import nn

from .base import LLAMA_NAMES, NativeAttention, NativeForCausalLM, NativeModel, NativePreTrainedModel
from .config import NativeConfig
from .rope import RotaryEmbedding


class InternLMConfig(NativeConfig):
    model_type = "internlm"
    keys_to_ignore_at_inference = ["past_key_values"]
    official_auto_map = {"AutoConfig": "configuration_internlm.InternLMConfig",
                         "AutoModel": "modeling_internlm.InternLMForCausalLM",
                         "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"}

    def __init__(self, vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
                 rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=False, bias=True, rotary=None, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps, self.use_cache = initializer_range, rms_norm_eps, use_cache
        self.bias = bias
        self.rotary = {"base": 10000, "type": "dynamic"} if rotary is None else rotary
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.check_heads()
        if not isinstance(self.rotary, dict) or self.rotary.get("type") not in ("origin", "dynamic"):
            raise ValueError(f"InternLMConfig: rotary must be {{'base': b, 'type': 'origin'|'dynamic'}}, got "
                             f"{self.rotary!r}")


class InternLMAttention(NativeAttention):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        H, ND = config.hidden_size, self.num_heads * self.head_dim
        self.q_proj = nn.Linear(H, ND, bias=config.bias)
        self.k_proj = nn.Linear(H, ND, bias=config.bias)
        self.v_proj = nn.Linear(H, ND, bias=config.bias)
        self.o_proj = nn.Linear(ND, H, bias=config.bias)

    def project(self, hidden_states):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)  # [B, T, N, D]
        return (self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape),
                self.v_proj(hidden_states).view(shape))


class InternLMPreTrainedModel(NativePreTrainedModel):
    config_class = InternLMConfig
    layout = LLAMA_NAMES
    attention_class = InternLMAttention
    _no_split_modules = ["DecoderLayer"]


class InternLMModel(InternLMPreTrainedModel, NativeModel):
    rotate_cached_keys = True  # as the published modeling_internlm.py (matters only past max_position_embeddings)

    def make_rotary(self, config):
        rotary = config.rotary
        return RotaryEmbedding(config.hidden_size // config.num_attention_heads, rotary.get("base", 10000),
                               config.max_position_embeddings, None if rotary["type"] == "origin" else "dynamic",
                               rotary.get("scaling_factor", 1.0))


class InternLMForCausalLM(InternLMPreTrainedModel, NativeForCausalLM):
    model_class = InternLMModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
