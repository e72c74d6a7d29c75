"""Bad inputs and faults, as a new (and unlucky) user meets them: each ends in a clear message that names the
offending file, line, key or value, with no traceback and nothing lost — or is a fault the run survives.

Classes: config keys and files, command-line numbers, data, Python API, the packing probe, file system (folders,
free space, a full disk mid-write, permissions, refused runs), checkpoint corruption, the run lock, signals.
Command-line cases run in-process through ``seqpack.cli.main`` (argparse errors are its ``SystemExit(2)``); only
the signal cases spawn processes (real SIGTERM / SIGINT, one and two processes). The "full disk" is a write path
patched to raise ``OSError(ENOSPC)`` — the stand-in for a disk we cannot fill here.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import seqpack
from seqpack.cli import main
from seqpack.train.checkpoint import SAVE_DELAY_ENV, complete_checkpoints, step_dir
from seqpack.train.manifest import CorruptCheckpoint, verify_checkpoint

TINY = ["--model.hidden_size", "32", "--model.num_layers", "2", "--model.num_attention_heads", "4",
        "--model.num_kv_attention_heads", "2", "--data.seq_len", "64", "--data.micro_num", "1",
        "--data.max_docs", "40", "--train.tensorboard", "False", "--lr_scheduler.total_steps", "4",
        "--ckpt.checkpoint_every", "2", "--ckpt.keep_last", "3"]


def cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stdout + stderr) of ``seqpack ARGV`` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_clear(code: int, text: str, *names: str) -> None:
    assert code not in (0, None), text
    assert "Traceback" not in text, text
    for name in names:
        assert name in text, (name, text)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run: checkpoints at steps 2 and 4 (with SHA256SUMS), an HF export."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "--run_dir", str(run)]) == 0
    return run


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


# --------------------------------------------------------------------------------------------- config keys

CONFIG_CASES = [
    (["--train.max_steps", "0"], "train.max_steps=0"),
    (["--adam.adam_beta1", "1.5"], "adam.adam_beta1=1.5"),
    (["--adam.adam_beta2", "-0.1"], "adam.adam_beta2=-0.1"),
    (["--adam.adam_eps", "-1e-8"], "adam.adam_eps=-1e-08"),
    (["--adam.lr", "-3"], "adam.lr=-3.0"),
    (["--adam.weight_decay", "-0.1"], "adam.weight_decay=-0.1"),
    (["--lr_scheduler.eta_min", "-1"], "lr_scheduler.eta_min=-1.0"),
    (["--lr_scheduler.total_steps", "0"], "lr_scheduler.total_steps=0"),
    (["--lr_scheduler.warmup_ratio", "2"], "lr_scheduler.warmup_ratio=2.0"),
    (["--hybrid_zero_optimizer.clip_grad_norm", "-1"], "hybrid_zero_optimizer.clip_grad_norm=-1.0"),
    (["--data.min_length", "-1"], "data.min_length=-1"),
    (["--data.max_docs", "0"], "data.max_docs=0"),
    (["--data.min_length_dict", "{'en': -5}"], "data.min_length_dict['en']=-5"),
    (["--model.attention_dropout", "1.5"], "model.attention_dropout=1.5"),
    (["--model.layer_norm_epsilon", "0"], "model.layer_norm_epsilon=0.0"),
    (["--model.rope_base", "-1"], "model.rope_base=-1.0"),
    (["--model.num_kv_attention_heads", "0"], "model.num_kv_attention_heads=0"),
    (["--ckpt.keep_last", "0"], "ckpt.keep_last=0"),
    (["--data.seq_lenn", "5"], "did you mean data.seq_len"),
    (["--data.seq_len", "--model.hidden_size", "64"], "--data.seq_len has no value"),
    (["--data.seq_len"], "--data.seq_len has no value"),
    (["--nproc", "0"], "argument --nproc: must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("args,named", CONFIG_CASES, ids=[" ".join(a) for a, _ in CONFIG_CASES])
def test_config_value_is_named(capsys, tmp_path, args, named):
    code, text = cli(capsys, "train", *TINY, "--lr_scheduler.total_steps", "1", "--run_dir", tmp_path / "run", *args)
    assert_clear(code, text, named)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_config_file_errors_name_file_and_line(capsys, tmp_path):
    raising = tmp_path / "raising.py"
    raising.write_text("data = dict(seq_len=64)\nimport a_module_that_does_not_exist\n")
    assert_clear(*cli(capsys, "train", raising), f"config file {raising}, line 2", "ModuleNotFoundError")
    reads = tmp_path / "reads.py"
    reads.write_text("SIZES = open('no_such_sizes.json').read()\n")
    assert_clear(*cli(capsys, "train", reads), f"{reads}, line 1", "no_such_sizes.json")
    broken = tmp_path / "broken.py"
    broken.write_text("data = dict(\n  seq_len=64,,\n)\n")
    assert_clear(*cli(capsys, "train", broken), f"config file {broken}, line 2: syntax error")
    assert_clear(*cli(capsys, "train", tmp_path / "missing.py"), f"config file {tmp_path / 'missing.py'} does not exist")


# --------------------------------------------------------------------------------------- command-line numbers

NUMBER_CASES = [
    (["generate", "x", "--max_new_tokens", "-3"], "argument --max_new_tokens: must be an integer >= 1, got -3"),
    (["generate", "x", "--temperature", "-1"], "argument --temperature: must be a number >= 0, got -1"),
    (["generate", "x", "--num_samples", "0"], "argument --num_samples"),
    (["bench", "packing", "--lengths", "-5"], "argument --lengths: must be an integer >= 1, got -5"),
    (["bench", "packing", "--steps", "0"], "argument --steps"),
    (["plan", "x.json", "--gpus", "0"], "argument --gpus"),
    (["plan", "x.json", "--checkpoint", "1.5"], "argument --checkpoint: must be a number >= 0 and <= 1, got 1.5"),
    (["tokenize", "x.jsonl", "-o", "out", "--max-length", "-1"], "argument --max-length"),
    (["data", "check", "folder", "--vocab-size", "0"], "argument --vocab-size"),
    (["convert", "hf-to-internevo", "--src", "a", "--tgt", "b", "--tp_size", "0"], "argument --tp_size"),
    (["demo", "--steps", "abc"], "argument --steps: must be an integer >= 1, got 'abc'"),
]


@pytest.mark.parametrize("args,named", NUMBER_CASES, ids=[" ".join(a) for a, _ in NUMBER_CASES])
def test_number_argument_is_range_checked(capsys, args, named):
    assert_clear(*cli(capsys, *args), named)


def test_generate_empty_prompt(capsys, trained):
    assert_clear(*cli(capsys, "generate", trained, "--prompt", "", "--max_new_tokens", "2"),
                 "--prompt '' has no tokens")


def test_plan_config_without_architecture(capsys, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    assert_clear(*cli(capsys, "plan", cfg), str(cfg), "does not set hidden_size")


# ---------------------------------------------------------------------------------------------------- data


@pytest.fixture
def ftdp(tmp_path):
    """en/a.bin and zh/b.bin, 12 documents each of 20..42 tokens; with ``negative`` every token carries no loss."""
    from seqpack.data.ftdp import FtdpWriter

    def make(name="data", negative=False):
        root = tmp_path / name
        for rel in ("en/a.bin", "zh/b.bin"):
            with FtdpWriter(root / rel) as w:
                for i in range(12):
                    ids = [3 + (i * 7 + j) % 200 for j in range(20 + 2 * i)]
                    w.add([-t for t in ids] if negative else ids)
        return root

    return make


def test_data_order_and_min_length_keys(ftdp, tmp_path):
    from seqpack.data import build_packed_loader

    root = ftdp()
    with pytest.raises(ValueError, match=r"data_order_file '.*order.txt' does not exist"):
        build_packed_loader(train_folder=root, seq_len=32, data_order_file=tmp_path / "order.txt")
    (tmp_path / "order.txt").write_text("en/a.bin\nfr/c.bin\n")
    with pytest.raises(ValueError, match=r"order.txt line 2: 'fr/c.bin' is not a file"):
        build_packed_loader(train_folder=root, seq_len=32, data_order_file=tmp_path / "order.txt")
    with pytest.raises(ValueError, match=r"min_length_dict keys \['fr'\] match no .bin file path"):
        build_packed_loader(train_folder=root, seq_len=32, min_length_dict={"en": 0, "fr": 10})
    with pytest.raises(ValueError, match=r"dataset_weights keys \['fr'\] match no .bin file"):
        build_packed_loader(train_folder=root, seq_len=32, dataset_weights={"en": 1, "zh": 1, "fr": 1})


def test_data_without_loss_tokens_stops_at_startup(capsys, ftdp, tmp_path):
    from seqpack.data.corpus import default_tokenizer

    default_tokenizer().save_pretrained(tmp_path / "tok")
    code, text = cli(capsys, "train", *TINY, "--run_dir", tmp_path / "run", "--data.train_folder", ftdp(negative=True),
                     "--data.tokenizer_path", tmp_path / "tok", "--data.seq_len", "32")
    assert_clear(code, text, "no token of the first step's rows carries loss", "negative token id")
    assert not complete_checkpoints(tmp_path / "run" / "checkpoints")


def test_tokenize_is_all_or_nothing(capsys, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "a.jsonl").write_text('{"text": "first file"}\n')
    (inputs / "b.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert_clear(*cli(capsys, "tokenize", inputs, "-o", out, "--no-progress"), f"{inputs / 'b.jsonl'} line 2")
    assert not out.exists()  # not even a.bin
    out.mkdir()
    (out / "kept.bin").write_bytes(b"earlier output")
    assert_clear(*cli(capsys, "tokenize", inputs, "-o", out, "--no-progress"), "line 2")
    assert tree(out) == {"kept.bin": b"earlier output"}  # what was there stays, nothing is added


def test_tokenize_non_utf8_names_file_and_line(capsys, tmp_path):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert_clear(*cli(capsys, "tokenize", src, "-o", tmp_path / "out", "--no-progress"),
                 f"{src} line 2: not UTF-8 text (byte 0xe9 at column 14)")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- Python API

API_CASES = [
    (lambda: seqpack.pack([[1.0, 2.5, 3.0]]), TypeError, "document 0 holds torch.float32 values"),
    (lambda: seqpack.pack([torch.tensor([1.0, 2.0])]), TypeError, "token ids must be integers"),
    (lambda: seqpack.pack([[1, 2], torch.ones(2, 3, dtype=torch.long)]), ValueError, "document 1 has shape (2, 3)"),
    (lambda: seqpack.pack([[1, -4, 2]]), ValueError, "document 0 has a negative token id (-4) at position 1"),
    (lambda: seqpack.pack([torch.tensor([True, False])]), TypeError, "torch.bool"),
    (lambda: seqpack.pack([[1, 2, 3]], loss_masks=[[[True, True, False]]]), ValueError, "loss mask 0 has shape"),
]


def _flux(li=4, lt=2, **kw):
    from seqpack.diffusion.packing import FluxSample

    args = dict(img=torch.zeros(li, 4), txt=torch.zeros(lt, 8), pooled=torch.zeros(2), img_ids=torch.zeros(li, 3),
                txt_ids=torch.zeros(lt, 3))
    return FluxSample(**{**args, **kw})


FLUX_CASES = [
    (lambda: _flux(target=torch.zeros(3, 4)), ValueError, "FluxSample.target has 3 tokens but img has 4"),
    (lambda: _flux(img=torch.zeros(4, 4, dtype=torch.long)), TypeError, "FluxSample.img has dtype torch.int64"),
    (lambda: _flux(txt=torch.zeros(1, 2, 8)), ValueError, "FluxSample.txt has shape (1, 2, 8)"),
    (lambda: _flux(timestep=3.0), ValueError, "FluxSample.timestep=3.0 must lie in [0, 1]"),
    (lambda: _flux(pooled=[0.0, 1.0]), TypeError, "FluxSample.pooled must be a torch.Tensor"),
]


def _pack_flux_mismatch():
    from seqpack.diffusion.packing import pack_flux

    pack_flux([_flux(target=torch.zeros(4, 4)), _flux(li=5, target=torch.zeros(5, 6))])


@pytest.mark.parametrize("make,kind,named", API_CASES + FLUX_CASES + [
    (_pack_flux_mismatch, ValueError, "sample 1: target has shape (5, 6), expected [5, 4]")],
    ids=[n for _, _, n in API_CASES + FLUX_CASES] + ["pack_flux target"])
def test_api_input_is_checked(make, kind, named):
    with pytest.raises(kind) as info:
        make()
    assert named in str(info.value)


# ------------------------------------------------------------------------------------------- the packing probe


def _model(model_type, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=64, num_hidden_layers=2,
                               intermediate_size=128, **kw)
    return AutoModelForCausalLM.from_config(cfg)


def test_probe_refuses_hard_coded_attention():
    model = _model("bloom", n_head=4)
    with pytest.raises(ValueError, match="BloomForCausalLM never called seqpack's attention"):
        seqpack.dispatch(model)
    assert model.config._attn_implementation != "seqpack"  # left as it was


def test_probe_refuses_hybrid_state_space_layers():
    """Jamba: attention goes through seqpack, but its Mamba layers run across the packed documents."""
    model = _model("jamba", num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                   expert_layer_period=100, num_experts=1, mamba_d_state=8)
    with pytest.raises(ValueError, match="JambaForCausalLM lets packed documents see each other"):
        seqpack.dispatch(model)


def test_probe_passes_and_leaves_no_trace():
    from seqpack.attention.hf import backends_used

    model = seqpack.dispatch(_model("llama", num_attention_heads=4, num_key_value_heads=2))
    assert backends_used(model) == "" and model.training  # the probe's call is not counted, train mode kept
    batch = seqpack.pack([[5, 6, 7], [8, 9]])
    model(**batch.model_inputs())
    assert backends_used(model) == "sdpa"


# --------------------------------------------------------------------------------------------- file system


def test_run_folder_that_is_a_file(capsys, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    assert_clear(*cli(capsys, "train", *TINY, "--run_dir", tmp_path / "run"), "train.run_dir=", "is a file")
    (tmp_path / "ck").write_text("not a folder")
    assert_clear(*cli(capsys, "train", *TINY, "--run_dir", tmp_path / "run2", "--ckpt.save_ckpt_folder",
                      tmp_path / "ck"), "ckpt.save_ckpt_folder=", "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder(capsys, tmp_path):
    (tmp_path / "run").mkdir(mode=0o555)
    assert_clear(*cli(capsys, "train", *TINY, "--run_dir", tmp_path / "run"), "train.run_dir=", "is not writable")


def test_not_enough_free_space_for_one_checkpoint(capsys, tmp_path, monkeypatch):
    import seqpack.train.guard as guard

    monkeypatch.setattr(guard.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert_clear(*cli(capsys, "train", *TINY, "--run_dir", tmp_path / "run"), "ckpt.save_ckpt_folder=",
                 "GiB free, but one checkpoint of this model takes about")


def _no_space_for(monkeypatch, module, name, when):
    """Make ``module.name`` (a write function) fail like a full disk when ``when(path)``."""
    real = getattr(module, name)

    def full(obj, path, *args, **kwargs):
        if when(str(path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, name, full)


def test_disk_full_during_a_checkpoint_keeps_the_previous(capsys, tmp_path, monkeypatch):
    _no_space_for(monkeypatch, torch, "save", lambda p: ".tmp-step_00000004" in p)
    run = tmp_path / "run"
    assert_clear(*cli(capsys, "train", *TINY, "--run_dir", run), "No space left on device",
                 "the last complete checkpoint is kept")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]  # no partial one either
    assert verify_checkpoint(run / "checkpoints" / "step_00000002")
    assert not (run / "hf").exists()


def test_disk_full_during_the_export_keeps_the_previous(capsys, run_copy, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    before = tree(run_copy / "hf")
    _no_space_for(monkeypatch, modeling_utils, "safe_save_file", lambda p: True)
    assert_clear(*cli(capsys, "train", *TINY, "--run_dir", run_copy, "--lr_scheduler.total_steps", "5"),
                 "No space left on device")
    assert tree(run_copy / "hf") == before
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".hf.")]  # no half-written export aside


def test_exports_follow_the_umask(tmp_path):
    from seqpack.train.checkpoint import export_hf

    model = _model("llama", num_attention_heads=4)
    old = os.umask(0o002)
    try:
        export_hf(model, tmp_path / "hf")
    finally:
        os.umask(old)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o775
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o664


def test_refused_resume_changes_nothing(capsys, run_copy):
    before = tree(run_copy)
    code, text = cli(capsys, "train", *TINY, "--run_dir", run_copy, "--model.hidden_size", "48")
    assert_clear(code, text, "step_00000004 does not fit this run's model (Size mismatch", "embed_tokens.weight")
    assert "FrameSummary" not in text
    assert tree(run_copy) == before  # the recorded seqpack_config.json included


def test_nan_stop_names_what_the_checkpoint_is(capsys, tmp_path):
    diverge = ["--adam.lr", "1e30", "--lr_scheduler.warmup_ratio", "0", "--ckpt.checkpoint_every", "1",
               "--hybrid_zero_optimizer.clip_grad_norm", "0"]
    code, text = cli(capsys, "train", *TINY, "--run_dir", tmp_path / "run", *diverge)
    assert code == 3 and "the last checkpoint with finite loss and gradients is" in text and "good" not in text


# ------------------------------------------------------------------------------------------------- corruption


def _damage(ckpt: Path, how: str) -> str:
    if how == "flipped byte":
        shard = ckpt / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        return str(shard)
    if how == "truncated":
        shard = ckpt / "rank0.pt"
        shard.write_bytes(shard.read_bytes()[:100])
        return str(shard)
    (ckpt / ".metadata").unlink()
    return f"{ckpt / '.metadata'} is missing"


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "missing .metadata"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(capsys, run_copy, how):
    named = _damage(run_copy / "checkpoints" / "step_00000004", how)
    with pytest.warns(UserWarning, match="trying the previous checkpoint") as warned:
        code, text = cli(capsys, "train", *TINY, "--run_dir", run_copy)
    assert code == 0 and "resumed from" in text and "step_00000002 (step 2)" in text, text
    assert any(named in str(w.message) for w in warned)
    assert (run_copy / "checkpoints" / "corrupt-step_00000004").is_dir()  # kept for inspection, never read
    assert verify_checkpoint(run_copy / "checkpoints" / "step_00000004")  # re-made by the resumed run


def test_every_checkpoint_damaged_is_an_error(capsys, run_copy):
    for step in (2, 4):
        _damage(step_dir(run_copy / "checkpoints", step), "flipped byte")
    with pytest.warns(UserWarning):
        assert_clear(*cli(capsys, "train", *TINY, "--run_dir", run_copy), "no intact checkpoint to resume from",
                     "__0_0.distcp does not match its checksum")


def test_damaged_checksum_list_and_generate(run_copy):
    from seqpack.train.checkpoint import load_model_weights

    ckpt = run_copy / "checkpoints" / "step_00000004"
    _damage(ckpt, "flipped byte")
    with pytest.raises(CorruptCheckpoint, match="__0_0.distcp does not match its checksum"):
        load_model_weights(ckpt, _model("llama", num_attention_heads=4))
    (ckpt / "SHA256SUMS").write_text("not a checksum line\n")
    with pytest.raises(CorruptCheckpoint, match="SHA256SUMS, line 1: not a sha256sum line"):
        verify_checkpoint(ckpt)


# ------------------------------------------------------------------------------------------------- the run lock

HOLD = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.lockf(fd, fcntl.LOCK_EX); os.write(fd, b'otherhost 12345\\n'); print('held', flush=True); "
        "time.sleep(60)")


def test_second_run_on_the_same_folder_is_refused(capsys, run_copy):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_copy / "seqpack.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(run_copy)
        assert_clear(*cli(capsys, "train", *TINY, "--run_dir", run_copy, "--lr_scheduler.total_steps", "6"),
                     f"run folder {run_copy} is in use by another seqpack run (host otherhost, PID 12345)")
        assert tree(run_copy) == before
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_with_a_warning(trained, tmp_path):
    from seqpack.train.guard import LOCK, RunLock

    assert not (trained / LOCK).exists()  # a finished run leaves no lock behind
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} 999999999\n")
    with pytest.warns(UserWarning, match=r"took over the lock left by host .*, PID 999999999"):
        lock = RunLock(tmp_path)
    assert (tmp_path / LOCK).read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    lock.release()
    assert not (tmp_path / LOCK).exists()


# ---------------------------------------------------------------------------------------------------- signals

LONG = [*TINY, "--lr_scheduler.total_steps", "500", "--ckpt.checkpoint_every", "1000", "--ckpt.export_hf",
        "False", "--data.max_docs", "400"]


def _spawn(run: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seqpack.cli", "train", *LONG, "--run_dir", str(run), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _wait_for(predicate, proc, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _signal_after(run: Path, sig: int, steps: int = 2) -> threading.Thread:
    """Send ``sig`` to this process once ``run`` has logged ``steps`` steps (the handler runs in the main thread)."""
    def watch():
        deadline = time.monotonic() + 120
        while _steps_logged(run) < steps and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _assert_stopped(run: Path, code: int, text: str, sig: str, world: int) -> None:
    assert code == 4 and f"stopped by {sig} after step" in text and "Traceback" not in text, (code, text)
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    assert verify_checkpoint(ckpt) and f"checkpoint {ckpt} saved" in text
    assert json.loads((ckpt / "COMPLETE").read_text())["world_size"] == world
    assert int(ckpt.name[5:]) == _steps_logged(run)  # the checkpoint holds the last finished step
    assert not (run / "seqpack.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_saves_and_stops(capsys, tmp_path, sig):
    """A real signal to this process in the middle of `seqpack train`; afterwards the handlers are restored."""
    previous = signal.getsignal(sig)
    _signal_after(tmp_path / "run", sig)
    code, text = cli(capsys, "train", *LONG, "--run_dir", tmp_path / "run")
    _assert_stopped(tmp_path / "run", code, text, signal.Signals(sig).name, 1)
    assert signal.getsignal(sig) is previous
    step = _steps_logged(tmp_path / "run")  # the same command resumes after the saved step
    code, text = cli(capsys, "train", *LONG, "--run_dir", tmp_path / "run", "--train.max_steps", step + 1)
    assert code == 0 and f"(step {step})" in text and _steps_logged(tmp_path / "run") == step + 1, text


def test_signals_on_spawned_runs(tmp_path):
    """SIGTERM to `--nproc 2`'s launcher (forwarded to both workers), and a second SIGTERM while a checkpoint is
    being written (exits at once; the previous checkpoint is intact): both runs spawned at once."""
    runs = {k: tmp_path / k for k in ("nproc2", "twice")}
    procs = {"nproc2": _spawn(runs["nproc2"], "--nproc", "2"),
             "twice": _spawn(runs["twice"], "--ckpt.checkpoint_every", "1", env={SAVE_DELAY_ENV: "2:60"})}
    try:
        tmp = runs["twice"] / "checkpoints" / ".tmp-step_00000002"
        _wait_for(lambda: (tmp / "train_state.pt").exists(), procs["twice"])  # sleeping inside the step-2 save
        procs["twice"].send_signal(signal.SIGTERM)
        time.sleep(1.2)
        procs["twice"].send_signal(signal.SIGTERM)
        _wait_for(lambda: _steps_logged(runs["nproc2"]) >= 2, procs["nproc2"])
        procs["nproc2"].send_signal(signal.SIGTERM)
        results = {k: (p.wait(timeout=120), p.communicate()[1]) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    _assert_stopped(runs["nproc2"], *results["nproc2"], "SIGTERM", 2)
    code, err = results["twice"]
    assert code == 128 + signal.SIGTERM and "second SIGTERM: exiting now without saving" in err, (code, err)
    assert [p.name for p in complete_checkpoints(runs["twice"] / "checkpoints")] == ["step_00000001"]
    assert verify_checkpoint(runs["twice"] / "checkpoints" / "step_00000001")
