"""``seqpack bench ring``: C virtual ring ranks on one device run ring attention's real blockwise computation, so
their output and input gradients must equal one varlen call on the whole row — on the exact path (float32) and on
a kernel that returns the log-sum-exp (the flash-attn 2.6 stand-in, bf16) — and the table reports both times."""

import pytest
import torch

import stand_in_kernels as si
from seqpack.attention.kernels import AttnSpec
from seqpack.bench.ring_blocks import lognormal_row, main, one_call, virtual_ring


@pytest.mark.parametrize("ring", [2, 3, 4])
def test_virtual_ring_equals_one_call_on_the_exact_path(ring):
    T = 96 * ring
    cu = lognormal_row(T, seed=ring)
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(T, 4, 8, generator=g) for _ in range(2))
    k, v = (torch.randn(T, 2, 8, generator=g) for _ in range(2))
    spec = AttnSpec(scale=8 ** -0.5)
    ring_result, reference = virtual_ring(q, k, v, dout, cu, ring, spec, "sdpa"), one_call(q, k, v, dout, cu, spec, "sdpa")
    for got, want in zip(ring_result, reference):
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_table_on_the_flash_stand_in(monkeypatch, capsys):
    si.install(monkeypatch, flash=si.flash_attn_varlen_func)
    assert main(["--T", "512", "--ring", "4", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--dtype", "bf16",
                 "--backend", "flash_attn", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| 512 ")][0].split("|")
    assert row[3].strip() == "flash_attn" and "(C=4)" in row[5] and row[6].strip().endswith("x")
    assert float(row[7]) < 2e-2  # bf16 outputs and gradients, merged in float32: within bf16 rounding
    assert any(call["fn"] == "flash" and call["causal"] is False for call in si.CALLS)  # off-diagonal segments


def test_bad_sizes_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--T", "100", "--ring", "4"])
    assert "multiple of" in capsys.readouterr().err
