"""Bad input to the converters: a ValueError that names the problem, and nothing written (no target folder, no
temp folder left behind). Also the command line (``seqpack convert``, the InternEvo-named scripts)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from test_convert import make_llama, official_state, train_tiny_spm, write_hf_folder

from seqpack import cli
from seqpack.convert import cli as convert_cli
from seqpack.convert import hf_to_internevo, internevo_to_hf


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_tiny_spm(tmp_path_factory.mktemp("sp"))


@pytest.fixture
def evo(tmp_path):
    """A tp=2 x pp=2 InternLM2 InternEvo folder made from an official HF folder."""
    src = write_hf_folder(tmp_path / "hf", "internlm2", official_state(make_llama("internlm2"), "internlm2"))
    hf_to_internevo(src, tmp_path / "evo", tp_size=2, pp_size=2)
    return tmp_path / "evo"


def assert_nothing_written(tgt):
    assert not tgt.exists()
    assert not [p for p in tgt.parent.iterdir() if p.name.startswith(f".{tgt.name}.")]


def test_missing_shard(evo, sp_model):
    (evo / "model_tp1_pp1.pt").unlink()
    with pytest.raises(ValueError, match=r"missing shard file\(s\) \['model_tp1_pp1.pt'\]"):
        internevo_to_hf(evo, evo.parent / "out", sp_model)
    assert_nothing_written(evo.parent / "out")


def test_mismatched_tp_shards(evo, tmp_path, sp_model):
    shard = torch.load(evo / "model_tp1_pp0.pt", weights_only=True)
    norm = shard["layers.0.attention_norm.weight"]
    shard["layers.0.attention_norm.weight"] = norm + 1  # replicated tensors must agree across tp ranks
    torch.save(shard, evo / "model_tp1_pp0.pt")
    with pytest.raises(ValueError, match=r"layers.0.attention_norm.weight.*identical on every tp rank"):
        internevo_to_hf(evo, tmp_path / "out", sp_model)
    shard["layers.0.attention_norm.weight"] = norm
    shard["layers.0.feed_forward.w1.weight"] = shard["layers.0.feed_forward.w1.weight"][:-1]  # from another model
    torch.save(shard, evo / "model_tp1_pp0.pt")
    with pytest.raises(ValueError, match=r"feed_forward.w1.weight.*tp rank 1 has shape \(19, 32\)"):
        internevo_to_hf(evo, tmp_path / "out", sp_model)
    del shard["layers.0.feed_forward.w1.weight"]
    torch.save(shard, evo / "model_tp1_pp0.pt")
    with pytest.raises(ValueError, match=r"tp rank 1 and tp rank 0 hold different tensors"):
        internevo_to_hf(evo, tmp_path / "out", sp_model)
    assert_nothing_written(tmp_path / "out")


def test_kv_heads_not_divisible_by_tp(tmp_path):
    src = write_hf_folder(tmp_path / "hf", "internlm2", official_state(make_llama("internlm2"), "internlm2"))
    with pytest.raises(ValueError, match=r"num_key_value_heads=2 is not divisible by --tp_size 4"):
        hf_to_internevo(src, tmp_path / "out", tp_size=4)
    assert_nothing_written(tmp_path / "out")


def test_unknown_and_missing_keys(evo, tmp_path, sp_model):
    shard = torch.load(evo / "model_tp0_pp1.pt", weights_only=True)
    torch.save({**shard, "layers.0.attention.lora_A.weight": torch.zeros(2)}, evo / "model_tp0_pp1.pt")
    with pytest.raises(ValueError, match=r"model_tp0_pp1.pt: unknown key\(s\) \['layers.0.attention.lora_A.weight'\]"):
        internevo_to_hf(evo, tmp_path / "out", sp_model)
    assert_nothing_written(tmp_path / "out")
    hf = tmp_path / "hf"
    state = official_state(make_llama("internlm2"), "internlm2")
    state["model.layers.0.attention.extra.weight"] = torch.zeros(1)
    save_file(state, str(hf / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unknown tensor\(s\).*attention.extra.weight"):
        hf_to_internevo(hf, tmp_path / "out2")
    del state["model.layers.0.attention.extra.weight"], state["output.weight"]
    save_file(state, str(hf / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\).*output.weight"):
        hf_to_internevo(hf, tmp_path / "out2")
    assert_nothing_written(tmp_path / "out2")


def test_ambiguous_rotary_layout_needs_flag(evo, tmp_path, sp_model):
    cfg = torch.load(evo / "model_config.pt", weights_only=True)
    del cfg["qk_interleaved"], cfg["adapt_hf"]
    torch.save(cfg, evo / "model_config.pt")
    with pytest.raises(ValueError, match=r"neither qk_interleaved nor adapt_hf.*--qk_interleaved"):
        internevo_to_hf(evo, tmp_path / "out", sp_model)
    assert_nothing_written(tmp_path / "out")
    internevo_to_hf(evo, tmp_path / "out", sp_model, qk_interleaved=False)


def test_target_holding_a_model_needs_overwrite(evo, tmp_path, sp_model):
    out = tmp_path / "out"
    internevo_to_hf(evo, out, sp_model)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"already holds a model; pass --overwrite"):
        internevo_to_hf(evo, out, sp_model, dtype="float32")
    assert (out / "model.safetensors").read_bytes() == before
    internevo_to_hf(evo, out, sp_model, dtype="float32", overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"non-empty folder without a model"):
        internevo_to_hf(evo, other, sp_model, overwrite=True)
    assert [p.name for p in other.iterdir()] == ["readme.txt"]


def test_command_line(evo, tmp_path, sp_model, capsys):
    out = tmp_path / "hf_out"
    assert cli.main(["convert", "internevo-to-hf", "--src", str(evo), "--tgt", str(out), "--tokenizer",
                     str(sp_model), "--max_shard", "30KB"]) == 0
    printed = capsys.readouterr().out
    assert "converted internlm2 internevo-to-hf" in printed and "tp 2 -> 1, pp 2 -> 1" in printed
    assert "layers 3" in printed and "dtype bfloat16" in printed
    assert convert_cli.revert_internlm2(["--src", str(out), "--tgt", str(tmp_path / "evo2"), "--tp_size", "2",
                                         "--embed_split", "--use_flash", "--safetensors"]) == 0
    cfg = torch.load(tmp_path / "evo2" / "model_config.pt", weights_only=True)
    assert cfg["embed_split_hidden"] and cfg["use_flash_attn"] and cfg["dtype"] == "torch.bfloat16"
    assert convert_cli.convert2hf_internlm2(["--src", str(evo), "--tgt", str(out), "--tokenizer", str(sp_model),
                                             "--rotary_type", "dynamic"]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert convert_cli.convert2hf_internlm2(["--src", str(evo), "--tgt", str(out), "--tokenizer", str(sp_model),
                                             "--rotary_type", "dynamic", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
