"""The decoder shared by seqpack's native InternLM, InternLM2 and Baichuan2 models.

Shape legend: B batch rows, T tokens per row, N query heads, Nkv key/value heads, D head dim, V vocabulary.

The three families are Llama-shaped decoders that differ in module names (``Layout``), in how q/k/v are projected
(each family's attention subclass implements ``project``) and in position encoding (RoPE variants or ALiBi).
Attention goes through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` exactly as transformers' Llama
does, so ``attn_implementation="seqpack"`` (packed varlen, sequence parallel) works like for any transformers model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

import inspect

from ..batch import IGNORE_INDEX
from ..parallel.comm import group_rank
from .rope import RotaryEmbedding, apply_rope, cached_key_positions, document_lengths, rotate


# transformers 5.24 renamed the KV cache from ``past_key_values`` to ``cache`` (in model kwargs, output fields and
# ``create_causal_mask``); the native models accept both names and speak the installed release's.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@dataclass(frozen=True)
class Layout:
    """Module names of a family's official checkpoint (``model.<embed>``, ``model.layers.i.<attn>``, ...)."""

    embed: str
    attn: str
    mlp: str
    attn_norm: str
    mlp_norm: str
    head: str
    gate_up_down: tuple[str, str, str]


LLAMA_NAMES = Layout("embed_tokens", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "lm_head",
                     ("gate_proj", "up_proj", "down_proj"))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, statistics in fp32. [..., H] -> [..., H]."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with the family's projection names. [B, T, H] -> [B, T, H]."""

    def __init__(self, config, names: tuple[str, str, str]):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(config.hidden_size, config.intermediate_size, bias=False))
        setattr(self, up, nn.Linear(config.hidden_size, config.intermediate_size, bias=False))
        setattr(self, down, nn.Linear(config.intermediate_size, config.hidden_size, bias=False))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class NativeAttention(nn.Module):
    """Projection -> RoPE -> cache -> attention interface -> output projection.

    Subclasses define ``project(hidden [B, T, H]) -> q [B, T, N, D], k/v [B, T, Nkv, D]``, the output projection
    named ``out_name``, and may override ``attention_extras`` (ALiBi).
    """

    out_name = "o_proj"
    rope_fp32 = False  # rotate in fp32 and cast back (Baichuan2) instead of casting cos/sin to q's dtype

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0) or 0.0
        self.is_causal = True

    def project(self, hidden_states: torch.Tensor):
        raise NotImplementedError

    def attention_extras(self, attention_mask, query, key) -> tuple[torch.Tensor | None, dict]:
        """Hook for position biases: returns (mask to pass, extra keyword arguments for the attention function)."""
        return attention_mask, {}

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                key_position_embeddings=None, **kwargs):
        B, T, _ = hidden_states.shape
        q, k, v = (x.transpose(1, 2) for x in self.project(hidden_states))  # [B, T, H, D] -> [B, H, T, D]
        if key_position_embeddings is not None:  # the cache holds unrotated keys: rotate all with the current table
            q = rotate(q, *position_embeddings, fp32=self.rope_fp32)
            k, v = past_key_values.update(k, v, self.layer_idx)  # [B, Nkv, past + T, D]
            k = rotate(k, *key_position_embeddings, fp32=self.rope_fp32)
        else:
            if position_embeddings is not None:
                q, k = apply_rope(q, k, *position_embeddings, fp32=self.rope_fp32)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
        attention_mask, extras = self.attention_extras(attention_mask, q, k)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = interface(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                                 self.attention_dropout, scaling=self.scaling, **extras, **kwargs)  # [B, T, N, D]
        return getattr(self, self.out_name)(out.reshape(B, T, -1).contiguous()), weights


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h)), with the family's module names."""

    def __init__(self, config, layer_idx: int, layout: Layout, attention_class: type):
        super().__init__()
        self.layout = layout
        setattr(self, layout.attn, attention_class(config, layer_idx))
        setattr(self, layout.mlp, GatedMLP(config, layout.gate_up_down))
        setattr(self, layout.attn_norm, RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        setattr(self, layout.mlp_norm, RMSNorm(config.hidden_size, eps=config.rms_norm_eps))

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        n = self.layout
        attn_out, _ = getattr(self, n.attn)(getattr(self, n.attn_norm)(hidden_states), position_embeddings,
                                            attention_mask, past_key_values, position_ids=position_ids, **kwargs)
        hidden_states = hidden_states + attn_out
        return hidden_states + getattr(self, n.mlp)(getattr(self, n.mlp_norm)(hidden_states))


class NativePreTrainedModel(PreTrainedModel):
    """Flags shared by the native families; subclasses set ``config_class``, ``layout``, ``attention_class``."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"decoder\.version"]
    layout: Layout = LLAMA_NAMES
    attention_class: type = NativeAttention

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NormHead):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class NativeModel(NativePreTrainedModel):
    """Embedding -> decoder layers -> final norm. Returns hidden states [B, T, H]."""

    # dynamic NTK with a KV cache: cache keys unrotated and rotate all of them at every step with the table of the
    # current length (InternLM's published code; the others cache rotated keys)
    rotate_cached_keys = False

    def __init__(self, config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        setattr(self, self.layout.embed, nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx))
        self.layers = nn.ModuleList([DecoderLayer(config, i, self.layout, self.attention_class)
                                     for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = self.make_rotary(config)
        self.gradient_checkpointing = False
        self.post_init()

    def make_rotary(self, config) -> RotaryEmbedding | None:
        """The family's RoPE (None for ALiBi models)."""
        raise NotImplementedError

    def get_input_embeddings(self):
        return getattr(self, self.layout.embed)

    def set_input_embeddings(self, value):
        setattr(self, self.layout.embed, value)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache=None, **kwargs) -> BaseModelOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, T, H]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        T = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = (torch.arange(T, device=inputs_embeds.device) + past)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, **{_MASK_CACHE_KW: past_key_values})
        position_embeddings = None
        if self.rotary_emb is not None:
            doc_lens = None
            if self.rotary_emb.needs_doc_lens:
                cu = kwargs.get("cu_seq_lens_q")
                start = 0 if cu is None or int(cu[-1]) == T else \
                    group_rank(getattr(getattr(self, "seqpack_options", None), "sp_group", None)) * T
                doc_lens = document_lengths(position_ids, cu, past, start)
            position_embeddings = self.rotary_emb(position_ids, doc_lens)  # cos/sin [B, T, D] fp32
            if self.rotate_cached_keys and self.rotary_emb.needs_doc_lens and past_key_values is not None:
                if past == 0:  # prefill: the keys are the queries' tokens
                    kwargs["key_position_embeddings"] = position_embeddings
                else:  # every cached key, with the table of the current length past + T
                    key_pos = cached_key_positions(position_ids, past + T)  # [B, past + T]
                    kwargs["key_position_embeddings"] = self.rotary_emb(key_pos, torch.full_like(key_pos, past + T))
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_FIELD: past_key_values})


