"""InternLM and InternLM2: parameter names on both sides, how each is split across tp ranks, config translation.

Legend as in :mod:`seqpack.convert.layouts` (``H``, ``N``, ``Nkv``, ``D``, ``I``, ``V``, ``L``).

InternEvo names are the tp-merged, pp-merged ones (global layer index, no ``model.`` prefix). Hugging Face names
are the official ones of ``internlm/internlm-7b`` (model_type ``internlm``) and ``internlm/internlm2-*``
(model_type ``internlm2``).
"""

from __future__ import annotations

import dataclasses

import torch

from .layouts import Split, permute_rotary

FAMILIES = ("internlm", "internlm2")
AUTO_MAP = {
    "internlm": {"AutoConfig": "configuration_internlm.InternLMConfig",
                 "AutoModel": "modeling_internlm.InternLMForCausalLM",
                 "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
    "internlm2": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                  "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                  "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
}
ARCHITECTURE = {"internlm": "InternLMForCausalLM", "internlm2": "InternLM2ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class Param:
    internevo: str  # "{i}" stands for the layer index
    hf: tuple[str, ...]  # InternLM's fused Wqkv maps onto (q_proj, k_proj, v_proj)
    split: Split


@dataclasses.dataclass
class Arch:
    """The facts both formats must agree on."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    intermediate_size: int
    bias: bool  # attention biases (InternLM always has them; InternLM2 when trained with no_bias=False)
    mlp_down: str = "w2"  # InternEvo name of the down projection; InternLM checkpoints may use w3 (--version 1)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def check(self, where: str) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{where}: hidden_size={self.hidden_size}, num_attention_heads={self.num_heads}, "
                             f"num_kv_heads={self.num_kv_heads} must divide evenly")
        if self.family == "internlm" and self.num_kv_heads != self.num_heads:
            raise ValueError(f"{where}: InternLM has no grouped-query attention (kv heads {self.num_kv_heads} != "
                             f"heads {self.num_heads})")


def params(arch: Arch) -> list[Param]:
    """Every parameter of the model, with its tp split (embedding split is resolved by ``embed_split_hidden``)."""
    S = Split
    if arch.family == "internlm2":
        lay, hl = "layers.{i}.", "model.layers.{i}."
        table = [Param(lay + "attention.wqkv.weight", (hl + "attention.wqkv.weight",), S.COL),
                 Param(lay + "attention.wo.weight", (hl + "attention.wo.weight",), S.ROW)]
        if arch.bias:
            table += [Param(lay + "attention.wqkv.bias", (hl + "attention.wqkv.bias",), S.COL),
                      Param(lay + "attention.wo.bias", (hl + "attention.wo.bias",), S.REPLICATED)]
        table += [Param(lay + f"feed_forward.{w}.weight", (hl + f"feed_forward.{w}.weight",), split)
                  for w, split in (("w1", S.COL), ("w3", S.COL), ("w2", S.ROW))]
        table += [Param(lay + n, (hl + n,), S.REPLICATED) for n in ("attention_norm.weight", "ffn_norm.weight")]
        return table + [Param("tok_embeddings.weight", ("model.tok_embeddings.weight",), S.EMBED),
                        Param("norm.weight", ("model.norm.weight",), S.REPLICATED),
                        Param("output.weight", ("output.weight",), S.COL)]
    lay, hl = "blocks.{i}.", "model.layers.{i}.self_attn."
    up = "w3" if arch.mlp_down == "w2" else "w2"
    table = [Param(lay + f"mixer.Wqkv.{t}", tuple(hl + f"{p}_proj.{t}" for p in "qkv"), S.QKV3)
             for t in ("weight", "bias")]
    table += [Param(lay + "mixer.out_proj.weight", (hl + "o_proj.weight",), S.ROW),
              Param(lay + "mixer.out_proj.bias", (hl + "o_proj.bias",), S.REPLICATED),
              Param(lay + "mlp.w1.weight", ("model.layers.{i}.mlp.gate_proj.weight",), S.COL),
              Param(lay + f"mlp.{up}.weight", ("model.layers.{i}.mlp.up_proj.weight",), S.COL),
              Param(lay + f"mlp.{arch.mlp_down}.weight", ("model.layers.{i}.mlp.down_proj.weight",), S.ROW),
              Param(lay + "norm1.weight", ("model.layers.{i}.input_layernorm.weight",), S.REPLICATED),
              Param(lay + "norm2.weight", ("model.layers.{i}.post_attention_layernorm.weight",), S.REPLICATED)]
    return table + [Param("embedding.weight", ("model.embed_tokens.weight",), S.EMBED),
                    Param("norm.weight", ("model.norm.weight",), S.REPLICATED),
                    Param("head.weight", ("lm_head.weight",), S.COL)]


def _expand(arch: Arch, name: str) -> list[str]:
    return [name.format(i=i) for i in range(arch.num_layers)] if "{i}" in name else [name]


def hf_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Expected shape of every official HF tensor (keyed by full name)."""
    H, D, N, Nkv, Im, V = (arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads,
                           arch.intermediate_size, arch.vocab_size)
    leaf = {"attention.wqkv.weight": (N * D + 2 * Nkv * D, H), "attention.wqkv.bias": (N * D + 2 * Nkv * D,),
            "attention.wo.weight": (H, N * D), "attention.wo.bias": (H,),
            "feed_forward.w1.weight": (Im, H), "feed_forward.w3.weight": (Im, H), "feed_forward.w2.weight": (H, Im),
            "attention_norm.weight": (H,), "ffn_norm.weight": (H,),
            "self_attn.o_proj.weight": (H, N * D), "self_attn.o_proj.bias": (H,),
            "mlp.gate_proj.weight": (Im, H), "mlp.up_proj.weight": (Im, H), "mlp.down_proj.weight": (H, Im),
            "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
            "model.tok_embeddings.weight": (V, H), "model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
            "output.weight": (V, H), "lm_head.weight": (V, H)}
    leaf.update({f"self_attn.{p}_proj.{t}": (N * D, H)[: 2 if t == "weight" else 1] for p in "qkv"
                 for t in ("weight", "bias")})
    return {name: leaf[pattern.split("{i}.")[-1]] for p in params(arch) for pattern in p.hf
            for name in _expand(arch, pattern)}


def check_hf_state(state: dict[str, torch.Tensor], arch: Arch, where: str) -> None:
    """Missing, unknown and mis-shaped tensors are errors that name the tensor."""
    shapes = hf_shapes(arch)
    missing = sorted(set(shapes) - set(state))
    unknown = sorted(set(state) - set(shapes))
    if missing:
        raise ValueError(f"{where}: missing {len(missing)} tensor(s) of a {arch.family} model, e.g. {missing[:4]}")
    if unknown:
        raise ValueError(f"{where}: unknown tensor(s) for a {arch.family} model: {unknown[:6]}; this converter "
                         "handles the official InternLM/InternLM2 layouts only")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(state[name].shape)}, expected {shape} from the "
                             "config (heads, hidden, intermediate, vocab)")


