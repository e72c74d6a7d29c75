"""InternEvo <-> Hugging Face conversion: bit-identical round trips, logits against transformers' Llama (the same
math as InternLM / InternLM2), InternEvo's own on-disk variants, tokenizer, sharding. Errors: test_convert_errors.py.
"""

import json
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from seqpack.convert import hf_to_internevo, internevo_to_hf
from seqpack.convert.families import Arch
from seqpack.convert.hf import read_state
from seqpack.convert.layouts import Split, merge_tp, partition_uniform, permute_rotary, split_tp
from seqpack.convert.reference import internevo_logits

VOCAB, H, INTER, LAYERS, HEADS = 120, 32, 40, 3, 4  # INTER not a multiple of 256; 3 layers on 2 stages: 1 + 2
KV = {"internlm": 4, "internlm2": 2}
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def make_llama(family: str, seed: int = 0, rope_theta: float = 10000.0) -> LlamaForCausalLM:
    """A Llama with random weights everywhere (biases, norms too): InternLM == Llama with q/k/v/o biases,
    InternLM2 == Llama with a fused group-major wqkv."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV[family], attention_bias=family == "internlm",
                      rope_theta=rope_theta, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def official_state(model: LlamaForCausalLM, family: str) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if family == "internlm":
        return sd
    D, q = H // HEADS, HEADS // KV[family]
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(LAYERS):
        p, o = f"model.layers.{i}.", f"model.layers.{i}."
        wq = sd[p + "self_attn.q_proj.weight"].view(KV[family], q, D, H)
        wk = sd[p + "self_attn.k_proj.weight"].view(KV[family], 1, D, H)
        wv = sd[p + "self_attn.v_proj.weight"].view(KV[family], 1, D, H)
        out[o + "attention.wqkv.weight"] = torch.cat([wq, wk, wv], 1).reshape(-1, H)  # group-major
        out[o + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[o + f"feed_forward.{ours}.weight"] = sd[p + f"mlp.{theirs}.weight"]
        out[o + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[o + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


def write_hf_folder(folder: Path, family: str, state: dict, rope_theta: float = 10000.0) -> Path:
    """An official-layout HF folder written without seqpack (config.json + one safetensors file)."""
    folder.mkdir(parents=True)
    cfg = {"architectures": ["InternLM2ForCausalLM" if family == "internlm2" else "InternLMForCausalLM"],
           "model_type": family, "bias": family == "internlm", "hidden_size": H, "intermediate_size": INTER,
           "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 64, "torch_dtype": "float32", "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if family == "internlm2":
        cfg.update(num_key_value_heads=KV[family], rope_theta=rope_theta, rope_scaling=None)
    else:
        cfg["rotary"] = {"base": rope_theta, "type": "origin"}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def train_tiny_spm(folder: Path) -> Path:
    """A BPE sentencepiece model (vocab VOCAB) trained on the standard library's json package sources."""
    import sentencepiece as spm

    files = sorted((STDLIB / "json").glob("*.py"))
    lines = [line for f in files for line in f.read_text().splitlines() if line.strip()]
    prefix = folder / "tok"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=VOCAB,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_tiny_spm(tmp_path_factory.mktemp("sp"))


def load_shards(folder: Path, tp: int, pp: int) -> list[dict]:
    """The written shards joined per tp rank with global layer indices (InternEvo's own stage bounds)."""
    bounds = partition_uniform(LAYERS, pp)
    ranks = []
    for t in range(tp):
        rank = {}
        for p in range(pp):
            for k, v in torch.load(folder / f"model_tp{t}_pp{p}.pt", weights_only=True).items():
                parts = k.split(".")
                if parts[0] in ("layers", "blocks"):
                    parts[1] = str(int(parts[1]) + bounds[p][0])
                rank[".".join(parts)] = v
        ranks.append(rank)
    return ranks