class NormHead(nn.Module):
    """Baichuan2's output layer: logits = h @ normalize(W)^T (rows of W unit-normalised, in training and eval).
    weight [V, H]; [B, T, H] -> [B, T, V]."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden_states, nn.functional.normalize(self.weight))


class NativeForCausalLM(NativePreTrainedModel, GenerationMixin):
    """Decoder + output head (``layout.head``). Subclasses set ``model_class`` (and ``norm_head`` for Baichuan2)."""

    model_class: type = NativeModel
    norm_head = False

    def __init__(self, config):
        super().__init__(config)
        self.model = self.model_class(config)
        head = NormHead(config.hidden_size, config.vocab_size) if self.norm_head else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        setattr(self, self.layout.head, head)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return getattr(self, self.layout.head)

    def set_output_embeddings(self, value):
        setattr(self, self.layout.head, value)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None,
                **kwargs) -> CausalLMOutputWithPast:
        """Like transformers' LlamaForCausalLM.forward; packed metadata (``cu_seq_lens_q/k``, ``max_length_q/k``)
        and ``shift_labels`` pass through ``kwargs``. logits [B, T, V]."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache if cache is not None else past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.get_output_embeddings()(hidden[:, keep])
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            z_weight = getattr(self.config, "z_loss_weight", 0.0) or 0.0
            if z_weight:
                loss = loss + z_weight * self._z_loss(logits, labels, kwargs.get("shift_labels"))
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})

    @staticmethod
    def _z_loss(logits, labels, shift_labels) -> torch.Tensor:
        """Baichuan2's z-loss term: mean over target positions of max(logits)^2."""
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        valid = shift_labels != IGNORE_INDEX  # [B, T]
        return (logits.float().max(-1).values[valid] ** 2).mean()
