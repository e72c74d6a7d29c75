"""On a CUDA GPU (``pytest -m cuda``; skipped elsewhere with "needs a CUDA GPU"): packed == per-document with the
real kernels, in bf16 (autocast over fp32 weights, as ``seqpack train`` runs) and fp32, and a 20-step
``seqpack train`` on the GPU with the loss falling.

bf16 rule: the packed logits' error against an fp32 per-document reference is at most 1.5x the error of the same
per-document run in bf16 (relative Frobenius norms), i.e. packing adds no error beyond what bf16 itself makes.
fp32 rule: packed == per-document within 1e-5 (TF32 off).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import seqpack
from conftest import tiny_config
from seqpack.attention.hf import backends_used
from seqpack.models import InternLM2Config, register_models

pytestmark = pytest.mark.cuda
DEVICE = torch.device("cuda", 0)  # tests/test_gpu_code_on_cpu.py points this at the CPU (stand-in kernel) in CI

DOCS = [37, 1, 150, 64, 9, 211]  # a 1-token document; longer than qwen2's window of 16
FAMILIES = {  # family -> config overrides (head dim 32: every kernel takes it)
    "llama": dict(),
    "qwen2": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "gemma2": dict(sliding_window=16, attn_logit_softcapping=30.0, final_logit_softcapping=30.0, head_dim=32,
                   query_pre_attn_scalar=32),
    "internlm2": None,
}


def _config(family: str):
    size = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=1024)
    if family == "internlm2":
        register_models()
        return InternLM2Config(**size, bias=False)
    return tiny_config(family, **size)


def _model(cfg, attn: str, device):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(device).eval()
    return seqpack.dispatch(model) if attn == "seqpack" else model  # dispatch: records the backends used


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_equals_per_document_on_gpu(family):
    device = DEVICE
    cfg = _config(family)
    ref, model = _model(cfg, "eager", device), _model(cfg, "seqpack", device)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, cfg.vocab_size, (n,), generator=g) for n in DOCS]
    batch = seqpack.pack(docs).to(device)
    with torch.no_grad():
        per_doc_fp32 = torch.cat([ref(input_ids=d[None].to(device)).logits[0] for d in docs])
        packed_fp32 = model(**batch.model_inputs()).logits[0]
        assert (packed_fp32 - per_doc_fp32).abs().max() <= 1e-5, family
        with torch.autocast(device.type, dtype=torch.bfloat16):
            per_doc_bf16 = torch.cat([ref(input_ids=d[None].to(device)).logits[0] for d in docs])
            packed_bf16 = model(**batch.model_inputs()).logits[0]
    bf16_error, packed_error = _rel(per_doc_bf16, per_doc_fp32), _rel(packed_bf16, per_doc_fp32)
    print(f"{family}: backends {backends_used(model)}; bf16 per-document error {bf16_error:.2e}, "
          f"packed {packed_error:.2e} ({packed_error / bf16_error:.2f}x)")
    assert packed_error <= 1.5 * bf16_error, (family, packed_error, bf16_error)
    if family != "gemma2":  # softcap: flash-attn if installed, else the exact SDPA path
        assert backends_used(model) in ("flash_attn+sdpa", "sdpa+torch_varlen"), backends_used(model)
        # fp32 went to SDPA, bf16 to a kernel: both appear


def test_twenty_step_train_on_gpu_loss_falls(tmp_path, capsys):
    from seqpack.train import load_config, train

    result = train(load_config(None, [
        "--model.hidden_size", "256", "--model.num_layers", "2", "--model.num_attention_heads", "8",
        "--model.num_kv_attention_heads", "2", "--data.seq_len", "1024", "--data.micro_num", "2",
        "--data.max_docs", "200", "--train.tensorboard", "False", "--lr_scheduler.total_steps", "20",
        "--adam.lr", "3e-3", "--ckpt.enable_save_ckpt", "False", "--ckpt.export_hf", "False",
        "--train.run_dir", str(tmp_path)]))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("seqpack train:"))
    print(line, f"\nloss {result.first_loss:.4f} -> {result.final_loss:.4f}")
    assert "device=cuda:0" in line and "dtype=bfloat16 autocast" in line, line
    assert "attention=flash_attn" in line or "attention=torch_varlen" in line, line
    assert result.final_loss < result.first_loss - 0.5
    assert next(result.model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("method, exact", [("seqpack", True), ("sdpa-posids", False), ("flex-packed", True)])
def test_bench_packing_on_gpu(method, exact):
    """`seqpack bench packing --device cuda` in miniature: bf16, checkpointing, MFU, exactness columns."""
    from seqpack.bench.measure import LEAK_TOLERANCE
    from seqpack.bench.packing import run_one

    r = run_one(method, 4096, steps=1, seed=0, dist="lognormal", device="cuda", model_name="small", median=1024,
                checkpointing=True)
    print(r)
    assert 0 < r["mfu"] < 1 and r["peak_mb"] > 0
    assert (r["leak"] <= LEAK_TOLERANCE) is exact