def _rotary_targets(arch: Arch) -> list[tuple[str, list[bool]]]:
    """(HF name pattern, per-head-slot 'is q or k') for every tensor whose rows carry rotary dimensions."""
    if arch.family == "internlm2":
        g = arch.q_per_kv + 2  # slots per group: q_0..q_{q-1}, k, v
        slots = [s % g != g - 1 for s in range(arch.num_kv_heads * g)]
        names = ["model.layers.{i}.attention.wqkv.weight"] + (["model.layers.{i}.attention.wqkv.bias"]
                                                                if arch.bias else [])
        return [(n, slots) for n in names]
    slots = [True] * arch.num_heads
    return [(f"model.layers.{{i}}.self_attn.{p}_proj.{t}", slots) for p in "qk" for t in ("weight", "bias")]


def to_hf(merged: dict[str, torch.Tensor], arch: Arch, interleaved: bool) -> dict[str, torch.Tensor]:
    """tp/pp-merged InternEvo state -> official HF state (rotary rows permuted when ``interleaved``)."""
    state = {}
    for p in params(arch):
        for i in range(arch.num_layers if "{i}" in p.internevo else 1):
            tensor = merged[p.internevo.format(i=i)]
            parts = tensor.chunk(len(p.hf)) if len(p.hf) > 1 else (tensor,)
            state.update({name.format(i=i): part for name, part in zip(p.hf, parts, strict=True)})
    if interleaved:
        for pattern, slots in _rotary_targets(arch):
            for name in _expand(arch, pattern):
                state[name] = permute_rotary(state[name], arch.head_dim, slots, to_half=True)
    return state


