"""The training loop on one CPU process: exact resume, crash-safe checkpoints, divergence stop, HF export.

Every run is real: a tiny Llama on the embedded corpus (first 60 stdlib files), real checkpoints on disk, a real
SIGKILL of a real `seqpack train` process. Attention dropout is on, so exact resume also depends on the RNG
state in the checkpoints.

What a resume must reproduce exactly is what seqpack controls: the same rows in the same order and the same RNG
state at every forward (both compared exactly, see ``record_forwards``). The losses then agree to float32
round-off whatever the thread count (1e-6 relative here), and bit for bit where the CPU kernels are
deterministic — one thread and ``torch.use_deterministic_algorithms(True)`` (``deterministic_cpu``), which is
how the reference run and the bitwise test run. A different thread count changes the summation order inside
the GEMMs, so a run killed at one thread count and resumed at another is equal only to round-off."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from seqpack.cli import main
from seqpack.train import TrainingDiverged, load_config, train
from seqpack.train.checkpoint import MARKER, SAVE_DELAY_ENV, latest_checkpoint, load_model_weights

TINY = ["--model.hidden_size", "32", "--model.num_layers", "2", "--model.num_attention_heads", "4",
        "--model.num_kv_attention_heads", "2", "--data.seq_len", "64", "--data.micro_num", "2",
        "--data.max_docs", "60", "--train.tensorboard", "False", "--lr_scheduler.total_steps", "6",
        "--ckpt.checkpoint_every", "2", "--ckpt.keep_last", "3", "--adam.lr", "1e-2",
        "--model.attention_dropout", "0.1"]  # dropout: exact resume needs the RNG state too


def run(run_dir: Path, *extra: str):
    return train(load_config(None, [*TINY, "--train.run_dir", str(run_dir), *extra]))


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def assert_losses_close(got: dict[int, float], want: dict[int, float], rel: float = 1e-6) -> None:
    assert sorted(got) == sorted(want), (got, want)
    for step in want:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got[step], want[step])


@contextmanager
def deterministic_cpu():
    """One thread and deterministic algorithms: every CPU kernel sums in one fixed order."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


