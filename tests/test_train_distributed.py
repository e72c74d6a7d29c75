"""`seqpack train --nproc 2` on CPU (gloo, FSDP2): data parallel and sequence parallel runs train and resume, and
their per-step losses, gradient norms and weights equal one process training on the same global batches.

The optimizer is set up as plain SGD (see ``SGD``), because that is what the math guarantees to be comparable:
two processes sum in a different order than one (the gradient reduce-scatter, the loss all-reduce, the thread
blocking of each GEMM), so every gradient differs from the one-process gradient by float32 round-off. Adam divides
each gradient element by its own running magnitude: a near-zero gradient whose last bits differ (or whose sign
flips) becomes an lr-sized, sign-dependent step, so weights after a few Adam steps depend on the CPU and BLAS,
not on seqpack. SGD's update is linear in the gradient, so round-off stays round-off.

Tolerances, from float32 round-off (unit u = 2^-24 = 6.0e-8). Summing n terms in another order changes the sum
by at most 2(n-1)·u·Σ|x_i| (Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2) and typically by
~sqrt(n)·u·Σ|x_i| (round-off signs are random):
- step losses, rel 1e-5: every sum in this model is short (n <= 128: 64-token rows x 2 micro-batches, hidden 32,
  MLP 96), worst case 254u = 1.5e-5, typically 11u = 7e-7 per sum; the loss is a mean of positive terms
  (Σ|x_i| = |Σ x_i|), and a 2-layer forward chains a handful of sums. Measured: <= 1.2e-7.
- gradient norms, rel 2e-4: the norm is the root of a sum of P = 2.8e5 squares (one per parameter), partitioned
  differently over FSDP2 shards: typically sqrt(P)·u/2 = 1.6e-5 relative. Measured: <= 1.0e-5.
- weights after 4 SGD steps, atol 1e-5·Σ_t lr_t: step t moves weight i by lr_t·g_t,i with ||g_t|| <= 1
  (clipped), and the round-off in g_t,i is ~1e-5·||g_t|| (as the norms show), so |Δw_i| <= Σ_t lr_t·1e-5 (about
  2.5e-4 here; earlier Δw carried into later gradients adds a factor close to 1 over 4 steps). Measured: 5e-6.
A broken reduction (gradients averaged instead of summed, a rank's part dropped) changes the step-2 loss by
~1e-2, the gradient norms by 2x and the weights by ~lr·|g|/2 = 5e-2 — far outside these bounds; under Adam, the
halved gradients would have gone unnoticed (its update does not depend on the gradient's scale)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seqpack.train import load_config, train
from seqpack.train.checkpoint import latest_checkpoint

TINY = ["--model.hidden_size", "32", "--model.num_layers", "2", "--model.num_attention_heads", "4",
        "--model.num_kv_attention_heads", "2", "--data.seq_len", "64", "--data.max_docs", "200",
        "--train.tensorboard", "False", "--lr_scheduler.total_steps", "4", "--ckpt.checkpoint_every", "2",
        "--hybrid_zero_optimizer.clip_grad_norm", "1.0"]
# AdamW with beta1=0, no weight decay and eps=1000 >> sqrt(v) (clipped gradients: |g| <= 1) is plain SGD with
# learning rate lr/eps = 10 (then cosine-decayed): update = lr·g/(sqrt(v̂)+eps) is a (lr/eps)-Lipschitz function of
# g, so gradient round-off is never amplified (Adam's usual eps=1e-8 makes that factor 1e8·lr).
SGD = ["--adam.lr", "10000", "--adam.adam_eps", "1000", "--adam.adam_beta1", "0", "--adam.weight_decay", "0"]


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def assert_close(got: float, want: float, rel: float, what: str) -> None:
    assert abs(got - want) <= rel * abs(want), f"{what}: {got!r} vs {want!r}, rel {abs(got - want) / abs(want):.2e}"


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
    first = cli(*TINY, *SGD, *extra, "--nproc", "2", "--run_dir", str(run_dir), "--train.max_steps", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert f"world=2 (dp={2 if name == 'dp2' else 1}, sp={1 if name == 'dp2' else 2})" in first.stdout
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000002"
    second = cli(*TINY, *SGD, *extra, "--nproc", "2", "--run_dir", str(run_dir))
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    assert "resumed from" in second.stdout and (run_dir / "hf" / "model.safetensors").is_file()
    got = records(run_dir)
    assert sorted(got) == [1, 2, 3, 4]

    overrides = [*TINY, *SGD, "--data.micro_num", single_micro_num, "--train.run_dir", str(tmp_path / "single")]
    train(load_config(None, overrides))
    want = records(tmp_path / "single")
    assert min(want[s]["loss"] for s in (2, 3, 4)) < want[1]["loss"] - 0.1, want  # SGD at lr 10 does train
    for step in want:  # tolerances: module docstring
        assert_close(got[step]["loss"], want[step]["loss"], 1e-5, f"step {step} loss")
        assert_close(got[step]["grad_norm"], want[step]["grad_norm"], 2e-4, f"step {step} gradient norm")
    # the FSDP2-sharded model was gathered into a complete HF folder with the same weights
    from transformers import AutoModelForCausalLM

    sharded = AutoModelForCausalLM.from_pretrained(run_dir / "hf").state_dict()
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "hf").state_dict()
    assert sharded.keys() == single.keys()
    worst = max((sharded[k] - single[k]).abs().max().item() for k in single)
    sgd_lr = sum(want[step]["lr"] for step in want) / 1000  # Σ_t lr_t of the SGD steps (adam.lr / adam_eps)
    assert worst <= 1e-5 * sgd_lr, f"largest weight difference {worst:.2e} > {1e-5 * sgd_lr:.2e}"
