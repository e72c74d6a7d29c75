"""``seqpack bench longest`` and its CPU device budget: the tracker counts exactly, the budget error fires at the
crossing allocation, the bisection's answer is checked by running T and T + granularity again, it agrees with the
plan within the planner's accuracy, and the checkpoint offload moves bytes off the tracked device."""

import pytest
import torch

from seqpack.bench.budget import BudgetExceeded, DeviceBudget
from seqpack.plan.longest import Device, Features, ModelShape, bisect_longest, find_longest, main, train_config

TINY = ModelShape("llama", 64, 2, 4, 2, 16, 192, 1024)
BUDGET = 24 * 2**20
GRAIN = 256


def test_tracker_counts_a_known_allocation_exactly():
    budget = DeviceBudget(None)
    with budget:
        x = torch.zeros(1000, dtype=torch.float32)  # 4000 bytes
        y = x.view(10, 100)  # a view: no new storage
        z = torch.ones(10, 10, dtype=torch.bfloat16) * 2  # 200 bytes kept, the ones() temporary freed
        assert budget.live == 4200
        del x, y
        assert budget.live == 200  # freed when the last view goes
        w = torch.empty(3000)
        w.untyped_storage().resize_(0)  # FSDP2 frees its gathered parameters this way
        z.add_(1)  # the next operator re-reads the size
    assert budget.live == 200
    assert budget.peak == 200 + 12000  # x was freed before w


def test_host_tensors_and_residents():
    resident = torch.zeros(256)  # 1 KiB, made before tracking
    budget = DeviceBudget(None)
    budget.resident(resident)
    with budget:
        copy = resident.clone()
        assert budget.live == 2048
        budget.host(copy)  # e.g. the checkpoint offload's host copy
        assert budget.live == 1024
        copy.mul_(2)  # an operator returning it again does not count it back
        assert budget.live == 1024


def test_budget_error_fires_at_the_crossing_allocation():
    budget = DeviceBudget(10_000)
    keep = []
    with pytest.raises(BudgetExceeded, match="device budget exceeded: aten.empty.*over the 9.8 KiB budget"):
        with budget:
            for _ in range(10):
                keep.append(torch.empty(1000))  # 4000 bytes each: the third crosses 10_000
    assert len(keep) == 2 and isinstance(BudgetExceeded("x"), MemoryError)


def test_budget_error_fires_inside_backward():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(512, 64)
    budget = DeviceBudget(None)
    with budget:
        loss = (x @ w).relu().sum()
    budget.budget = budget.live + 1000  # the backward's temporaries do not fit
    with pytest.raises(BudgetExceeded):
        with budget:
            loss.backward()


def test_bisect_finds_the_edge_from_any_first_guess():
    for edge in (0, 1, 7, 40):
        for first in (1, 5, 40, 100):
            tried = []
            lo, hi = bisect_longest(lambda n: tried.append(n) or n <= edge, first, limit=64)
            assert (lo, hi) == (edge, edge + 1) and len(set(tried)) == len(tried)


@pytest.fixture(scope="module")
def cpu():
    device = Device("cpu", BUDGET, doc_len=512, warmup_len=GRAIN)
    yield device
    device.close()


def test_longest_fits_and_the_next_multiple_does_not(cpu):
    f = Features(checkpoint=1.0)
    got = find_longest(TINY, f, cpu, GRAIN)
    assert got.measured > 0 and got.failed == got.measured + GRAIN
    cfg = train_config(TINY, f, "cpu")
    again, more = cpu.attempt(cfg, TINY.vocab_size, got.measured), cpu.attempt(cfg, TINY.vocab_size, got.failed)
    assert again.fits and not more.fits
    assert again.peak <= BUDGET < more.peak
    # the planner's accuracy: its peak within 5 % of the measured one, so its longest T within ~5 % too
    assert abs(got.planned_peak / got.peak - 1) < 0.05
    assert abs(got.measured / got.planned - 1) <= 0.05 + GRAIN / got.planned


def test_checkpoint_offload_moves_bytes_off_the_device(cpu):
    base = Features(checkpoint=1.0)
    cfg, off = train_config(TINY, base, "cpu"), train_config(TINY, Features(1.0, offload_checkpoints=True), "cpu")
    cpu.budget = 2**40  # peaks of whole steps
    try:
        with_offload, without = cpu.attempt(off, TINY.vocab_size, 2048), cpu.attempt(cfg, TINY.vocab_size, 2048)
    finally:
        cpu.budget = BUDGET
    assert with_offload.fits and without.fits
    assert without.peak - with_offload.peak > 2048 * 64 * 4 / 2  # checkpointed inputs [T, h] fp32 on the host
    no = find_longest(TINY, base, cpu, 4 * GRAIN)
    yes = find_longest(TINY, Features(1.0, offload_checkpoints=True), cpu, 4 * GRAIN)
    assert yes.measured >= no.measured > 0


def test_optimizer_offload_leaves_the_shards_on_the_host(cpu):
    cpu.budget = 2**40
    try:
        on = cpu.attempt(train_config(TINY, Features(1.0, offload_optimizer=True), "cpu"), TINY.vocab_size,
                         1024)
        off = cpu.attempt(train_config(TINY, Features(1.0), "cpu"), TINY.vocab_size, 1024)
    finally:
        cpu.budget = BUDGET
    # the two fp32 AdamW moments leave the device; the fp32 parameters do too, but FSDP2 (which the offload needs)
    # gathers device copies of the layers in use
    assert off.peak - on.peak >= 2 * 4 * TINY.params


def test_cli_errors_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cpu"])
    assert "--mem is required on the CPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--mem", "64MiB", "--offload-checkpoints"])
    assert "give --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--mem", "lots"])
    assert "--mem 'lots'" in capsys.readouterr().err


def test_cli_table(capsys):
    assert main(["--device", "cpu", "--mem", "16MiB", "--hidden", "64", "--vocab", "1024", "--doc-len", "512",
                 "--steps", "1", "--repeats", "1", "--checkpoint", "1"]) == 0
    out = capsys.readouterr().out
    assert "| longest T measured |" in out and "| checkpoint offload |" in out and "vs no offload" in out
