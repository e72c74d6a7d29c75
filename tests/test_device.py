"""Device choice of a run, on CPU: torch.cuda is patched so that nothing touches CUDA. One process on a GPU machine
uses cuda:0 unless train.device=cpu; several processes use nccl with one GPU each; the startup line of
`seqpack train` names the device, the dtype and the attention backend actually used."""

import pytest
import torch
import torch.distributed as dist

from seqpack.parallel import init_topology
from seqpack.parallel.topology import choose_device
from seqpack.train import load_config, train
from seqpack.train.model import autocast_dtype, compute_mode, precision


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend n GPUs exist; records torch.cuda.set_device calls."""
    chosen = []

    def install(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen
    return install


def test_choose_device(fake_gpus):
    fake_gpus(2)
    assert choose_device() == ("nccl", torch.device("cuda", 0))
    assert choose_device("cuda", local_rank=1) == ("nccl", torch.device("cuda", 1))
    assert choose_device("cpu", local_rank=1) == ("gloo", torch.device("cpu"))
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but only 2 CUDA device"):
        choose_device("auto", local_rank=2)
    with pytest.raises(ValueError, match="device 'gpu' is not one of auto, cpu, cuda"):
        choose_device("gpu")
    fake_gpus(0)
    assert choose_device() == ("gloo", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"device 'cuda' requested \(train.device / --device\) but torch.cuda.is_available\(\) is False"):
        choose_device("cuda")


def test_single_process_topology_uses_the_gpu_unless_told_not_to(fake_gpus, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    chosen = fake_gpus(1)
    for device in ("auto", "cuda"):
        topo = init_topology(device=device)
        assert topo.device == torch.device("cuda", 0) and topo.world_size == 1 and not dist.is_initialized()
    assert chosen == [torch.device("cuda", 0)] * 2
    assert init_topology(device="cpu").device == torch.device("cpu")
    fake_gpus(0)
    assert init_topology().device == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda' requested"):
        init_topology(device="cuda")


def test_several_processes_use_nccl_and_one_gpu_each(fake_gpus, monkeypatch):
    chosen = fake_gpus(4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    started = []

    def init_process_group(backend):  # stop before a real group forms
        started.append(backend)
        raise RuntimeError("stop here")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(RuntimeError, match="stop here"):
        init_topology(sp=2)
    assert started == ["nccl"] and chosen == [torch.device("cuda", 3)]
    with pytest.raises(RuntimeError, match="stop here"):
        init_topology(sp=2, device="cpu")
    assert started[-1] == "gloo"


def test_precision_follows_model_dtype_on_cuda_only():
    cfg = load_config(None, [])
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    # default on CUDA: bf16 by FSDP2 mixed precision over fp32 weights (no autocast); on CPU float32
    assert compute_mode(cfg, cuda) == ("fsdp", torch.bfloat16) and compute_mode(cfg, cpu)[0] is None
    assert autocast_dtype(cfg, cuda) is None and autocast_dtype(cfg, cpu) is None
    assert precision(cfg, cuda) == "bfloat16 (FSDP2 mixed precision, fp32 weights)" and precision(cfg, cpu) == "float32"
    old = load_config(None, ["--model.mixed_precision", "autocast"])  # the autocast mode stays selectable
    assert autocast_dtype(old, cuda) == torch.bfloat16 and precision(old, cuda) == "bfloat16 autocast (fp32 weights)"
    assert autocast_dtype(load_config(None, ["--model.dtype", "torch.float32"]), cuda) is None
    assert compute_mode(load_config(None, ["--model.dtype", "torch.float32"]), cuda)[0] is None


def test_startup_line_names_device_dtype_and_attention_backend(tmp_path, capsys):
    train(load_config(None, [
        "--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_attention_heads", "4",
        "--data.seq_len", "32", "--data.micro_num", "1", "--data.max_docs", "20", "--train.tensorboard", "False",
        "--lr_scheduler.total_steps", "1", "--ckpt.enable_save_ckpt", "False", "--ckpt.export_hf", "False",
        "--train.device", "cpu", "--train.run_dir", str(tmp_path)]))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("seqpack train:"))
    assert "device=cpu" in line and "dtype=float32" in line and "attention=sdpa" in line, line