@contextmanager
def record_forwards():
    """Yields a list that gets, at every model forward (the token embedding's call), the input ids and a hash of
    the torch RNG state (which attention dropout draws from): the data order and RNG state a resume must keep."""
    seen = []

    def record(module, args):
        if isinstance(module, torch.nn.Embedding) and module.training:  # not the packing probe (eval)
            state = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()
            seen.append((args[0].flatten().tolist(), state))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run (deterministic CPU kernels), and its forwards (2 micro-batches per step)."""
    run_dir = tmp_path_factory.mktemp("reference")
    with deterministic_cpu(), record_forwards() as forwards:
        result = run(run_dir)
    assert len(forwards) == 6 * 2
    return run_dir, result, losses(run_dir), forwards


def test_uninterrupted_run_learns_and_writes_its_folder(reference):
    run_dir, result, ref, _ = reference
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert ref[6] < ref[1] - 0.1, ref
    for name in ("seqpack_config.json", "metrics.jsonl", "loss.png", "hf/model.safetensors", "hf/config.json",
                 "hf/tokenizer.json", "checkpoints/step_00000006/COMPLETE"):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s_per_device", "mfu", "peak_mem_mib"}
    assert 0 < record["mfu"] and record["tokens_per_s_per_device"] > 0 and record["peak_mem_mib"] > 0
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_interrupted_and_resumed_run_is_bitwise_identical(reference, tmp_path):
    """Same data, same RNG state, and — with deterministic CPU kernels, as the reference — the same bits."""
    _, _, ref, ref_forwards = reference
    no_dropout = run(tmp_path / "no_dropout", "--model.attention_dropout", "0", "--train.max_steps", "1")
    assert abs(no_dropout.first_loss - ref[1]) > 1e-4  # dropout is active (far above round-off): RNG state matters
    with deterministic_cpu():
        first = run(tmp_path, "--train.max_steps", "3")  # stops after step 3 with a checkpoint of step 3
        assert first.steps == 3 and latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003"
        assert not (tmp_path / "hf").exists()  # the job is not finished: no export yet
        with record_forwards() as forwards:
            second = run(tmp_path)  # auto_resume from step 3
    assert second.steps == 6
    assert forwards == ref_forwards[3 * 2:]  # steps 4-6: the same rows in the same order, the same RNG state
    assert losses(tmp_path) == ref  # float equality: bitwise


def test_sigkill_during_save_resumes_from_previous_complete_checkpoint(reference, tmp_path):
    """Killed at one thread (the subprocess), resumed at this process's thread count: data order and RNG state
    are exact, the losses equal to round-off (bitwise only if the thread counts happen to agree)."""
    _, _, ref, ref_forwards = reference
    env = dict(os.environ, OMP_NUM_THREADS="1", **{SAVE_DELAY_ENV: "4:60"})  # step 4's save hangs after its shards
    cmd = [sys.executable, "-m", "seqpack.cli", "train", *TINY, "--train.run_dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    partial = tmp_path / "checkpoints" / ".tmp-step_00000004"
    deadline = time.time() + 120
    while not (partial / "train_state.pt").exists():  # shards, per-rank and train state written, not committed
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0].decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(p.name.endswith(".distcp") for p in partial.iterdir()) and not (partial / MARKER).exists()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"  # the partial one is never chosen
    with record_forwards() as forwards:
        result = run(tmp_path)  # restart: resumes from step 2, removes the partial folder
    assert result.steps == 6 and not partial.exists()
    assert forwards == ref_forwards[2 * 2:]  # steps 3-6: the same rows in the same order, the same RNG state
    assert_losses_close(losses(tmp_path), ref)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["step_00000002", "step_00000004", "step_00000006"]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # lr 1e30 without warmup: the first update is finite, the weights it produces overflow the forward
    diverge = ["--adam.lr", "1e30", "--lr_scheduler.warmup_ratio", "0", "--ckpt.checkpoint_every", "1",
               "--hybrid_zero_optimizer.clip_grad_norm", "0"]
    with pytest.raises(TrainingDiverged) as info:
        run(tmp_path / "api", *diverge)
    assert "at step 2" in str(info.value)
    assert main(["train", *TINY, "--run_dir", str(tmp_path), *diverge]) == 3  # the CLI: message + exit code 3
    message = capsys.readouterr().err
    assert "at step 2" in message and "weights not updated" in message and "step_00000001" in message
    assert ("loss is nan" in message or "loss is inf" in message or "norm is nan" in message), message
    good = latest_checkpoint(tmp_path / "checkpoints")
    assert good.name == "step_00000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    from seqpack.train.generate import load_for_generation

    model, _ = load_for_generation(tmp_path)  # rebuilt from the run config + the last good checkpoint
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_exported_folder_reloads_with_transformers_and_reproduces_logits(reference):
    run_dir, result, _, _ = reference
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    assert exported.config._attn_implementation in ("sdpa", "eager")
    trained = result.model.eval()  # the in-memory model at the end of training (seqpack attention)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = tokenizer("def main(argv):\n    return 0\n", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = exported(ids).logits, trained(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    # the checkpoint of the last step holds the same weights
    rebuilt = AutoModelForCausalLM.from_config(exported.config)
    load_model_weights(run_dir / "checkpoints" / "step_00000006", rebuilt)
    want = exported.state_dict()
    assert all(torch.equal(p, want[k]) for k, p in rebuilt.state_dict().items())
    assert math.isfinite(result.final_loss)


def test_run_starts_from_a_local_hf_folder(reference, tmp_path):
    """model_type "HF" + ckpt.load_ckpt_info(hf_model): the weights and tokenizer come from the folder."""
    source = reference[0] / "hf"
    with pytest.warns(UserWarning, match="model.hidden_size.* ignored: the architecture comes from"):
        result = run(tmp_path, "--model_type", "LLAMA_FROM_HF", "--ckpt.load_ckpt_info.path", str(source),
                     "--lr_scheduler.total_steps", "1", "--adam.lr", "0", "--model.hidden_size", "999")
    from safetensors.torch import load_file

    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # lr 0
    assert result.model.config.hidden_size == 32  # the folder's architecture, not model.hidden_size
    assert result.first_loss < 8.0  # starts from the trained weights, not from scratch (ln 4096 = 8.3)


def test_activation_checkpointing_leaves_the_losses_unchanged(reference, tmp_path):
    _, _, ref, _ = reference
    result = run(tmp_path, "--model.checkpoint", "True", "--train.max_steps", "3")
    layers = result.model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert_losses_close(losses(tmp_path), {s: ref[s] for s in (1, 2, 3)})


def test_loop_publishes_each_micro_batch_to_the_internevo_gpc_slot(tmp_path):
    """Hand-adapted InternEvo modeling files read cu_seqlens from gpc.config.data during forward."""
    from seqpack.compat.internevo import gpc

    seen = []

    def record(module, args):
        if type(module).__name__ == "LlamaAttention" and module.training:  # not the packing probe (eval)
            data = gpc.config.data
            seen.append((data.get("use_packed_dataset"), data.get("cu_seqlens_data_rank0"),
                         data.get("max_seqlen_data_rank0")))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run(tmp_path / "run", "--lr_scheduler.total_steps", "1")
    finally:
        handle.remove()
    assert len(seen) == 2 * 2  # 2 micro-batches x 2 layers
    for packed, cu, max_seqlen in seen:
        assert packed is True and int(cu[0]) == 0 and int(cu[-1]) == 64
        assert max_seqlen == int(cu.diff().max())
    assert "cu_seqlens_data_rank0" not in gpc.config.data  # cleared after the micro-batch
