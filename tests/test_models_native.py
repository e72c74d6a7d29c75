"""seqpack's native InternLM / InternLM2 / Baichuan2 against the published math, packed, saved and reloaded.

Every case starts from an official-layout folder built by hand (config.json with model_type + auto_map, weights
under the published names) and loads it with ``AutoModelForCausalLM.from_pretrained`` — no trust_remote_code.
"""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import seqpack
from seqpack.models import BaichuanForCausalLM, InternLM2ForCausalLM, InternLMForCausalLM, load_model, register_models

sys.path.insert(0, os.path.dirname(__file__))
from test_models_reference import (VARIANTS, VOCAB, official_config, official_weights,  # noqa: E402
                                   reference_logits, write_official_folder)

register_models()  # done by `import seqpack` once the package exports it; idempotent
CLASSES = {"internlm": InternLMForCausalLM, "internlm2": InternLM2ForCausalLM, "baichuan": BaichuanForCausalLM}
DOCS = [12, 5, 1, 9, 3]  # 12 and 9 exceed max_position_embeddings=8 (dynamic NTK per document), a 1-token doc


def _load(folder, attn):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32)


def _docs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in DOCS]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    cfg = official_config(request.param)
    sd = official_weights(cfg)
    fmt = "bin" if cfg["model_type"] == "internlm" else "safetensors"
    folder = write_official_folder(tmp_path_factory.mktemp(request.param), cfg, sd, fmt)
    return request.param, cfg, sd, folder


def test_official_folder_matches_published_math(variant):
    name, cfg, sd, folder = variant
    model = _load(folder, "eager")
    assert type(model) is CLASSES[cfg["model_type"]]
    for doc in _docs()[:2]:  # one longer than max_position_embeddings, one shorter
        with torch.no_grad():
            got = model(input_ids=doc[None]).logits[0]
        ref = reference_logits(cfg, sd, doc)
        assert (got.double() - ref).abs().max() <= 1e-5, name


def test_packed_equals_per_document(variant):
    """Packed row (seqpack attention) == each document alone (eager): logits, loss, every gradient."""
    name, cfg, sd, folder = variant
    ref, model = _load(folder, "eager"), _load(folder, "seqpack")
    docs = _docs()
    batch = seqpack.pack(docs, pad_to=sum(DOCS) + 4)  # trailing pad segment
    logits = model(**batch.model_inputs()).logits
    loss = seqpack.causal_lm_loss(logits, batch)
    loss.backward()
    ref_logits, loss_sum, count = [], 0.0, 0
    for d in docs:
        out = ref(input_ids=d[None]).logits[0]
        ref_logits.append(out)
        loss_sum = loss_sum + torch.nn.functional.cross_entropy(out[:-1], d[1:], reduction="sum")
        count += d.numel() - 1
    (loss_sum / count).backward()
    n = sum(DOCS)
    assert (logits[0, :n] - torch.cat(ref_logits)).abs().max() <= 1e-5, name
    assert abs(loss.item() - loss_sum.item() / count) <= 1e-5, name
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        g_ref = ref_params[pname].grad
        err = (p.grad - g_ref).norm() / g_ref.norm()
        assert err <= 1e-4, f"{name} {pname}: relative gradient error {err:.2e}"


def test_save_pretrained_writes_official_layout(variant, tmp_path):
    name, cfg, sd, folder = variant
    model = _load(folder, "seqpack")
    model.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "config.json"))
    for key in ("model_type", "auto_map", "architectures", "hidden_size", "num_attention_heads"):
        assert saved[key] == cfg[key], f"{name}: config.json {key}={saved[key]!r}, published {cfg[key]!r}"
    for key in ("rope_scaling", "rotary", "max_position_embeddings", "num_key_value_heads", "bias"):
        if key in cfg:
            assert saved.get(key, getattr(model.config, key)) == cfg[key], f"{name}: {key}"
    if "max_position_embeddings" not in cfg:  # Baichuan2-13B style stays ALiBi after the round trip
        assert saved.get("max_position_embeddings") is None
    weights = load_file(tmp_path / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in sd.items()}, name
    reloaded = _load(tmp_path, "eager")
    doc = _docs()[0][None]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=doc).logits, _load(folder, "eager")(input_ids=doc).logits), name


@pytest.mark.parametrize("name", ["internlm2-gqa-dynamic-ntk", "baichuan2-13b-alibi-6-heads"])
def test_generate_with_cache_matches_full_forward(name, tmp_path):
    cfg = official_config(name)
    folder = write_official_folder(tmp_path, cfg, official_weights(cfg))
    prompt = _docs()[1][None]
    for attn in ("seqpack", "eager"):
        model = _load(folder, attn)
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            full = model(input_ids=out[:, :-1], use_cache=False).logits
        assert torch.equal(full[0, prompt.shape[1] - 1:].argmax(-1), out[0, prompt.shape[1]:]), (name, attn)


