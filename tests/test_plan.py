"""``seqpack plan``: the memory model against real saved tensors, the H100 figures, its invariants, its errors."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import seqpack
from seqpack.cli import main
from seqpack.plan import (ModelShape, PlanOptions, layer_saved_bytes, load_shape, longest_fit, parse_memory,
                          plan_memory, shape_from_hf_config, sp_candidates)

GiB = 2**30
TINYLLAMA = ModelShape("llama", 2048, 22, 32, 4, 64, 5632, 32000)
LLAMA3_8B = ModelShape("llama", 4096, 32, 32, 8, 128, 14336, 128256)


def _saved_activation_bytes(model, T: int, autocast: bool = False) -> int:
    """Bytes of the floating-point tensors autograd keeps for backward (parameters excluded) in one forward+loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.is_floating_point():
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    batch = seqpack.pack([torch.randint(3, model.config.vocab_size, (T,), generator=torch.Generator().manual_seed(0))])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # as seqpack train on CUDA
            logits = model(**batch.model_inputs()).logits
        seqpack.causal_lm_loss(logits, batch)
    return sum(saved.values())


@pytest.mark.parametrize("model_type,dtype,extra", [
    ("llama", torch.float32, {}), ("llama", torch.bfloat16, {}), ("qwen3", torch.float32, {"head_dim": 16}),
    ("qwen3", torch.bfloat16, {"head_dim": 16}), ("qwen2", torch.float32, {}), ("llama", "autocast", {})])
def test_saved_activations_match_autograd_exactly(model_type, dtype, extra):
    """Every tensor the model keeps for backward is counted: layers, final norm, RoPE tables, log-softmax output,
    and under bf16 autocast over fp32 weights the per-linear input casts and the cast weights."""
    T = 192
    cfg = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T, **extra)
    torch.manual_seed(0)
    autocast = dtype == "autocast"
    model = seqpack.dispatch(AutoModelForCausalLM.from_config(cfg).to(torch.float32 if autocast else dtype)).train()
    precision = "bf16-autocast" if autocast else "fp32" if dtype == torch.float32 else "bf16"
    plan = plan_memory(shape_from_hf_config(cfg), PlanOptions(T, checkpoint=0.0, precision=precision, device="cpu",
                                                              optimizer="none"))
    log_softmax_out = 4 * 256 * T  # fp32, saved by cross-entropy
    parts = plan.phase_components["loss backward"]
    assert _saved_activation_bytes(model, T, autocast) - 4 == \
        parts["held_activations"] + parts["autocast_casts"] + log_softmax_out  # 4: the loss scalar


@pytest.mark.parametrize("model_type,dtype,extra,tiled", [
    ("llama", torch.bfloat16, {}, False), ("llama", torch.float32, {}, False), ("llama", "autocast", {}, False),
    ("qwen3", torch.bfloat16, {"head_dim": 16}, False), ("llama", torch.bfloat16, {}, True)])
