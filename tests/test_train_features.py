"""`seqpack train` with the step features on and off: chunked loss, tiled MLP, background prefetch. Same losses
over 20 optimizer steps (to 1e-6 relative: the features change float32 summation order only, and 20 AdamW steps
on a tiny model keep that at ~1e-7), and the config keys are validated."""

import json
from pathlib import Path

import pytest

from seqpack.train import load_config, train

TINY = ["--model.hidden_size", "32", "--model.num_layers", "2", "--model.num_attention_heads", "4",
        "--model.num_kv_attention_heads", "2", "--data.seq_len", "96", "--data.micro_num", "2",
        "--data.max_docs", "60", "--train.tensorboard", "False", "--lr_scheduler.total_steps", "20",
        "--ckpt.enable_save_ckpt", "False", "--ckpt.export_hf", "False", "--adam.lr", "1e-2"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_features_on_and_off_give_the_same_losses(tmp_path, capsys):
    off = ["--loss.chunked", "False", "--model.tiled_mlp", "False"]
    on = ["--loss.chunked", "True", "--loss.chunk_size", "40", "--model.tiled_mlp", "32"]  # 96 = 2.4 chunks, 3 tiles
    result = {}
    for name, extra in (("off", off), ("on", on)):
        train(load_config(None, [*TINY, *extra, "--train.run_dir", str(tmp_path / name)]))
        result[name] = losses(tmp_path / name)
    assert len(result["off"]) == 20 and result["off"][-1] < result["off"][0] - 0.5  # it learns
    for step, (a, b) in enumerate(zip(result["on"], result["off"]), 1):
        assert abs(a - b) <= 1e-6 * abs(b), (step, a, b)
    assert "fused" not in capsys.readouterr().out  # "auto" on CPU: no Liger kernels, no message


@pytest.mark.parametrize("key, value, message", [
    ("model.tiled_mlp", "0", "model.tiled_mlp=0 is not supported"),
    ("model.fused_kernels", "'yes'", "model.fused_kernels='yes' is not supported: choose 'auto', True or False"),
    ("loss.chunk_size", "0", "loss.chunk_size=0 is not supported"),
])
def test_bad_feature_keys_are_named(key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_config(None, [f"--{key}", value])


def test_fused_kernels_true_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"model.fused_kernels=True: it needs a CUDA device \(this run is on cpu\)"):
        train(load_config(None, [*TINY, "--model.fused_kernels", "True", "--train.run_dir", str(tmp_path)]))


def test_features_compose_with_sequence_parallel_and_fsdp2(tmp_path):
    """sp=2 over two gloo processes (FSDP2, SP shards, the head weight gathered inside the forward) with chunked
    loss and tiled MLP == one process with both off. Tolerance as tests/test_train_distributed.py: 1e-5 relative
    (the all-to-alls and the sharded reductions change float32 summation order; observed ~6e-8)."""
    import os
    import subprocess
    import sys

    short = [*TINY, "--lr_scheduler.total_steps", "3", "--data.seq_len", "64"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "seqpack.cli", "train", *short, "--model.tiled_mlp", "16",
                           "--loss.chunk_size", "24", "--parallel.tensor.size", "2", "--nproc", "2",
                           "--run_dir", str(tmp_path / "sp2")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    train(load_config(None, [*short, "--loss.chunked", "False", "--train.run_dir", str(tmp_path / "single")]))
    got, want = losses(tmp_path / "sp2"), losses(tmp_path / "single")
    assert len(got) == len(want) == 3
    for step, (a, b) in enumerate(zip(got, want), 1):
        assert abs(a - b) <= 1e-5 * abs(b), (step, got, want)