def from_hf(state: dict[str, torch.Tensor], arch: Arch, interleaved: bool) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf`."""
    state = dict(state)
    if interleaved:
        for pattern, slots in _rotary_targets(arch):
            for name in _expand(arch, pattern):
                state[name] = permute_rotary(state[name], arch.head_dim, slots, to_half=False)
    merged = {}
    for p in params(arch):
        for i in range(arch.num_layers if "{i}" in p.internevo else 1):
            parts = [state[name.format(i=i)] for name in p.hf]
            merged[p.internevo.format(i=i)] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return merged


def hf_config(arch: Arch, *, dtype: torch.dtype, max_pos: int, eps: float, rope_theta: float,
              rotary_type: str, scaling_factor: float, special_ids: dict[str, int | None]) -> dict:
    """The official ``config.json`` of the family (InternLM reads its rope from ``rotary``, InternLM2 from
    ``rope_theta`` / ``rope_scaling``)."""
    cfg = {"architectures": [ARCHITECTURE[arch.family]], "auto_map": AUTO_MAP[arch.family],
           "model_type": arch.family, "bias": arch.bias, "hidden_act": "silu", "hidden_size": arch.hidden_size,
           "initializer_range": 0.02, "intermediate_size": arch.intermediate_size,
           "max_position_embeddings": max_pos, "num_attention_heads": arch.num_heads,
           "num_hidden_layers": arch.num_layers, "rms_norm_eps": eps, "tie_word_embeddings": False,
           "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True, "vocab_size": arch.vocab_size}
    cfg.update({k: v for k, v in special_ids.items() if v is not None})
    if arch.family == "internlm2":
        cfg["num_key_value_heads"] = arch.num_kv_heads
        cfg["rope_theta"] = rope_theta
        cfg["rope_scaling"] = {"type": "dynamic", "factor": scaling_factor} if rotary_type == "dynamic" else None
    else:
        cfg["rotary"] = {"base": rope_theta, "type": rotary_type}
        if rotary_type == "dynamic":
            cfg["rotary"]["scaling_factor"] = scaling_factor
    return dict(sorted(cfg.items()))


def arch_from_hf(cfg: dict, where: str, mlp_down: str = "w2") -> tuple[Arch, dict]:
    """(Arch, rope/eps facts) from an official ``config.json`` dict."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{where}: model_type {family!r} is not one of {FAMILIES}")
    need = ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"]
    if missing := [k for k in need if k not in cfg]:
        raise ValueError(f"{where}: missing key(s) {missing}")
    heads = cfg["num_attention_heads"]
    arch = Arch(family, cfg["num_hidden_layers"], cfg["hidden_size"], heads,
                cfg.get("num_key_value_heads") or heads, cfg["vocab_size"], cfg["intermediate_size"],
                bool(cfg.get("bias", family == "internlm")), mlp_down if family == "internlm" else "w2")
    arch.check(where)
    if family == "internlm2":
        theta = cfg.get("rope_theta", 10000)
        dynamic = (cfg.get("rope_scaling") or {}).get("type") == "dynamic"
    else:
        rotary = cfg.get("rotary") or {}
        theta = rotary.get("base", cfg.get("rope_theta", 10000))
        dynamic = rotary.get("type", "dynamic") == "dynamic"
    extra = {"rope_theta": theta, "eps": cfg.get("rms_norm_eps", 1e-6), "dynamic": dynamic,
             "max_pos": cfg.get("max_position_embeddings", 2048), "dtype": cfg.get("torch_dtype") or cfg.get("dtype")}
    return arch, extra


def mlp_ratio_for(hidden: int, intermediate: int) -> tuple[float, int]:
    """(mlp_ratio, multiple_of) for which InternEvo's ``multiple_of * ceil(int(hidden * mlp_ratio) / multiple_of)``
    is exactly ``intermediate`` (instead of the original scripts' ``round((I - 255) / H + 0.01, 2)`` guess)."""
    ratio = intermediate / hidden
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        got = multiple_of * ((int(hidden * ratio) + multiple_of - 1) // multiple_of)
        if got == intermediate:
            return ratio, multiple_of
    raise ValueError(f"no (mlp_ratio, multiple_of) reproduces intermediate_size={intermediate} for "
                     f"hidden_size={hidden}")  # unreachable for multiple_of=1 unless float rounding bites