def test_saved_activations_with_liger_kernels_match_autograd_exactly(monkeypatch, model_type, dtype, extra, tiled):
    """With Liger's RMSNorm, SwiGLU and RoPE swapped in (their own autograd Functions, the Triton launchers run in
    torch: tests/stand_in_kernels.py), every tensor kept for backward is counted; the fused model still gives the
    unfused model's loss and gradients."""
    pytest.importorskip("liger_kernel")
    from stand_in_kernels import install_liger_torch_kernels

    from seqpack.ops import apply_fused_kernels, apply_tiled_mlp

    install_liger_torch_kernels(monkeypatch)
    T = 192
    cfg = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T, **extra)
    autocast = dtype == "autocast"
    models = []
    for fuse in (False, True):
        torch.manual_seed(0)
        model = seqpack.dispatch(AutoModelForCausalLM.from_config(cfg).to(torch.float32 if autocast else dtype))
        if fuse:
            kernels = apply_fused_kernels(model, True, torch.device("cuda"))  # the device check passes
            assert kernels.swapped == {"rms_norm": 5 + (4 if extra else 0), "mlp": 2, "rope": 2}
        if tiled:
            apply_tiled_mlp(model, 64)
        models.append(model.train())
    precision = "bf16-autocast" if autocast else "fp32" if dtype == torch.float32 else "bf16"
    opts = PlanOptions(T, checkpoint=0.0, precision=precision, device="cpu", optimizer="none", tiled_mlp=tiled,
                       mlp_tile=64)
    log_softmax_out = 4 * 256 * T
    for model, fuse in zip(models, (False, True)):
        parts = plan_memory(shape_from_hf_config(cfg), replace(opts, fused_kernels=fuse)).phase_components
        assert _saved_activation_bytes(model, T, autocast) - 4 == parts["loss backward"]["held_activations"] + \
            parts["loss backward"]["autocast_casts"] + log_softmax_out, fuse
    plain, fused = (layer_saved_bytes(shape_from_hf_config(cfg), replace(opts, fused_kernels=f)) for f in (0, 1))
    assert fused["norms"] < plain["norms"] and (fused["mlp"] < plain["mlp"] or tiled)

    batch = seqpack.pack([list(range(3, 90)), list(range(100, 205))])  # positions restart
    losses = []
    for model in models:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(**batch.model_inputs()).logits
        losses.append(seqpack.causal_lm_loss(logits, batch))
        losses[-1].backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(losses[1].item() - losses[0].item()) <= tol * losses[0].item()
    for (name, p), q in zip(models[1].named_parameters(), models[0].parameters()):
        assert float((p.grad.float() - q.grad.float()).norm()) <= 10 * tol * float(q.grad.float().norm()) + 1e-6, name


@pytest.mark.parametrize("T,checkpoint,kv_repeat,measured_gib,tol", [
    (16384, 1.0, False, 9.6, 0.02), (65536, 1.0, False, 32.1, 0.02), (131072, 1.0, False, 62.0, 0.02),
    (16384, 0.0, True, 39.9, 0.02),  # torch 2.11's varlen_attn had no enable_gqa: k, v repeated to 32 heads
    (16384, 0.0, False, 39.9, 0.07),  # the same step with a kernel that shares KV heads
])
def test_reproduces_h100_tinyllama_figures(T, checkpoint, kv_repeat, measured_gib, tol):
    """torch.cuda.max_memory_allocated of one packed row's forward+backward, bf16 parameters, no optimizer state
    (the issue's figures). The goal is 15%; the model lands within 2% (kv repeated as that torch required)."""
    opts = PlanOptions(T, checkpoint=checkpoint, precision="bf16", optimizer="none", keep_logits=False,
                       kv_repeat=kv_repeat)
    plan = plan_memory(TINYLLAMA, opts)
    assert plan.peak_phase == "loss backward"
    assert abs(plan.allocated / GiB / measured_gib - 1) <= tol


@pytest.mark.parametrize("opts", [
    PlanOptions(32768), PlanOptions(32768, gpus=8, sp=8, micro_num=2), PlanOptions(8192, checkpoint=0.5),
    PlanOptions(65536, gpus=8, sp=4, chunked_loss=True, tiled_mlp=True), PlanOptions(4096, precision="fp32",
                                                                                    device="cpu", gpus=2, sp=2)])
def test_breakdown_adds_up(opts):
    plan = plan_memory(LLAMA3_8B, opts)
    assert sum(plan.components.values()) == plan.allocated == max(plan.phases.values())
    assert plan.phases[plan.peak_phase] == plan.allocated
    slack = plan.allocated * opts.slack if opts.device == "cuda" else 0
    reserve = opts.reserve_gib * GiB if opts.device == "cuda" else 0
    assert abs(plan.reserved - (plan.allocated + slack + reserve)) <= 2
    assert plan.step_peak == plan.allocated - plan.resident > 0
    assert plan.hardware_flops >= plan.model_flops > 0


