"""bf16 mixed precision (FSDP2), activation-checkpoint offload and optimizer offload, through seqpack train's own
model and optimizer builders: each alone and all together, one process and gloo dp=2 / sp=2 with FSDP2.

Offloads only move tensors, so their losses and gradients are compared bitwise with the same run without them.
bf16 is compared with float32 within bf16's own error (measured on the same model, per document).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqpack
from seqpack.parallel import ParallelDims, StepLoss, init_topology, shard_batch
from seqpack.train import load_config
from seqpack.train.loop import build_optimizer
from seqpack.train.model import build_model

VOCAB, H = 300, 32
OFFLOADS = {"model.offload_checkpoints": True, "hybrid_zero_optimizer.cpu_offload": True}
BF16 = {"model.mixed_precision": "fsdp"}


def _cfg(**keys):
    args = ["--model.hidden_size", str(H), "--model.num_layers", "3", "--model.num_attention_heads", "4",
            "--model.num_kv_attention_heads", "2", "--model.checkpoint", "True", "--loss.chunk_size", "32"]
    for key, value in keys.items():
        args += [f"--{key}", str(value)]
    return load_config(None, args)


def _rows(seed: int, lengths_per_row):
    g = torch.Generator().manual_seed(seed)
    return [seqpack.pack([torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]) for lengths in lengths_per_row]


def _grads(model) -> dict:
    out = {}
    for name, p in model.named_parameters():  # every rank calls full_tensor() in the same order
        g = p.grad
        out[name.removeprefix("_orig_mod.")] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _train_steps(cfg, topo, rows, steps: int = 2, record: list | None = None):
    """seqpack train's step (chunked loss, StepLoss, AdamW) on this rank's ``rows``: [(loss, grads)] per step."""
    model = build_model(cfg, VOCAB, topo)
    offload = getattr(model, "_seqpack_checkpoint_offload", None)
    if offload is not None:
        offload.record = record
    optimizer = build_optimizer(model, cfg)
    shards = [shard_batch(b, topo.sp_size, topo.sp_rank) for b in rows]
    out = []
    for _ in range(steps):
        loss = StepLoss(shards, topo.world_group)
        for s in shards:
            total = model(**s.model_inputs(), use_cache=False, chunked_loss_labels=s.shift_labels).loss
            loss.sum_loss(total).backward()
        out.append((loss.value(), _grads(model)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out, model, optimizer


def _one_process(cfg, rows, **kw):
    topo = init_topology(device="cpu")
    try:
        return _train_steps(cfg, topo, rows, **kw)
    finally:
        topo.destroy()


def _assert_bitwise(got, want, label, steps=(0, 1)):
    for k in steps:
        assert got[k][0] == want[k][0], f"{label}: step {k + 1} loss {got[k][0]} != {want[k][0]}"
        for name, g in want[k][1].items():
            assert torch.equal(got[k][1][name], g), f"{label}: step {k + 1} gradient of {name} differs"


def _rel(a: dict, b: dict) -> float:
    """Relative error of all gradients together: |a - b| / |b| over the concatenation."""
    num = sum(float((a[n].float() - b[n].float()).norm() ** 2) for n in b)
    den = sum(float(b[n].float().norm() ** 2) for n in b)
    return (num / den) ** 0.5


def test_checkpoint_offload_moves_exactly_the_checkpointed_inputs():
    """The inputs of the checkpointed layers (2 of 3), [1, T, H] each, go to the host and come back: the same
    losses and gradients, bit for bit; under bf16 mixed precision they are bf16 — half the bytes."""
    rows = _rows(0, [[40, 25, 63]])
    T = rows[0].num_tokens
    for precision, size in (({}, 4), (BF16, 2)):
        base, _, _ = _one_process(_cfg(**{"model.checkpoint": 0.67}, **precision), rows)
        record = []
        got, model, _ = _one_process(_cfg(**{"model.checkpoint": 0.67, "model.offload_checkpoints": True},
                                          **precision), rows, record=record)
        _assert_bitwise(got, base, f"checkpoint offload {precision}")
        per_step = len(record) // 2
        assert [r[0] for r in record[:per_step]] == [0, 1], record  # layer 2 does not checkpoint
        assert all(r[1] == (1, T, H) and r[3] == T * H * size for r in record), record
        assert record[0][2] == (torch.bfloat16 if size == 2 else torch.float32)
    with pytest.raises(ValueError, match="model.offload_checkpoints.*model.checkpoint"):
        _cfg(**{"model.checkpoint": False, "model.offload_checkpoints": True})


def test_optimizer_offload_is_the_same_step():
    """FSDP2's CPUOffloadPolicy and torch's fused CPU AdamW: step 1 is bitwise the step without offload; step 2
    (after one fused vs per-tensor AdamW update) agrees to float32 round-off."""
    rows = _rows(1, [[31, 50], [22, 17, 9]])
    base, _, _ = _one_process(_cfg(), rows)
    got, model, optimizer = _one_process(_cfg(**{"hybrid_zero_optimizer.cpu_offload": True}), rows)
    _assert_bitwise(got, base, "optimizer offload", steps=(0,))
    assert abs(got[1][0] - base[1][0]) <= 1e-6 * abs(base[1][0])
    assert _rel(got[1][1], base[1][1]) <= 1e-5
    assert optimizer.defaults["fused"] is True and type(model).__name__.startswith("FSDP")
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert isinstance(model._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy)


def test_tiled_attention_is_the_same_step():
    """model.tiled_attention recomputes each KV head group's attention in backward (inside the checkpointed
    layers' recomputation here): the loss and gradients of seqpack train's step equal the one-call backward's, in
    float32 and with bf16 + both offloads. Heads are independent, so only SDPA's blocking over fewer heads may
    move the last bits."""
    rows = _rows(5, [[29, 18, 1], [40]])
    tiled = {"model.tiled_attention": True}
    for keys, tol in (({}, 1e-6), ({**BF16, **OFFLOADS}, 1e-6)):
        want, _, _ = _one_process(_cfg(**keys), rows, steps=1)
        got, _, _ = _one_process(_cfg(**keys, **tiled), rows, steps=1)
        assert abs(got[0][0] - want[0][0]) <= tol * want[0][0], (keys, got[0][0], want[0][0])
        assert _rel(got[0][1], want[0][1]) <= 10 * tol, (keys, _rel(got[0][1], want[0][1]))


def test_bf16_packed_equals_per_document_within_bf16_error():
    """One packed row through the bf16 mixed-precision model (FSDP2 on a one-rank group) against each document
    alone through the same bf16 model: their difference is within the error bf16 itself makes per document (bf16
    per document against float32 per document). The loss and every gradient."""
    docs = [37, 21, 55, 9]
    packed = _rows(2, [docs])
    g = torch.Generator().manual_seed(2)
    alone = [seqpack.pack([torch.randint(3, VOCAB, (n,), generator=g)]) for n in docs]  # the same tokens
    assert torch.equal(torch.cat([b.input_ids for b in alone], 1), packed[0].input_ids)

    def step(cfg, rows):
        topo = init_topology(device="cpu")
        try:
            model = build_model(cfg, VOCAB, topo)
            loss = StepLoss(rows, None)
            for b in rows:
                loss.sum_loss(model(**b.model_inputs(), use_cache=False, chunked_loss_labels=b.shift_labels)
                              .loss).backward()
            return loss.value(), _grads(model)
        finally:
            topo.destroy()

    bf16_packed, bf16_alone, fp32_alone = step(_cfg(**BF16), packed), step(_cfg(**BF16), alone), step(_cfg(), alone)
    bf16_error = abs(bf16_alone[0] - fp32_alone[0])
    assert abs(bf16_packed[0] - bf16_alone[0]) <= max(2 * bf16_error, 2**-8 * fp32_alone[0])
    grad_error = _rel(bf16_alone[1], fp32_alone[1])
    assert 1e-4 < grad_error < 0.05  # bf16 really computed (not float32), and not garbage
    assert _rel(bf16_packed[1], bf16_alone[1]) <= 2 * grad_error


def test_bf16_loss_curve_follows_fp32():
    """50 AdamW steps of a tiny model on a learnable sequence, bf16 mixed precision against float32: every step's
    loss within 3 % (bf16 keeps 8 bits of mantissa; the fp32 master weights keep the updates), both learn."""
    g = torch.Generator().manual_seed(3)
    starts = torch.randint(3, VOCAB - 40, (6,), generator=g)
    rows = [seqpack.pack([torch.arange(s, s + 40) for s in starts])]  # counting: predictable from the context

    def curve(cfg):
        out, _, _ = _one_process(cfg, rows, steps=50)
        return [loss for loss, _ in out]

    keys = {"adam.lr": 3e-3, "lr_scheduler.warmup_ratio": 0.0, "hybrid_zero_optimizer.clip_grad_norm": 0}
    fp32, bf16 = curve(_cfg(**keys)), curve(_cfg(**keys, **BF16))
    assert fp32[-1] < 0.5 * fp32[0] and bf16[-1] < 0.5 * bf16[0]
    worst = max(abs(b - f) / f for b, f in zip(bf16, fp32))
    assert worst <= 0.03, (worst, fp32[::10], bf16[::10])


def _world_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for dp, sp in ((2, 1), (1, 2)):
            topo = ParallelDims(dp=dp, sp=sp)
            lengths = [[[29, 18], [40]], [[15, 33, 7], [26, 20]]]  # per DP rank: two micro-batches
            rows = _rows(4, lengths[topo.dp_rank] if dp == 2 else lengths[0])
            label = f"dp={dp} sp={sp}"
            fp32, _, _ = _train_steps(_cfg(), topo, rows)
            ckpt, _, _ = _train_steps(_cfg(**{"model.offload_checkpoints": True}), topo, rows)
            _assert_bitwise(ckpt, fp32, f"{label}: checkpoint offload")
            opt, _, _ = _train_steps(_cfg(**{"hybrid_zero_optimizer.cpu_offload": True}), topo, rows)
            _assert_bitwise(opt, fp32, f"{label}: optimizer offload", steps=(0,))
            tiled, _, _ = _train_steps(_cfg(**{"model.tiled_attention": True}), topo, rows, steps=1)
            assert abs(tiled[0][0] - fp32[0][0]) <= 1e-6 * fp32[0][0] and _rel(tiled[0][1], fp32[0][1]) <= 1e-5, label
            bf16, _, _ = _train_steps(_cfg(**BF16), topo, rows)
            every, _, _ = _train_steps(_cfg(**BF16, **OFFLOADS), topo, rows)
            _assert_bitwise(every, bf16, f"{label}: bf16 + both offloads", steps=(0,))
            assert abs(every[1][0] - bf16[1][0]) <= 1e-5 * bf16[1][0]
            # against one process on the whole step (all DP ranks' rows, unsharded)
            every_rows = _rows(4, lengths[0]) + (_rows(4, lengths[1]) if dp == 2 else [])
            for cfg, got, tol in ((_cfg(), fp32, 1e-5), (_cfg(**BF16, **OFFLOADS), every, 2e-2)):
                group = dist.new_group([rank], backend="gloo")  # this rank alone, as a one-process run
                ref, _, _ = _train_steps(cfg, _Alone(group), every_rows, steps=1)
                assert abs(got[0][0] - ref[0][0]) <= tol * ref[0][0], (label, got[0][0], ref[0][0])
                assert _rel(got[0][1], ref[0][1]) <= tol * 5, (label, _rel(got[0][1], ref[0][1]))
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write("ok")
    finally:
        dist.destroy_process_group()


class _Alone:
    """A one-rank topology over ``group`` inside a spawned world (the one-process reference run)."""

    def __init__(self, group):
        from torch.distributed.device_mesh import DeviceMesh

        self.world_size, self.rank, self.dp_size, self.sp_size, self.dp_rank, self.sp_rank = 1, 0, 1, 1, 0, 0
        self.device, self.sp_group, self.world_group, self.group = torch.device("cpu"), None, group, group
        self._mesh = DeviceMesh.from_group(group, "cpu", mesh_dim_names=("dp_sp",))

    def fsdp_mesh(self):
        return self._mesh


def test_features_alone_and_together_under_dp2_and_sp2(tmp_path):
    """gloo, FSDP2 over 2 ranks: offloads bitwise against the same world without them, tiled attention within
    float32 rounding of it; fp32 and bf16 + both offloads against one process on the whole step (every DP rank's
    rows, unsharded)."""
    mp.spawn(_world_main, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    assert {"ok0", "ok1"} <= set(os.listdir(tmp_path))
