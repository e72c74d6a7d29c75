"""Independent references for the native-model tests (helpers only, no tests): official-layout checkpoint
folders built by hand (config.json with ``auto_map`` + weights under the published names) and a naive float64
forward written from the published modeling files' math (per-head loops, explicit wqkv group slicing, published
RoPE / ALiBi formulas).

Nothing here imports seqpack.models: it is the yardstick the native implementation is measured against.
"""

import json
import math
import os

import torch
from safetensors.torch import save_file

VOCAB = 64
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False, use_cache=True, torch_dtype="bfloat16",
            transformers_version="4.33.2")
AUTO_MAP = {
    "internlm": {"AutoConfig": "configuration_internlm.InternLMConfig",
                 "AutoModel": "modeling_internlm.InternLMForCausalLM",
                 "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
    "internlm2": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                  "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                  "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
    "baichuan": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                 "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
}
ARCH = {"internlm": "InternLMForCausalLM", "internlm2": "InternLM2ForCausalLM", "baichuan": "BaichuanForCausalLM"}

# variant -> (model_type, config.json overrides); short max_position_embeddings so documents exceed it
VARIANTS = {
    "internlm-dynamic-ntk": ("internlm", dict(bias=True, max_position_embeddings=8,
                                              rotary={"base": 10000, "type": "dynamic"})),
    "internlm2-gqa-dynamic-ntk": ("internlm2", dict(bias=False, num_key_value_heads=2, max_position_embeddings=8,
                                                    rope_theta=1000000,
                                                    rope_scaling={"type": "dynamic", "factor": 2.0},
                                                    attn_implementation="eager")),
    "internlm2-mqa-linear-bias": ("internlm2", dict(bias=True, num_key_value_heads=1, max_position_embeddings=64,
                                                    rope_theta=10000, rope_scaling={"type": "linear", "factor": 2.0})),
    "baichuan2-7b-rope": ("baichuan", dict(max_position_embeddings=64, model_max_length=64, z_loss_weight=0)),
    "baichuan2-13b-alibi-6-heads": ("baichuan", dict(hidden_size=48, num_attention_heads=6, model_max_length=64)),
}


def official_config(variant: str) -> dict:
    model_type, over = VARIANTS[variant]
    cfg = dict(BASE, **over, model_type=model_type, architectures=[ARCH[model_type]], auto_map=AUTO_MAP[model_type])
    return cfg


def official_weights(cfg: dict, seed: int = 0) -> dict:
    """Random weights under the published parameter names and shapes."""
    g = torch.Generator().manual_seed(seed)
    H, M, V, N = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    D, Nkv, kind = H // N, cfg.get("num_key_value_heads", N), cfg["model_type"]

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {}
    if kind == "internlm2":
        sd["model.tok_embeddings.weight"] = r(V, H, scale=1.0)
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            sd[p + "attention.wqkv.weight"] = r((N + 2 * Nkv) * D, H)
            sd[p + "attention.wo.weight"] = r(H, N * D)
            if cfg["bias"]:
                sd[p + "attention.wqkv.bias"] = r((N + 2 * Nkv) * D)
                sd[p + "attention.wo.bias"] = r(H)
            sd[p + "feed_forward.w1.weight"], sd[p + "feed_forward.w3.weight"] = r(M, H), r(M, H)
            sd[p + "feed_forward.w2.weight"] = r(H, M)
            sd[p + "attention_norm.weight"], sd[p + "ffn_norm.weight"] = 1 + r(H), 1 + r(H)
        sd["model.norm.weight"], sd["output.weight"] = 1 + r(H), r(V, H)
        return sd
    sd["model.embed_tokens.weight"] = r(V, H, scale=1.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if kind == "baichuan":
            sd[p + "self_attn.W_pack.weight"] = r(3 * H, H)
        else:
            for n in "qkv":
                sd[p + f"self_attn.{n}_proj.weight"] = r(H, H)
                sd[p + f"self_attn.{n}_proj.bias"] = r(H)
            sd[p + "self_attn.o_proj.bias"] = r(H)
        sd[p + "self_attn.o_proj.weight"] = r(H, H)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = r(M, H), r(M, H)
        sd[p + "mlp.down_proj.weight"] = r(H, M)
        sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"] = 1 + r(H), 1 + r(H)
    sd["model.norm.weight"], sd["lm_head.weight"] = 1 + r(H), r(V, H)
    return sd


def write_official_folder(path, cfg: dict, sd: dict, fmt: str = "safetensors") -> str:
    """A checkpoint folder as published: config.json (+ auto_map), weights as model.safetensors or
    pytorch_model.bin."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    return str(path)


def published_alibi_slopes(n: int) -> list:
    """Baichuan2-13B's _get_interleave."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    c = 2 ** math.floor(math.log2(n))
    return power_of_2(c) + published_alibi_slopes(2 * c)[0::2][: n - c]


def _rope_angles(cfg: dict, T: int, D: int) -> torch.Tensor:
    """[T, D/2] angles as the published code builds them for a sequence of length T."""
    kind = cfg["model_type"]
    base, kind_scale, factor, max_pos = 10000.0, None, 1.0, cfg.get("max_position_embeddings")
    if kind == "internlm":
        base = cfg["rotary"]["base"]
        if cfg["rotary"]["type"] == "dynamic":
            kind_scale, factor = "dynamic", cfg["rotary"].get("scaling_factor", 1.0)
    elif kind == "internlm2":
        base = cfg["rope_theta"]
        if cfg.get("rope_scaling"):
            kind_scale, factor = cfg["rope_scaling"]["type"], cfg["rope_scaling"]["factor"]
    t = torch.arange(T, dtype=torch.float64)
    if kind_scale == "dynamic" and T > max_pos:
        base = base * ((factor * T / max_pos) - (factor - 1)) ** (D / (D - 2))
    if kind_scale == "linear":
        t = t / factor
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    return t[:, None] * inv_freq[None, :]


def reference_logits(cfg: dict, sd: dict, ids: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
    """Naive float64 forward of one sequence ids [T] -> logits [T, V], from the published math.

    With ``cache`` (a dict, filled in place) this is a step of the published InternLM KV cache: ``ids`` follow the
    cached tokens; each layer's keys are cached *unrotated*, and all of them (and the new queries, at positions
    past..past+T-1) are rotated with the table of the current length past + T."""
    sd = {k: v.double() for k, v in sd.items()}
    kind, T = cfg["model_type"], ids.numel()
    past = cache.get("length", 0) if cache is not None else 0
    L = past + T  # keys attended to
    H, N = cfg["hidden_size"], cfg["num_attention_heads"]
    D, Nkv = H // N, cfg.get("num_key_value_heads", N)
    eps = cfg["rms_norm_eps"]

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def lin(x, name):
        b = sd.get(name + ".bias")
        return x @ sd[name + ".weight"].T + (0 if b is None else b)

    names = dict(emb="model.tok_embeddings", attn="attention", mlp="feed_forward", n1="attention_norm",
                 n2="ffn_norm", out="output", gate="w1", up="w3", down="w2") if kind == "internlm2" else \
        dict(emb="model.embed_tokens", attn="self_attn", mlp="mlp", n1="input_layernorm",
             n2="post_attention_layernorm", out="lm_head", gate="gate_proj", up="up_proj", down="down_proj")
    alibi = kind == "baichuan" and cfg.get("max_position_embeddings") is None
    if not alibi:
        ang = _rope_angles(cfg, L, D)
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)  # [L, D]
    slopes = published_alibi_slopes(N)
    h = sd[names["emb"] + ".weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.{names['attn']}."
        x = rms(h, sd[f"model.layers.{i}.{names['n1']}.weight"])
        if kind == "internlm2":
            qkv, g = lin(x, p + "wqkv"), N // Nkv
            qs, ks, vs = [], [], []
            for j in range(Nkv):  # group j: g query heads, then key, then value
                blk = qkv[:, j * (g + 2) * D:(j + 1) * (g + 2) * D]
                qs += [blk[:, a * D:(a + 1) * D] for a in range(g)]
                ks.append(blk[:, g * D:(g + 1) * D])
                vs.append(blk[:, (g + 1) * D:(g + 2) * D])
        else:
            if kind == "baichuan":
                w = lin(x, p + "W_pack")
                qa, ka, va = w[:, :H], w[:, H:2 * H], w[:, 2 * H:]
            else:
                qa, ka, va = lin(x, p + "q_proj"), lin(x, p + "k_proj"), lin(x, p + "v_proj")
            qs, ks, vs = ([a[:, n * D:(n + 1) * D] for n in range(N)] for a in (qa, ka, va))
        if cache is not None:  # unrotated keys and values of every token so far: [L, D] per kv head
            if past:
                ks = [torch.cat([old, new]) for old, new in zip(cache[i, "k"], ks)]
                vs = [torch.cat([old, new]) for old, new in zip(cache[i, "v"], vs)]
            cache[i, "k"], cache[i, "v"] = ks, vs
        heads = []
        for n in range(N):
            q, k, v = qs[n], ks[n // (N // Nkv)], vs[n // (N // Nkv)]  # q [T, D], k/v [L, D]
            if not alibi:  # rotate_half: (x1, x2) -> (-x2, x1) over the two halves of D
                q = q * cos[past:] + torch.cat([-q[:, D // 2:], q[:, :D // 2]], -1) * sin[past:]
                k = k * cos + torch.cat([-k[:, D // 2:], k[:, :D // 2]], -1) * sin
            scores = q @ k.T / math.sqrt(D)  # [T, L]
            for a in range(T):
                for b in range(L):
                    if b > past + a:
                        scores[a, b] = -math.inf
                    elif alibi:
                        scores[a, b] += slopes[n] * (b - past - a)
            heads.append(torch.softmax(scores, -1) @ v)
        out_proj = p + ("wo" if kind == "internlm2" else "o_proj")
        h = h + lin(torch.cat(heads, -1), out_proj)
        m = f"model.layers.{i}.{names['mlp']}."
        x = rms(h, sd[f"model.layers.{i}.{names['n2']}.weight"])
        h = h + lin(torch.nn.functional.silu(lin(x, m + names["gate"])) * lin(x, m + names["up"]), m + names["down"])
    if cache is not None:
        cache["length"] = L
    h = rms(h, sd["model.norm.weight"])
    head = sd[names["out"] + ".weight"]
    if kind == "baichuan":  # NormHead: unit-norm rows
        head = head / head.norm(dim=1, keepdim=True)
    return h @ head.T