@pytest.mark.parametrize("opts", [PlanOptions(1024), PlanOptions(1024, checkpoint=0.0, gpus=4, sp=2),
                                  PlanOptions(1024, chunked_loss=True, tiled_mlp=True, gpus=8, sp=8)])
def test_monotone_in_seq_len(opts):
    last = 0
    for T in (1024, 4096, 16384, 65536, 262144, 1 << 20):
        plan = plan_memory(LLAMA3_8B, replace(opts, seq_len=T))
        assert plan.allocated >= last and plan.model_flops > 0
        last = plan.allocated


def test_sp_halves_the_activation_part():
    base = dict(seq_len=65536, gpus=8, precision="bf16")
    ckpt = [plan_memory(TINYLLAMA, PlanOptions(sp=s, **base)).phases for s in (1, 2)]
    one, two = (plan_memory(TINYLLAMA, PlanOptions(sp=s, **base)) for s in (1, 2))
    assert two.local_tokens * 2 == one.local_tokens
    assert two.components["held_activations"] * 2 == one.components["held_activations"]  # checkpoint inputs
    assert two.components["logits_loss"] * 2 == one.components["logits_loss"]
    # without checkpointing each layer keeps one more [t, q] tensor under SP (o_proj's input after the all-to-all)
    parts = [layer_saved_bytes(TINYLLAMA, PlanOptions(65536, gpus=8, sp=s, precision="bf16")) for s in (1, 2)]
    assert parts[1]["attention"] - parts[0]["attention"] == 2 * TINYLLAMA.num_heads * TINYLLAMA.head_dim
    assert parts[1]["mlp"] == parts[0]["mlp"] and parts[1]["norms"] == parts[0]["norms"]
    assert ckpt[1]["loss backward"] < 0.6 * ckpt[0]["loss backward"]


