"""Baichuan2: the ``model_type: "baichuan"`` checkpoints, 7B style (RoPE) and 13B style (ALiBi).

Layout: Llama names with a fused ``self_attn.W_pack`` ([3H, H]: q rows, then k rows, then v rows) and
``lm_head`` a NormHead (logits use the row-normalised weight, in training and in eval).

The two sizes share ``model_type`` and differ in position encoding. As in the published configs, a config with
``max_position_embeddings`` (Baichuan2-7B) uses RoPE (base 10000, rotation in fp32); one without it (Baichuan2-13B,
only ``model_max_length``) uses ALiBi: score(t, s) += m_h * (s - t) with the published slopes m_h. With packing the
bias is applied within each document by the varlen kernel (``alibi_slopes``); eager/sdpa get it in the mask.

Shape legend: B batch rows, T tokens, N heads, D head dim, Lq/Lk query/key lengths.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..attention.kernels import alibi_mask, causal_mask
from .base import LLAMA_NAMES, NativeAttention, NativeForCausalLM, NativeModel, NativePreTrainedModel
from .config import NativeConfig
from .rope import RotaryEmbedding


class BaichuanConfig(NativeConfig):
    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values"]
    official_auto_map = {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                         "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}

    def __init__(self, vocab_size=125696, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, hidden_act="silu", max_position_embeddings=None, model_max_length=4096,
                 initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, z_loss_weight=0.0, gradient_checkpointing=False,
                 **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.model_max_length, self.initializer_range = model_max_length, initializer_range
        self.rms_norm_eps, self.use_cache, self.z_loss_weight = rms_norm_eps, use_cache, z_loss_weight
        self.gradient_checkpointing = gradient_checkpointing
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.check_heads()

    @property
    def position_embedding(self) -> str:
        """"rope" (Baichuan2-7B: config has max_position_embeddings) or "alibi" (Baichuan2-13B)."""
        return "rope" if self.max_position_embeddings is not None else "alibi"


def alibi_slopes(n: int) -> list[float]:
    """The published per-head ALiBi slopes (geometric 2^(-8/n) for a power of two n; otherwise those of the
    nearest lower power of two, then every other slope of the next power of two)."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return alibi_slopes(closest) + alibi_slopes(2 * closest)[0::2][: n - closest]


class BaichuanAttention(NativeAttention):
    rope_fp32 = True

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.alibi = config.position_embedding == "alibi"

    def project(self, hidden_states):
        q, k, v = self.W_pack(hidden_states).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        return q, k, v  # [B, T, N, D] each

    def attention_extras(self, attention_mask, query, key):
        if not self.alibi:
            return attention_mask, {}
        slopes = torch.tensor(alibi_slopes(self.num_heads), dtype=torch.float32, device=query.device)  # [N]
        impl = self.config._attn_implementation
        if impl == "seqpack":  # the varlen kernel adds the bias within each document
            return attention_mask, {"alibi_slopes": slopes}
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"Baichuan2 with ALiBi supports attn_implementation 'seqpack', 'eager' or 'sdpa', not "
                             f"{impl!r}")
        Lq, Lk = query.shape[2], key.shape[2]
        if attention_mask is None:
            allowed = causal_mask(Lq, Lk, None, query.device)  # [Lq, Lk]
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask  # [B, 1, Lq, Lk]
        else:
            allowed = attention_mask == 0  # additive eager mask: 0 = attend
        bias = alibi_mask(allowed, slopes, torch.float32).clamp(min=torch.finfo(query.dtype).min)
        return bias.expand(allowed.shape[0] if allowed.dim() == 4 else 1, -1, -1, -1).to(query.dtype), {}


class BaichuanPreTrainedModel(NativePreTrainedModel):
    config_class = BaichuanConfig
    layout = LLAMA_NAMES
    attention_class = BaichuanAttention
    _no_split_modules = ["DecoderLayer"]


class BaichuanModel(BaichuanPreTrainedModel, NativeModel):
    def make_rotary(self, config):
        if config.position_embedding == "alibi":
            return None
        return RotaryEmbedding(config.hidden_size // config.num_attention_heads, 10000.0,
                               config.max_position_embeddings)


class BaichuanForCausalLM(BaichuanPreTrainedModel, NativeForCausalLM):
    model_class = BaichuanModel
    norm_head = True
