"""`seqpack train --nproc 2` on CPU (gloo, FSDP2): data parallel and sequence parallel runs train and resume, and
their losses equal one process training on the same global batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqpack.train import load_config, train
from seqpack.train.checkpoint import latest_checkpoint

TINY = ["--model.hidden_size", "32", "--model.num_layers", "2", "--model.num_attention_heads", "4",
        "--model.num_kv_attention_heads", "2", "--data.seq_len", "64", "--data.max_docs", "60",
        "--train.tensorboard", "False", "--lr_scheduler.total_steps", "4", "--ckpt.checkpoint_every", "2",
        "--adam.lr", "1e-2"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "seqpack.cli", "train", *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("name, extra, single_micro_num", [
    # dp=2, micro_num=1: global rows of a step = rows 2k, 2k+1 -> one process with micro_num=2 sees the same rows
    ("dp2", ["--data.micro_num", "1"], "2"),
    # sp=2 (dp=1): both ranks read the same rows and split them; one process reads the same rows unsplit
    ("sp2", ["--data.micro_num", "2", "--parallel.tensor.size", "2"], "2"),
])
def test_two_process_run_trains_resumes_and_matches_one_process(tmp_path, name, extra, single_micro_num):
    run_dir = tmp_path / name
    first = cli(*TINY, *extra, "--nproc", "2", "--run_dir", str(run_dir), "--train.max_steps", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert f"world=2 (dp={2 if name == 'dp2' else 1}, sp={1 if name == 'dp2' else 2})" in first.stdout
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000002"
    second = cli(*TINY, *extra, "--nproc", "2", "--run_dir", str(run_dir))
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    assert "resumed from" in second.stdout and (run_dir / "hf" / "model.safetensors").is_file()
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4]

    overrides = [*TINY, "--data.micro_num", single_micro_num, "--train.run_dir", str(tmp_path / "single")]
    train(load_config(None, overrides))
    want = losses(tmp_path / "single")
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got, want)
    # the FSDP2-sharded model was gathered into a complete HF folder with the same weights
    from transformers import AutoModelForCausalLM

    sharded = AutoModelForCausalLM.from_pretrained(run_dir / "hf").state_dict()
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "hf").state_dict()
    assert sharded.keys() == single.keys()
    for key in single:
        assert torch.allclose(sharded[key], single[key], atol=2e-5, rtol=0), key
