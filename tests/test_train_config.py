"""Config loading and validation of `seqpack train`: every unknown, misspelled, wrongly typed or unsupported key
fails with a message naming it; InternEvo config files load; overrides apply."""

import warnings
from pathlib import Path

import pytest

from seqpack.cli import main
from seqpack.train.config_load import describe, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key", [
    ("data = dict(seq_lenn=128)", "data.seq_lenn"),                       # misspelled, with a suggestion
    ("dta = dict(seq_len=128)", "dta"),                                    # misspelled section
    ("parallel = dict(tensor=dict(sise=2))", "parallel.tensor.sise"),      # nested
    ("ckpt = dict(load_ckpt_info=dict(path='x', kind='hf'))", "ckpt.load_ckpt_info.kind"),
    ("adam = dict(learning_rate=1e-3)", "adam.learning_rate"),
    ("optimizer = dict(lr=1e-3)", "optimizer"),
])
def test_unknown_keys_are_named(tmp_path, text, key):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'"):
        load_config(write(tmp_path, text))


def test_misspelling_gets_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match="did you mean data.seq_len"):
        load_config(write(tmp_path, "data = dict(seq_lenn=128)"))


@pytest.mark.parametrize("text, message", [
    ("data = dict(seq_len='long')", "data.seq_len must be an int, got str 'long'"),
    ("data = dict(micro_num=2.5)", "data.micro_num must be an int"),
    ("data = dict(pack_sample_into_one=1)", "data.pack_sample_into_one must be a bool"),
    ("model = dict(checkpoint='yes')", "model.checkpoint must be a bool or a number"),
    ("parallel = dict(tensor=2)", "parallel.tensor must be a dict"),
])
def test_wrong_types_are_named(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ("parallel = dict(pipeline=dict(size=2))", "parallel.pipeline.size=2"),
    ("parallel = dict(tensor=dict(size=2, mode='mtp'))", "parallel.tensor.mode='mtp'"),
    ("parallel = dict(tensor=dict(size=4, mode='msp'))", "parallel.tensor.mode='msp'"),
    ("parallel = dict(tensor=dict(size=1, mode='ring'))", "parallel.tensor.mode='ring'"),
    ("parallel = dict(sequence_2D=dict(enable=True, head_size=2))", "parallel.sequence_2D='head_size=2, "),
    ("model = dict(num_chunks=2)", "model.num_chunks=2"),
    ("adam = dict(adam_beta2_c=0.1)", "adam.adam_beta2_c=0.1"),
    ("loss = dict(label_smoothing=0.1)", "loss.label_smoothing=0.1"),
    ("data = dict(rampup_batch_size='192 24 8')", "data.rampup_batch_size='192 24 8'"),
    ("data = dict(packing='zigzag')", "data.packing='zigzag'"),
    ("data = dict(type='dummy')", "data.type='dummy'"),
    ("data = dict(seq_len=0)", "data.seq_len=0"),
    ("ckpt = dict(load_ckpt_info=dict(path='x', ckpt_type='internevo'))", "ckpt.load_ckpt_info.ckpt_type='internevo'"),
    ("ckpt = dict(load_ckpt_info=dict(path='x', content=('model', 'optimizer')))", "ckpt.load_ckpt_info.content"),
    ("model_type = 'INTERNLM2_FROM_HF'", "model_type='INTERNLM2_FROM_HF'"),
    ("model_type = 'lama'", "model_type='lama'"),
    ("data = dict(total_steps=10)\nlr_scheduler = dict(total_steps=20)", "data.total_steps=10"),
])
def test_unsupported_choices_are_named(tmp_path, text, key):
    with pytest.raises(ValueError, match=f"{key.replace('(', '[(]').replace(')', '[)]')}.* is not supported"):
        load_config(write(tmp_path, text))


def test_overrides_apply_and_are_validated():
    cfg = load_config(None, ["--data.seq_len", "512", "--parallel.tensor.size=2", "--model.checkpoint", "0.5",
                             "--ckpt.load_ckpt_info.path", "/m", "--data.dataset_weights", "{'a': 1, 'b': 3}"])
    assert cfg.data.seq_len == 512 and cfg.parallel.tensor.size == 2 and cfg.model.checkpoint == 0.5
    assert cfg.ckpt.load_ckpt_info.path == "/m" and cfg.ckpt.load_ckpt_info.ckpt_type == "hf_model"
    assert cfg.data.dataset_weights == {"a": 1, "b": 3}
    with pytest.raises(ValueError, match="unknown config key 'data.seqlen'"):
        load_config(None, ["--data.seqlen", "5"])
    with pytest.raises(ValueError, match="has no value"):
        load_config(None, ["--data.seq_len"])


def test_internevo_flags_select_the_packing():
    assert load_config(None).packing == "cut"
    assert load_config(None, ["--data.pack_sample_into_one", "True"]).packing == "into_one"
    assert load_config(None, ["--data.use_packed_dataset", "False"]).packing == "padded"
    assert load_config(None, ["--data.packing", "bfd"]).packing == "bfd"


def test_example_configs_load():
    demo = load_config(ROOT / "configs" / "demo.py")
    default = load_config(None)
    assert demo.total_steps == default.total_steps
    demo.lr_scheduler.total_steps = default.lr_scheduler.total_steps
    assert demo == default, "configs/demo.py must describe exactly what `seqpack train` does without a config"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        big = load_config(ROOT / "configs" / "7B_hf.py")
    assert big.ckpt.load_ckpt_info.path == "/models/internlm-7b" and big.total_steps == 50000
    assert big.data.seq_len == 2048 and big.data.micro_bsz == 2 and big.model.checkpoint is True
    ignored = " ".join(str(w.message) for w in caught)
    assert "ckpt.async_upload" in ignored and "grad_scaler" in ignored and "monitor" in ignored


def test_cli_reports_the_key_and_exits_2(tmp_path, capsys):
    assert main(["train", str(write(tmp_path, "parallel = dict(pipeline=dict(size=4))"))]) == 2
    assert "parallel.pipeline.size=4" in capsys.readouterr().err
    assert main(["train", "--data.micro_nun", "2"]) == 2
    assert "data.micro_nun" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.py")]) == 2
    assert "missing.py does not exist" in capsys.readouterr().err


def test_help_lists_every_key_with_its_docstring():
    lines = describe()
    text = "\n".join(lines)
    assert "--data.seq_len (default 256): Tokens per packed sample" in text
    assert "--parallel.tensor.mode (default isp)" in text
    assert all(": " in line and not line.rstrip().endswith(":") for line in lines), "a field lacks its docstring"