def test_weights_not_matching_config_name_tensor_and_shapes(tmp_path):
    cfg = official_config("internlm2-gqa-dynamic-ntk")
    sd = official_weights(cfg)
    sd["model.layers.1.attention.wqkv.weight"] = torch.zeros(40, 32)  # a checkpoint with 1 KV head per group
    folder = write_official_folder(tmp_path, cfg, sd)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.attention\.wqkv\.weight.*\(40, 32\).*\(64, 32\)"):
        load_model(folder)
    with pytest.raises(ValueError, match=r"config\.json not found"):
        load_model(tmp_path / "missing")


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match=r"rope_scaling must be"):
        seqpack.models.InternLM2Config(rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match=r"num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        seqpack.models.InternLM2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"rotary must be"):
        seqpack.models.InternLMConfig(rotary={"base": 10000, "type": "ntk"})


def _naive_alibi(q, k, v, slopes, softcap=None):
    """q [Lq, N, D], k/v [Lk, Nkv, D], queries = the last Lq keys; per-head loop -> [Lq, N, D]."""
    Lq, N, D = q.shape
    Lk = k.shape[0]
    out = torch.empty_like(q)
    for h in range(N):
        kv = h // (N // k.shape[1])
        s = q[:, h] @ k[:, kv].T * D ** -0.5
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        for a in range(Lq):
            t = Lk - Lq + a
            for b in range(Lk):
                s[a, b] = s[a, b] + slopes[h] * (b - t) if b <= t else -float("inf")
        out[:, h] = torch.softmax(s, -1) @ v[:, kv]
    return out


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_alibi_kernels_match_naive_per_document(softcap):
    """AttnSpec.alibi_slopes: the bucketed varlen kernel adds the bias within each document (GQA, unequal
    lengths in different buckets), and the dense-mask path (generation with a cache) adds it too."""
    from seqpack.attention.kernels import AttnSpec, masked_attention, varlen_attention
    from seqpack.models import alibi_slopes

    g = torch.Generator().manual_seed(0)
    lengths = [9, 2, 7, 1, 5]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    q, k, v = torch.randn(cu[-1], 6, 8, generator=g), torch.randn(cu[-1], 3, 8, generator=g), \
        torch.randn(cu[-1], 3, 8, generator=g)
    slopes = torch.tensor(alibi_slopes(6))
    spec = AttnSpec(scale=8 ** -0.5, softcap=softcap, alibi_slopes=slopes)
    out = varlen_attention(q, k, v, cu, max(lengths), spec, "sdpa")
    ref = torch.cat([_naive_alibi(q[a:b], k[a:b], v[a:b], slopes, softcap) for a, b in zip(cu, cu[1:])])
    assert (out - ref).abs().max() <= 1e-5
    # cache step: 3 new queries against 7 keys, dense causal mask
    qd, kd, vd = q[:3][None].transpose(1, 2), k[:7][None].transpose(1, 2), v[:7][None].transpose(1, 2)
    dense = masked_attention(qd, kd, vd, None, spec)[0].transpose(0, 1)  # [3, N, D]
    assert (dense - _naive_alibi(q[:3], k[:7], v[:7], slopes, softcap)).abs().max() <= 1e-5


def test_packed_from_position_ids_only_and_load_model(variant):
    """Packing detected from restarting position_ids (no cu_seq_lens), as transformers' flash path does; the
    dynamic-NTK document lengths come from the same restarts. load_model defaults to seqpack attention."""
    name, cfg, sd, folder = variant
    model = load_model(folder, dtype=torch.float32)
    assert model.config._attn_implementation == "seqpack"
    batch = seqpack.pack(_docs())
    with torch.no_grad():
        full = model(**batch.model_inputs()).logits
        pos_only = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    assert (full - pos_only).abs().max() <= 1e-6, name


def test_model_loss_z_loss_and_gradient_checkpointing(tmp_path):
    """The model's own loss (labels / shift_labels) equals causal_lm_loss; Baichuan2's published z-loss term
    (z_loss_weight * mean of max-logit^2) is added; gradient checkpointing leaves packed gradients unchanged."""
    cfg = official_config("baichuan2-7b-rope")
    folder = write_official_folder(tmp_path, cfg, official_weights(cfg))
    batch = seqpack.pack(_docs())
    model = _load(folder, "seqpack")
    out = model(**batch.model_inputs(with_labels=True))
    assert abs(out.loss.item() - seqpack.causal_lm_loss(out.logits, batch).item()) <= 1e-6
    doc = _docs()[0][None]
    z_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, z_loss_weight=0.1)
    with torch.no_grad():
        z_out = z_model(input_ids=doc, labels=doc)
    shift = z_out.logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(shift, doc[0, 1:]) + 0.1 * (shift.max(-1).values ** 2).mean()
    assert abs(z_out.loss.item() - expected.item()) <= 1e-5
    grads = []
    for checkpointing in (False, True):
        m = _load(folder, "seqpack").train()
        if checkpointing:
            m.activation_checkpointing_enable()
            assert m.model.layers[0].gradient_checkpointing
        seqpack.causal_lm_loss(m(**batch.model_inputs()).logits, batch).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-6


def test_internlm_cached_generation_past_max_positions_matches_published_code(tmp_path):
    """Published modeling_internlm.py caches keys unrotated and, at every step, rotates all of them with the
    dynamic-NTK table of the current length; past max_position_embeddings (8 here) that differs from caching
    rotated keys (by 4e-2..2e-1 in logits after a few steps), and from a full forward. Greedy generation follows
    these logits, so it picks the published code's tokens."""
    cfg = official_config("internlm-dynamic-ntk")
    sd = official_weights(cfg)
    folder = write_official_folder(tmp_path, cfg, sd)
    ids = torch.randint(3, VOCAB, (14,), generator=torch.Generator().manual_seed(1))
    prompt = 5  # the first 3 steps stay within max_position_embeddings, the next 6 go past it
    for attn in ("seqpack", "eager"):
        model, cache = _load(folder, attn), {}
        with torch.no_grad():
            out = model(input_ids=ids[None, :prompt], use_cache=True)
            assert (out.logits[0].double() - reference_logits(cfg, sd, ids[:prompt], cache)).abs().max() <= 1e-5
            for t in range(prompt, ids.numel()):
                out = model(input_ids=ids[None, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
                want = reference_logits(cfg, sd, ids[t:t + 1], cache)
                assert (out.logits[0].double() - want).abs().max() <= 1e-5, (attn, t)
