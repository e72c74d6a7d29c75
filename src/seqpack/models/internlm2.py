"""InternLM2 / InternLM2.5: the ``model_type: "internlm2"`` checkpoints (internlm/internlm2-7b, -20b, chat, 2.5).

Layout: ``model.tok_embeddings``, ``layers.i.attention.wqkv`` / ``attention.wo``, ``layers.i.feed_forward.{w1,w3,w2}``
(gate, up, down), ``attention_norm``, ``ffn_norm``, ``model.norm``, ``output``.

``wqkv`` is fused in the grouped GQA layout: its output features are ordered group-major, one group per KV head,
each group = the g = N/Nkv query heads of that KV head, then its key head, then its value head, D features each:
``[q_0 .. q_{g-1}, k, v | q_g .. q_{2g-1}, k, v | ...]``, i.e. ``view(B, T, Nkv, g + 2, D)``.

RoPE: ``rope_theta`` with ``rope_scaling = {"type": "dynamic"|"linear", "factor": f}`` or None.
Shape legend: B batch rows, T tokens, N query heads, Nkv key/value heads, g = N/Nkv, D head dim.
"""

from __future__ import annotations

from torch import nn

from .base import Layout, NativeAttention, NativeForCausalLM, NativeModel, NativePreTrainedModel
from .config import NativeConfig, rope_scaling_type
from .rope import RotaryEmbedding

INTERNLM2_NAMES = Layout("tok_embeddings", "attention", "feed_forward", "attention_norm", "ffn_norm", "output",
                         ("w1", "w3", "w2"))


class InternLM2Config(NativeConfig):
    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]
    official_auto_map = {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}

    def __init__(self, vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                 initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, pretraining_tp=1, tie_word_embeddings=False, bias=True, rope_theta=10000,
                 rope_scaling=None, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps, self.use_cache = initializer_range, rms_norm_eps, use_cache
        self.pretraining_tp, self.bias, self.rope_theta = pretraining_tp, bias, rope_theta
        self.rope_scaling = rope_scaling
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.check_heads(self.num_key_value_heads)
        rope_scaling_type(self.rope_scaling, "InternLM2Config")


class InternLM2Attention(NativeAttention):
    out_name = "wo"

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.wqkv = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
                              bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def project(self, hidden_states):
        g = self.num_key_value_groups
        qkv = self.wqkv(hidden_states).unflatten(-1, (self.num_key_value_heads, g + 2, self.head_dim))
        q = qkv[..., :g, :].flatten(-3, -2)  # [B, T, Nkv, g, D] -> [B, T, N, D] (head h = kv group h // g)
        return q, qkv[..., -2, :], qkv[..., -1, :]  # k, v [B, T, Nkv, D]


class InternLM2PreTrainedModel(NativePreTrainedModel):
    config_class = InternLM2Config
    layout = INTERNLM2_NAMES
    attention_class = InternLM2Attention
    _no_split_modules = ["DecoderLayer"]


class InternLM2Model(InternLM2PreTrainedModel, NativeModel):
    def make_rotary(self, config):
        kind, factor = rope_scaling_type(config.rope_scaling, "InternLM2Config")
        return RotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta,
                               config.max_position_embeddings, kind, factor)


class InternLM2ForCausalLM(InternLM2PreTrainedModel, NativeForCausalLM):
    model_class = InternLM2Model
    _tied_weights_keys = {"output.weight": "model.tok_embeddings.weight"}
