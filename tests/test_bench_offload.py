"""``seqpack bench offload``: every setting runs seqpack train's step on the Llama shape the flags give, the table
has one row per setting with its ratio to the natural alternative, and the offloads report the bytes they move."""

import pytest
import torch

from seqpack.bench.offload import SETTINGS, main


def test_table_of_every_setting(capsys):
    assert main(["--seq-len", "256", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                 "--inter", "160", "--vocab", "512", "--steps", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "T=256" in out and "4/2 heads" in out and "hidden 64" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| setting")}
    assert set(rows) == set(SETTINGS)
    moved = {name: float(cells[-1]) for name, cells in rows.items()}
    assert moved["fp32"] == moved["bf16"] == 0
    # checkpoint offload: the 2 layers' [256, 64] inputs; optimizer offload: weights, gradients, moments
    assert moved["bf16 + checkpoint offload"] > 0 and moved["bf16 + optimizer offload"] > 0
    assert moved["bf16 + both offloads"] == pytest.approx(
        moved["bf16 + checkpoint offload"] + moved["bf16 + optimizer offload"], abs=0.11)
    assert rows["bf16"][2].strip().endswith("x")  # its time ratio to fp32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--device", "cuda", "--seq-len", "256"])
    assert err.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err
