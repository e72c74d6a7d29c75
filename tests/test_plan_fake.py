"""``seqpack plan --check-fake``: seqpack's real training step on fake tensors, tracked, against the plan."""

import json
import resource
import time

import pytest
import torch
from transformers import AutoConfig

from seqpack.cli import main
from seqpack.plan import ModelShape, PlanOptions, plan_memory
from seqpack.plan.fake import compare, fake_step, flash_attn_varlen_func, flash_stand_in

GiB = 2**30
# the bf16 row of seqpack bench plan's table (hidden 256, 4 layers, vocab 8192, T 8192, full checkpointing, chunked
# loss), here on 2 ranks with sp=2 and AdamW: FSDP2, the Ulysses all-to-all and the optimizer state all count
SMALL = ModelShape("llama", 256, 4, 8, 2, 32, 688, 8192)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("tiled", [False, True])
def test_fake_step_agrees_with_the_plan(tiled):
    """The tracked peak of the fake step is the planned allocated peak within 5 % (the plan is checked against
    measured CPU peaks by seqpack bench plan; the fake step is the same code on the GPU's sizes)."""
    opts = PlanOptions(8192, gpus=2, sp=2, checkpoint=1.0, chunked_loss=True, loss_chunk=1024, micro_num=1,
                       tiled_mlp=tiled, mlp_tile=256 if tiled else None)
    check = compare(SMALL, opts)
    assert abs(check.error) <= 0.05, (check.row(), check.fake.breakdown, check.plan.components)
    assert check.fake.breakdown["OptState"] >= 8 * SMALL.params // 2  # the AdamW moments exist before the step
    assert check.fake.where  # a module and phase, or "between modules"


def test_fake_step_sees_what_the_plan_counts():
    """Terms the fake step must see by itself: the logits kept through backward without the chunked loss (fp32 loss
    buffers of [t, V]), which dominate here, and the sharded parameters of one rank of 4."""
    opts = PlanOptions(4096, gpus=4, sp=4, checkpoint=0.0, chunked_loss=False, micro_num=1, optimizer="none")
    got = fake_step(SMALL, opts)
    plan = plan_memory(SMALL, opts)
    assert got.breakdown["Sharded Param"] == pytest.approx(SMALL.params * 4 / 4, rel=0.01)
    assert abs(plan.allocated / got.peak - 1) <= 0.05, (got, plan.components)
    assert got.peak > 1024 * 12 * SMALL.vocab_size  # [t = 1024, V] in fp32, three buffers at once


def test_full_size_allocates_nothing():
    """Hidden 4096 at 64K tokens (two Llama-3-8B layers, one rank of 8): tens of GiB tracked, seconds, no real memory."""
    shape = ModelShape("llama", 4096, 2, 32, 8, 128, 14336, 128256)
    opts = PlanOptions(65536, gpus=8, sp=8, checkpoint=1.0, chunked_loss=True, tiled_mlp=True, micro_num=1)
    before, start = _maxrss_mib(), time.perf_counter()
    got = fake_step(shape, opts)
    assert got.peak > 4 * GiB
    assert _maxrss_mib() - before < 512, "the fake step allocated real memory"
    assert time.perf_counter() - start < 120


def test_stand_in_runs_on_fake_tensors_only():
    q = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="fake tensors"):
        flash_attn_varlen_func(q, q, q, torch.tensor([0, 4]), torch.tensor([0, 4]), 4, 4, causal=True)
    from seqpack.attention import backends

    before = backends.kernel
    with flash_stand_in():
        assert backends.kernel("flash_attn").name == "flash_attn" and backends.kernel("torch_varlen") is None
    assert backends.kernel is before


def test_refusals_name_what_to_change():
    with pytest.raises(ValueError, match="offload"):
        compare(SMALL, PlanOptions(4096, gpus=2, sp=2, offload_checkpoints=True))
    with pytest.raises(ValueError, match="ring"):
        compare(SMALL, PlanOptions(4096, gpus=4, sp=4, ring=2))
    with pytest.raises(ValueError, match="precision"):
        compare(SMALL, PlanOptions(4096, gpus=2, sp=2, precision="bf16-autocast"))
    with pytest.raises(ValueError, match="--no-fused-kernels"):
        compare(SMALL, PlanOptions(4096, gpus=2, sp=2, fused_kernels=True))


def test_cli_check_fake(tmp_path, capsys):
    AutoConfig.for_model("llama", vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    common = ["plan", str(tmp_path), "--gpus", "2", "--sp", "2", "--micro-num", "1", "--checkpoint", "1",
              "--no-fused-kernels"]
    assert main(common + ["--seq_len", "4096", "--check-fake"]) == 0
    out = capsys.readouterr().out
    assert "checked on fake tensors (rank 0 of 2" in out and "tracked" in out
    assert main(common + ["--seq_len", "4096", "--check-fake", "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["check_fake"]
    assert abs(check["error"]) <= 0.05 and check["tracked"] > 0
    assert main(common + ["--max", "--check-fake"]) == 2
    assert "--check-fake checks one plan" in capsys.readouterr().err
    assert main(common + ["--seq_len", "4096", "--check-fake", "--offload-optimizer"]) == 2
    assert "offload" in capsys.readouterr().err
