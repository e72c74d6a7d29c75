"""The code of the GPU parity test runs in CI too, so ``tests/test_gpu.py`` cannot rot between the rare runs on a
GPU: its packed-vs-per-document check (fp32 within 1e-5; bf16 autocast error at most 1.5x the per-document bf16
error; the backends used) runs here on the CPU, with the torch 2.11 stand-in in place of the CUDA kernel (the real
signature, plain torch) and CPU bf16 autocast. GPU figures come only from ``pytest -m cuda`` on a GPU."""

import pytest
import torch

import stand_in_kernels as si
import test_gpu


@pytest.fixture
def cpu_with_stand_in_kernel(monkeypatch):
    monkeypatch.setattr(test_gpu, "DEVICE", torch.device("cpu"))
    si.install(monkeypatch, torch_varlen=si.varlen_attn_2_11)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "internlm2"])  # sliding window, softcap, native model
def test_gpu_parity_test_runs_on_cpu_with_the_stand_in_kernel(cpu_with_stand_in_kernel, family, capsys):
    test_gpu.test_packed_equals_per_document_on_gpu(family)
    assert f"{family}: backends" in capsys.readouterr().out
    kernel_calls = [c for c in si.CALLS if c["fn"] == "2.11"]
    if family == "gemma2":  # softcap: torch varlen cannot, the exact SDPA path runs
        assert not kernel_calls
    else:  # bf16 autocast reached the kernel with bf16 q/k/v
        assert kernel_calls and all(c["q"].dtype == c["k"].dtype == torch.bfloat16 for c in kernel_calls)