def test_layout_primitives():
    assert partition_uniform(5, 2) == [(0, 2), (2, 5)] and partition_uniform(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    w = torch.randn(24, 5)
    for split in (Split.COL, Split.ROW, Split.QKV3, Split.EMBED):
        t = w if split is not Split.ROW else w.T.contiguous()
        parts = split_tp("w", t, split, 2, embed_split_hidden=False)
        assert torch.equal(merge_tp("w", parts, split, embed_split_hidden=False), t)
    qkv3 = split_tp("w", w, Split.QKV3, 2)  # rank 0 = first halves of the q, k, v blocks
    assert torch.equal(qkv3[0], torch.cat([w[0:4], w[8:12], w[16:20]]))
    x = torch.arange(8.0)[:, None]  # one head, D=8: interleaved pairs (0,1),(2,3).. -> (0,4),(1,5)..
    half = permute_rotary(x, 8, [True], to_half=True)
    assert half.flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(permute_rotary(half, 8, [True], to_half=False), x)


CASES = [("internlm2", 2, 1, False, True), ("internlm2", 1, 2, True, False),
         ("internlm", 2, 1, True, False), ("internlm", 1, 2, False, True)]


@pytest.mark.parametrize("family,tp,pp,interleaved,embed_split", CASES)
def test_round_trip_bit_identical_and_logits(tmp_path, sp_model, family, tp, pp, interleaved, embed_split):
    llama = make_llama(family, rope_theta=500.0)
    state = official_state(llama, family)
    src = write_hf_folder(tmp_path / "hf", family, state, rope_theta=500.0)
    evo, back = tmp_path / "evo", tmp_path / "back"
    s1 = hf_to_internevo(src, evo, tp_size=tp, pp_size=pp, embed_split=embed_split, qk_interleaved=interleaved)
    assert (s1.tp_out, s1.pp_out, s1.layers) == (tp, pp, LAYERS) and len(s1.files) == tp * pp
    cfg = torch.load(evo / "model_config.pt", weights_only=True)
    assert cfg["qk_interleaved"] == interleaved and cfg["rope_base"] == 500.0
    assert cfg["multiple_of"] * -(-int(H * cfg["mlp_ratio"]) // cfg["multiple_of"]) == INTER  # InternEvo's formula

    # the InternEvo side, computed on the tp shards themselves, matches the trusted transformers model
    ids = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = llama(ids[None]).logits[0].double()
    arch = Arch(family, LAYERS, H, HEADS, KV[family], VOCAB, INTER, family == "internlm")
    got = internevo_logits(arch, load_shards(evo, tp, pp), ids, interleaved=interleaved, embed_split_hidden=embed_split,
                           rope_theta=500.0, eps=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    s2 = internevo_to_hf(evo, back, sp_model, dtype="float32", max_pos=64)
    assert (s2.tp_in, s2.pp_in, s2.parameters) == (tp, pp, sum(v.numel() for v in state.values()))
    again = read_state(back)
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)
    src_cfg, out_cfg = json.loads((src / "config.json").read_text()), json.loads((back / "config.json").read_text())
    same = ["model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
            "rms_norm_eps", "bias", "max_position_embeddings", "rope_theta", "num_key_value_heads", "rotary"]
    assert {k: src_cfg.get(k) for k in same} == {k: out_cfg.get(k) for k in same}
    assert out_cfg["auto_map"]["AutoModelForCausalLM"].endswith("ForCausalLM")


@pytest.mark.parametrize("family", ["internlm", "internlm2"])
def test_native_model_logits_and_verify(tmp_path, sp_model, family):
    models = pytest.importorskip("seqpack.models")
    models.register_models()
    llama = make_llama(family, seed=3)
    src = write_hf_folder(tmp_path / "hf", family, official_state(llama, family))
    s1 = hf_to_internevo(src, tmp_path / "evo", tp_size=2, pp_size=2, qk_interleaved=True, verify=True)
    s2 = internevo_to_hf(tmp_path / "evo", tmp_path / "back", sp_model, dtype="float32", max_pos=64, verify=True)
    assert s1.max_abs_logit_diff < 1e-4 and s2.max_abs_logit_diff < 1e-4
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)


def _fake_internevo_config_class():
    """Pickle model_config.pt as InternEvo does: an ``internlm.core.context.parallel_context.Config``."""
    mod = types.ModuleType("internlm.core.context.parallel_context")
    Config = type("Config", (dict,), {"__module__": mod.__name__})
    mod.Config = Config
    names = ["internlm", "internlm.core", "internlm.core.context", mod.__name__]
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update({n: types.ModuleType(n) for n in names[:-1]} | {mod.__name__: mod})
    return Config, saved


@pytest.mark.parametrize("fusion", [True, False])
def test_reads_internevo_saved_variants(tmp_path, sp_model, fusion):
    """Newer InternEvo saves InternLM2's wqkv as wq/wk/wv (row blocks of the fused tensor when
    enable_qkv_fusion, true heads otherwise), prefixes keys with ``model.`` and pickles a Config class."""
    family, tp = "internlm2", 2
    state = official_state(make_llama(family, seed=5), family)
    src = write_hf_folder(tmp_path / "hf", family, state)
    evo = tmp_path / "evo"
    hf_to_internevo(src, evo, tp_size=tp)
    D, q, g = H // HEADS, HEADS // KV[family], KV[family] // tp
    for t in range(tp):
        path = evo / f"model_tp{t}_pp0.pt"
        shard = torch.load(path, weights_only=True)
        out = {}
        for k, v in shard.items():
            if k.endswith("attention.wqkv.weight"):
                if fusion:  # InternEvo's _qkv_save_convert: blocks [q_dim, kv_dim, kv_dim] / tp of the fused rows
                    parts = v.split([HEADS * D // tp, KV[family] * D // tp, KV[family] * D // tp])
                else:
                    grouped = v.view(g, q + 2, D, H)
                    parts = [grouped[:, :q], grouped[:, q], grouped[:, q + 1]]
                for c, part in zip("qkv", parts, strict=True):
                    out["model." + k.replace("wqkv", f"w{c}")] = part.reshape(-1, H).clone()
            else:
                out["model." + k] = v
        torch.save(out, path)
    cfg = torch.load(evo / "model_config.pt", weights_only=True)
    cfg.update(enable_qkv_fusion=fusion)
    Config, saved = _fake_internevo_config_class()
    try:
        torch.save(Config(cfg), evo / "model_config.pt")
    finally:
        for n, m in saved.items():
            sys.modules.pop(n) if m is None else sys.modules.__setitem__(n, m)
    internevo_to_hf(evo, tmp_path / "back", sp_model, dtype="float32")
    again = read_state(tmp_path / "back")
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_internlm_version_and_shards(tmp_path, sp_model):
    """InternLM's --version 1 puts down_proj in w3; reading tells w2/w3 apart by shape. Small --max_shard gives
    several safetensors files and an index."""
    state = official_state(make_llama("internlm", seed=7), "internlm")
    src = write_hf_folder(tmp_path / "hf", "internlm", state)
    hf_to_internevo(src, tmp_path / "evo", tp_size=2, version=1)
    shard = torch.load(tmp_path / "evo" / "model_tp0_pp0.pt", weights_only=True)
    assert torch.equal(shard["blocks.0.mlp.w3.weight"], state["model.layers.0.mlp.down_proj.weight"][:, : INTER // 2])
    s = internevo_to_hf(tmp_path / "evo", tmp_path / "back", sp_model, dtype="float32", max_shard="20KB")
    assert len(s.files) > 1 and any("down_proj <- w3" in n for n in s.notes)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) and len(set(index["weight_map"].values())) == len(s.files)
    again = read_state(tmp_path / "back")
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_tokenizer_from_sentencepiece_matches(tmp_path, sp_model):
    import sentencepiece as spm

    state = official_state(make_llama("internlm2"), "internlm2")
    src = write_hf_folder(tmp_path / "hf", "internlm2", state)
    hf_to_internevo(src, tmp_path / "evo")
    internevo_to_hf(tmp_path / "evo", tmp_path / "back", sp_model)
    tok, sp = AutoTokenizer.from_pretrained(tmp_path / "back"), spm.SentencePieceProcessor(model_file=str(sp_model))
    lines = (STDLIB / "json" / "decoder.py").read_text().splitlines()[:200] + ["  two  spaces ", "x=1;  y = 'é'"]
    for line in lines:
        assert tok(line)["input_ids"] == [1] + sp.encode(line), line
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    internevo_to_hf(tmp_path / "evo", tmp_path / "copied", tmp_path / "back")  # a tokenizer folder is copied
    assert AutoTokenizer.from_pretrained(tmp_path / "copied")("def f(x):")["input_ids"] == tok("def f(x):")["input_ids"]


def test_norm_head_and_bin_input(tmp_path, sp_model):
    """norm_head checkpoints get L2-normalised output rows; pytorch_model.bin folders are read too."""
    state = official_state(make_llama("internlm2", seed=9), "internlm2")
    src = tmp_path / "hf"
    write_hf_folder(src, "internlm2", state)
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no safetensors weights \(--safetensors\)"):
        hf_to_internevo(src, tmp_path / "evo", safetensors=True)
    hf_to_internevo(src, tmp_path / "evo", tp_size=2)
    cfg = torch.load(tmp_path / "evo" / "model_config.pt", weights_only=True)
    torch.save({**cfg, "norm_head": True}, tmp_path / "evo" / "model_config.pt")
    s = internevo_to_hf(tmp_path / "evo", tmp_path / "back", sp_model, dtype="float32")
    out = read_state(tmp_path / "back")["output.weight"]
    torch.testing.assert_close(out, torch.nn.functional.normalize(state["output.weight"], dim=-1))
    assert "norm_head: output rows L2-normalised" in s.notes


def test_tokenizer_folder_with_remote_code_class(tmp_path, sp_model):
    """An official InternLM2 tokenizer folder: tokenizer.model + a remote-code class named in
    tokenizer_config.json; tokenizer.json is built from the model and the special ids are read from the files."""
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}))
    state = official_state(make_llama("internlm2"), "internlm2")
    hf_to_internevo(write_hf_folder(tmp_path / "hf", "internlm2", state), tmp_path / "evo")
    internevo_to_hf(tmp_path / "evo", tmp_path / "out", tok_dir)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "tokenizer.model").is_file()