def test_longest_fit_is_the_boundary():
    opts = PlanOptions(1024, gpus=8, sp=8)
    best = longest_fit(LLAMA3_8B, opts, 80 * GiB)
    assert best is not None and best.reserved <= 80 * GiB and best.options.seq_len % (1024 * 8) == 0
    assert plan_memory(LLAMA3_8B, replace(opts, seq_len=best.options.seq_len + 8192)).reserved > 80 * GiB
    assert longest_fit(LLAMA3_8B, replace(opts, gpus=1, sp=1), 8 * GiB) is None  # not even the weights fit
    assert sp_candidates(LLAMA3_8B, 8) == [1, 2, 4, 8] and sp_candidates(ModelShape("llama", 96, 2, 6, 2, 16, 64, 64),
                                                                         8) == [1, 2]


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"sp=3 does not divide the 8 GPUs.*\[1, 2, 4, 8\]"):
        PlanOptions(1024, gpus=8, sp=3)
    with pytest.raises(ValueError, match=r"sp=4 does not divide the model's 6 attention heads.*\[1, 2, 3, 6\]"):
        plan_memory(ModelShape("llama", 96, 2, 6, 2, 16, 64, 64), PlanOptions(1024, gpus=4, sp=4))
    for bad in ("80", "eighty GiB", "-5GiB", "80 gigs"):
        with pytest.raises(ValueError, match="--gpu-mem"):
            parse_memory(bad)
    assert parse_memory("80GiB") == 80 * GiB == parse_memory("80g") and parse_memory("80GB") == 80 * 10**9
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'mixtral' is not supported by seqpack plan"):
        load_shape(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        load_shape(tmp_path / "missing")
    with pytest.raises(ValueError, match="checkpoint must be a fraction"):
        PlanOptions(1024, checkpoint=2.0)


def test_shapes_from_folder_and_internevo_config(tmp_path):
    cfg = AutoConfig.for_model("qwen3", vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    cfg.save_pretrained(tmp_path / "hf")
    shape, none = load_shape(tmp_path / "hf")
    assert none is None and shape == ModelShape("qwen3", 64, 3, 4, 2, 32, 96, 1000, tie_embeddings=True, qk_norm=True)
    model = AutoModelForCausalLM.from_config(cfg)
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied head counted once
    demo, config = load_shape("configs/demo.py")
    assert (demo.hidden_size, demo.num_layers, demo.vocab_size) == (128, 4, 4096) and config.data.seq_len == 256
    evo = tmp_path / "evo.py"
    evo.write_text(f"model_type = 'INTERNLM_FROM_HF'\nckpt = dict(load_ckpt_info=dict(path='{tmp_path / 'hf'}', "
                   "content=('model',), ckpt_type='hf_model'))\ndata = dict(seq_len=4096, micro_bsz=2)\n"
                   "parallel = dict(tensor=dict(size=2, mode='isp'))\nmodel = dict(checkpoint=0.5)\n")
    shape2, config2 = load_shape(evo)
    assert shape2 == shape and config2.parallel.tensor.size == 2


def test_cli_table_json_and_errors(tmp_path, capsys):
    AutoConfig.for_model("llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4).save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--gpus", "8", "--sp", "8", "--seq_len", "131072"]) == 0
    out = capsys.readouterr().out
    assert "allocated peak" in out and "needed per GPU" in out and "fits" in out
    assert main(["plan", str(tmp_path), "--gpus", "8", "--gpu-mem", "80GB", "--max", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result["longest"]) == ["1", "2", "2:ring2", "4", "4:ring2", "4:ring4", "8", "8:ring2", "8:ring4",
                                         "8:ring8"]  # every (sp, ring) split with sp / ring dividing the 32 heads
    lengths = [result["longest"][s]["options"]["seq_len"] for s in ("1", "2", "4", "8")]
    assert lengths == sorted(lengths) and all(r["reserved"] <= 80e9 for r in result["longest"].values())
    assert result["longest"]["8:ring2"]["options"]["ring"] == 2
    assert main(["plan", str(tmp_path), "--gpus", "8", "--sp", "8", "--ring", "2", "--seq_len", "131072",
                 "--tiled-mlp", "--chunked-loss"]) == 0
    out = capsys.readouterr().out
    assert "sp=8 dp=1 (ring 2 x ulysses 4)" in out and "fused kernels" in out
    assert main(["plan", str(tmp_path), "--gpus", "8", "--sp", "8", "--seq_len", "131072", "--no-fused-kernels",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["options"]["fused_kernels"] is False
    shape = shape_from_hf_config(AutoConfig.from_pretrained(tmp_path))
    assert plan_memory(shape, PlanOptions(1000, gpus=8, sp=8, ring=2)).local_tokens == 1024 // 8  # 16 chunks/rank
    assert main(["plan", str(tmp_path), "--gpus", "8", "--sp", "8", "--ring", "3"]) == 2
    assert "ring=3 does not divide sp=8" in capsys.readouterr().err
    assert main(["plan", str(tmp_path), "--gpus", "8", "--sp", "3"]) == 2
    assert "sp=3 does not divide the 8 GPUs" in capsys.readouterr().err
    assert main(["plan", str(tmp_path), "--gpu-mem", "lots"]) == 2
    assert "--gpu-mem 'lots'" in capsys.readouterr().err


def test_bench_plan_smoke(tmp_path, capsys):
    """``seqpack bench plan`` end to end on a tiny row over two gloo ranks with FSDP2: the prediction is within 15 %
    of the measured peak growth (docs/guides/long-context.md holds the full-size figures, all within 5 %)."""
    out = tmp_path / "plan.json"
    assert main(["bench", "plan", "--config", "64", "2", "4", "2", "176", "1024", "1024", "1", "2",
                 "--json", str(out)]) == 0
    assert "predicted MiB" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and abs(rows[0]["error"]) <= 0.15, rows


def test_options_move_the_parts_they_should():
    base = PlanOptions(131072, gpus=8, sp=8)
    plan = plan_memory(LLAMA3_8B, base)
    W, P = 8, LLAMA3_8B.params
    assert plan.resident == P * 4 // W + 8 * P // W  # fp32 master shard + AdamW moments
    assert plan_memory(LLAMA3_8B, replace(base, micro_num=2)).resident == plan.resident + P * 4 // W
    none = plan_memory(LLAMA3_8B, replace(base, optimizer="none"))
    assert none.components["optimizer"] == 0 and "optimizer step" not in none.phases
    chunked = plan_memory(LLAMA3_8B, replace(base, chunked_loss=True))
    assert chunked.phase_components["loss backward"]["logits_loss"] < plan.components["logits_loss"] / 3
    assert layer_saved_bytes(LLAMA3_8B, replace(base, tiled_mlp=True))["mlp"] == 0
    tiled = plan_memory(LLAMA3_8B, replace(base, tiled_mlp=True, chunked_loss=True))
    assert tiled.phases["layer 31 backward"] < chunked.phases["layer 31 backward"]
    offload = plan_memory(LLAMA3_8B, replace(base, chunked_loss=True, offload_checkpoints=True))
    assert offload.phase_components["loss backward"]["held_activations"] < \
        chunked.phase_components["loss backward"]["held_activations"] / 5  # the final norm's tensors stay


def _plan_args(source, *flags):
    import argparse

    from seqpack.plan.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(source), *flags])


def test_plan_defaults_are_seqpack_train_defaults(tmp_path):
    """No flags: the plan of what ``seqpack train`` runs for the same config and device."""
    from seqpack.plan.cli import options_from

    folder = tmp_path / "hf"
    AutoConfig.for_model("llama", vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4).save_pretrained(folder)
    shape, cfg = load_shape(folder)
    opts = options_from(_plan_args(folder), cfg)
    assert (opts.chunked_loss, opts.loss_chunk, opts.checkpoint, opts.micro_num, opts.precision, opts.tiled_mlp,
            opts.offload_checkpoints, opts.offload_optimizer) == (True, 1024, 0.0, 2, "bf16-mixed", False, False, False)
    assert options_from(_plan_args(folder, "--device", "cpu"), cfg).precision == "fp32"
    from seqpack.ops.fused import liger_available  # model.fused_kernels "auto": Liger on CUDA when installed

    assert opts.fused_kernels is liger_available()
    assert options_from(_plan_args(folder, "--device", "cpu"), cfg).fused_kernels is False
    assert options_from(_plan_args(folder, "--no-fused-kernels"), cfg).fused_kernels is False
    assert options_from(_plan_args(folder, "--device", "cpu", "--fused-kernels"), cfg).fused_kernels is True
    evo = tmp_path / "evo.py"
    evo.write_text("model = dict(checkpoint=True, mixed_precision='autocast', offload_checkpoints=True, "
                   "tiled_mlp=512, fused_kernels=False)\nloss = dict(chunked=False)\nhybrid_zero_optimizer = dict(cpu_offload=True)\n"
                   "data = dict(seq_len=2048, micro_bsz=2, micro_num=1)\n")
    shape, cfg = load_shape(evo)
    opts = options_from(_plan_args(evo), cfg)
    assert (opts.seq_len, opts.checkpoint, opts.precision, opts.chunked_loss, opts.tiled_mlp, opts.mlp_tile,
            opts.offload_checkpoints, opts.offload_optimizer, opts.micro_num) == \
        (4096, 1.0, "bf16-autocast", False, True, 512, True, True, 1)
    assert options_from(_plan_args(evo, "--device", "cpu"), cfg).precision == "bf16-autocast"  # asked for: CPU too
    assert opts.fused_kernels is False  # the config's model.fused_kernels
    assert options_from(_plan_args(evo, "--no-offload-optimizer", "--precision", "fp32"), cfg).offload_optimizer \
        is False


def test_offloads_move_their_bytes_to_the_host():
    from seqpack.plan.memory import pinned_size

    W, P = 8, LLAMA3_8B.params
    base = PlanOptions(262144, gpus=8, sp=8, checkpoint=1.0, tiled_mlp=True, chunked_loss=True, micro_num=1)
    plan = plan_memory(LLAMA3_8B, base)
    assert plan.resident == P * 4 // W + 8 * P // W and plan.host == {}  # fp32 master shards + AdamW on the GPU
    opt = plan_memory(LLAMA3_8B, replace(base, offload_optimizer=True))
    assert opt.resident == 0 and opt.components["parameters"] == opt.components["optimizer"] == 0
    assert opt.host == dict(parameters=P * 4 // W, gradients=P * 4 // W, optimizer=8 * P // W)
    assert opt.host_per_node == 8 * opt.host_per_rank and "optimizer step" not in opt.phases
    ckpt = plan_memory(LLAMA3_8B, replace(base, offload_checkpoints=True))
    t, h = 262144 // 8, LLAMA3_8B.hidden_size
    assert ckpt.host == {"checkpoint_inputs": 32 * pinned_size(t * 2 * h)}  # bf16 stream, one per layer
    held = plan.phase_components["loss backward"]["held_activations"]
    assert held - ckpt.phase_components["loss backward"]["held_activations"] == 32 * t * 2 * h
    assert pinned_size(3 * 2**20) == 4 * 2**20 and pinned_size(2**20) == 2**20
    # bf16 mixed precision halves the checkpointed inputs of bf16 autocast (an fp32 residual stream)
    auto = plan_memory(LLAMA3_8B, replace(base, precision="bf16-autocast"))
    assert auto.phase_components["loss backward"]["held_activations"] > 1.9 * held
    # a host limit bounds the longest row
    opts = replace(base, offload_checkpoints=True, offload_optimizer=True)
    free = longest_fit(LLAMA3_8B, opts, 80 * GiB)
    bound = longest_fit(LLAMA3_8B, opts, 80 * GiB, host_bytes_per_node=512 * GiB)
    assert bound.host_per_node <= 512 * GiB < free.host_per_node and bound.options.seq_len < free.options.seq_len


def test_cli_reports_host_memory_and_its_limit(tmp_path, capsys):
    AutoConfig.for_model("llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4).save_pretrained(tmp_path)
    flags = ["--seq_len", "262144", "--checkpoint", "1", "--offload-checkpoints", "--offload-optimizer"]
    assert main(["plan", str(tmp_path), *flags, "--host-mem", "16GiB"]) == 0
    out = capsys.readouterr().out
    assert "checkpointed layer inputs (pinned)" in out and "AdamW moments" in out
    assert "host memory does NOT fit in 16 GiB per node" in out
    assert main(["plan", str(tmp_path), *flags, "--host-mem", "plenty"]) == 2
    assert "--host-mem 'plenty'" in capsys.readouterr().err


def test_readme_long_context_figures_are_what_seqpack_plan_prints(capsys):
    """The README's two Llama-3-8B goal rows come from its two commands (run here), and meet the goals: 8 x 80 GiB
    past 4M tokens within 2 TiB of host memory per node, one 141 GB GPU past DeepSpeed ALST's 1.2M."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    commands = [c.replace("\\\n", " ") for c in re.findall(r"seqpack plan configs/shapes/llama-3-8b\.json --gpus "
                                                           r"(?:[^\n\\]|\\\n)*", readme) if "--offload" in c]
    assert len(commands) == 2, commands
    for command, goal in zip(commands, (4_000_000, 1_200_000)):
        argv = shlex.split(command)[1:]
        argv[1] = str(root / argv[1])
        assert main(argv + ["--json"]) == 0
        fit = next(iter(json.loads(capsys.readouterr().out)["longest"].values()))
        tokens, host = fit["options"]["seq_len"], fit["host_per_node"] / GiB
        assert tokens >= goal
        assert f"**{tokens:,}** tokens | {host:,.0f} GiB" in readme, (command, tokens, host)
