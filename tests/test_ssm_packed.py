"""Mamba / Mamba-2 on packed rows equal each document run alone through transformers' unmodified class (logits,
loss, every gradient), with and without activation checkpointing; unadapted models refuse packed rows; the CUDA
route hands the fused Mamba-2 kernel the right seq_idx (checked against a stand-in with the kernel's signature)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, Mamba2ForCausalLM, MambaForCausalLM

import seqpack
import seqpack.ssm.adapter as adapter
import seqpack.ssm.kernels as kernels

VOCAB = 64
CONV = 4  # conv_kernel: documents of length 1 and longer than the kernel below
CONFIGS = {
    "mamba": dict(state_size=8, expand=2, conv_kernel=CONV),
    "mamba2": dict(num_heads=4, head_dim=16, n_groups=2, state_size=8, expand=2, conv_kernel=CONV, chunk_size=8),
}
TRANSFORMERS_CLASS = {"mamba": MambaForCausalLM, "mamba2": Mamba2ForCausalLM}
CASES = {"mixed": ([7, 1, 12, 3, 9, 1], None), "padded": ([6, 11, 1, 4], 30)}  # 12, 9, 11 > chunk_size 8


def tiny_config(model_type):
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2, **CONFIGS[model_type])


def model_pair(model_type, seed=0):
    """(transformers' own class, untouched; the same weights built by the Auto class and dispatched)."""
    cfg = tiny_config(model_type)
    torch.manual_seed(seed)
    ref = TRANSFORMERS_CLASS[model_type](cfg)
    model = seqpack.dispatch(AutoModelForCausalLM.from_config(cfg))
    model.load_state_dict(ref.state_dict())
    return ref.train(), model.train()


def docs_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def reference(ref, docs):
    """Per-document logits (concatenated) and the token-mean loss over all documents."""
    logits, loss_sum, count = [], 0.0, 0
    for d in docs:
        out = ref(input_ids=d[None]).logits[0]
        logits.append(out)
        if d.numel() > 1:
            loss_sum = loss_sum + F.cross_entropy(out[:-1], d[1:], reduction="sum")
            count += d.numel() - 1
    return torch.cat(logits), loss_sum / count


def assert_grads_close(model, ref, rtol=1e-4):
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        err = (p.grad - ref_params[name].grad).norm() / ref_params[name].grad.norm().clamp(min=1e-12)
        assert err <= rtol, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_packed_equals_per_document(model_type, case):
    lengths, pad_to = CASES[case]
    ref, model = model_pair(model_type)
    docs = docs_of(lengths)
    batch = seqpack.pack(docs, pad_to=pad_to)
    out = model(**batch.model_inputs(with_labels=True))
    n_real = sum(lengths)
    ref_logits, ref_loss = reference(ref, docs)
    torch.testing.assert_close(out.logits[0, :n_real], ref_logits, atol=1e-5, rtol=1e-5)
    loss = seqpack.causal_lm_loss(out.logits, batch)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, atol=0, rtol=1e-5)  # transformers' own loss path agrees
    loss.backward()
    ref_loss.backward()
    assert_grads_close(model, ref)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_checkpointed_micro_batches_recompute_with_their_own_documents(model_type, reentrant):
    """Two packed rows of the same length, both forwards first, then both backwards: each checkpointed block's
    recomputation must use the documents of its own row, not the last one seen."""
    ref, model = model_pair(model_type)
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in model.backbone.layers)
    rows = [docs_of([5, 7, 4], seed=1), docs_of([10, 1, 5], seed=2)]  # both T = 16, different boundaries
    batches = [seqpack.pack(d) for d in rows]
    losses = [seqpack.causal_lm_loss(model(**b.model_inputs()).logits, b, num_valid=26) for b in batches]
    for loss in losses:
        loss.backward()
    ref_loss = sum(reference(ref, d)[1] * 13 for d in rows) / 26  # 13 targets per row
    torch.testing.assert_close(sum(losses), ref_loss, atol=0, rtol=1e-5)
    ref_loss.backward()
    assert_grads_close(model, ref)


def test_restarting_position_ids_alone_mark_the_documents():
    ref, model = model_pair("mamba2")
    docs = docs_of([7, 1, 12, 3])
    batch = seqpack.pack(docs)
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits[0]
    torch.testing.assert_close(out, reference(ref, docs)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_unpacked_inputs_run_the_original_forward(model_type):
    """A padded batch and generation with a cache take transformers' own path, unchanged."""
    ref, model = model_pair(model_type)
    ref.eval(), model.eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               ref(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], **greedy), ref.generate(ids[:1], **greedy))


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_unadapted_ssm_refuses_a_packed_row(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))  # Auto class, seqpack.dispatch not called
    batch = seqpack.pack(docs_of([5, 3]))
    with pytest.raises(ValueError, match="not adapted for packing.*seqpack.dispatch"):
        model(**batch.model_inputs())
    with pytest.raises(ValueError, match="packed row of 2 documents"):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids)  # transformers' padding-free form
    one = seqpack.pack(docs_of([6]))
    assert model(**one.model_inputs()).logits.shape == (1, 6, VOCAB)  # one document is no packing: runs
    built = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="seqpack")
    assert built.seqpack_ssm.adapted and type(built).__name__ == TRANSFORMERS_CLASS[model_type].__name__


def test_packed_row_with_a_cache_or_bad_metadata_raises():
    _, model = model_pair("mamba")
    batch = seqpack.pack(docs_of([5, 3]))
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="cannot continue from a cache"):
        model(**batch.model_inputs(), cache=DynamicCache(config=model.config))
    bad = batch.model_inputs()
    bad["position_ids"] = torch.arange(8)[None]
    with pytest.raises(ValueError, match="position_ids inconsistent with cu_seqlens at token 5"):
        model(**bad)


def test_sequence_parallel_is_refused_with_the_reason(monkeypatch):
    from seqpack.train import load_config

    with pytest.raises(ValueError, match="parallel.tensor.size=2 .*SSM has no attention.*recurrent state"):
        load_config(None, ["--model_type", "mamba", "--parallel.tensor.size", "2"])
    monkeypatch.setattr(adapter, "group_size", lambda group: 2)
    with pytest.raises(ValueError, match="sequence parallel is not possible for MambaForCausalLM"):
        seqpack.dispatch(AutoModelForCausalLM.from_config(tiny_config("mamba")), sp_group=object())


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, float("inf")),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """Stand-in for mamba_ssm's fused kernel (same signature as mamba_ssm.ops.triton.ssd_combined): an
    independent token-by-token recurrence whose convolution and state restart wherever seq_idx changes."""
    CALLS.append(seq_idx)
    assert initial_states is None and not return_final_states and activation == "silu"
    batch, T, _ = zxbcdt.shape
    nheads = D.shape[0]
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    z, xBC, dt = zxbcdt.split([dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    K = conv1d_weight.shape[1]
    seq = F.pad(seq_idx, (K - 1, 0), value=-1)  # [b, K-1+T]
    xpad = F.pad(xBC, (0, 0, K - 1, 0))
    conv = conv1d_bias.expand_as(xBC).clone()
    for k in range(K):  # tap k reads token t-(K-1)+k, only inside the same document
        same = (seq[:, k:k + T] == seq_idx).unsqueeze(-1)
        conv = conv + same * xpad[:, k:k + T] * conv1d_weight[:, k]
    x, B, C = F.silu(conv).split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.reshape(batch, T, nheads, headdim)
    B, C = (t.reshape(batch, T, ngroups, dstate).repeat_interleave(nheads // ngroups, dim=2) for t in (B, C))
    dt = F.softplus(dt + dt_bias).clamp(*dt_limit)  # [b, T, h]
    state = torch.zeros(batch, nheads, headdim, dstate)
    ys = []
    for t in range(T):
        if t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None, None, None]
        state = state * (dt[:, t] * A).exp()[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]
        ys.append((state * C[:, t, :, None]).sum(-1) + D[:, None] * x[:, t])
    y = torch.stack(ys, 1).reshape(batch, T, dim) * F.silu(z)  # norm_before_gate=False: gate, then norm
    groups = y.reshape(batch, T, ngroups, dim // ngroups)
    y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + rmsnorm_eps)).reshape(batch, T, dim)
    return F.linear(y * rmsnorm_weight, outproj_weight, outproj_bias)


CALLS = []


def test_mamba2_on_cuda_routes_to_the_fused_kernel_with_seq_idx(monkeypatch):
    """Where mamba_ssm is installed on CUDA, each Mamba-2 mixer makes one fused call over the whole packed row
    with seq_idx [1, T] int32 (here: a stand-in with the kernel's exact signature, and a CPU tensor as 'cuda')."""
    monkeypatch.setattr(kernels, "available_kernels", lambda: kernels.SSMKernels(mamba_split_conv1d_scan_combined))
    monkeypatch.setattr(kernels, "on_kernel_device", lambda x: True)
    ref, model = model_pair("mamba2")
    CALLS.clear()  # after dispatch's packing probe
    docs = docs_of([7, 1, 12, 3, 1])
    batch = seqpack.pack(docs)
    logits = model(**batch.model_inputs()).logits[0]
    expected = torch.repeat_interleave(torch.arange(5, dtype=torch.int32), torch.tensor([7, 1, 12, 3, 1]))[None]
    assert len(CALLS) == 2 and all(s.dtype == torch.int32 and torch.equal(s, expected) for s in CALLS)
    torch.testing.assert_close(logits, reference(ref, docs)[0], atol=1e-4, rtol=1e-4)  # chunked vs sequential
    CALLS.clear()
    model(input_ids=batch.input_ids[:, :7])  # not packed: transformers' own forward, no seq_idx call here
    assert CALLS == []


@pytest.mark.parametrize("selective_scan_installed", [False, True])
def test_mamba1_has_no_seq_idx_kernel_and_keeps_document_rows(monkeypatch, selective_scan_installed):
    """Mamba-1 never gets seq_idx: with mamba_ssm's selective_scan_fn on CUDA, transformers' own mixer runs one
    document per row (and finds the kernels itself); otherwise seqpack's linear-time torch rows run."""
    found = kernels.SSMKernels(mamba_split_conv1d_scan_combined,
                               selective_scan_fn=(lambda *a, **k: None) if selective_scan_installed else None)
    monkeypatch.setattr(kernels, "on_kernel_device", lambda x: True)
    monkeypatch.setattr(kernels, "available_kernels", lambda: found)
    torch_rows = []
    monkeypatch.setattr(adapter, "mamba1_rows_forward", lambda m, rows: torch_rows.append(rows.shape) or
                        seqpack.ssm.mamba1.mamba1_rows_forward(m, rows))
    CALLS.clear()
    ref, model = model_pair("mamba")
    docs = docs_of([4, 9, 1])
    logits = model(**seqpack.pack(docs).model_inputs()).logits[0]
    assert CALLS == [] and bool(torch_rows) != selective_scan_installed
    torch.testing.assert_close(logits, reference(ref, docs)[0], atol=1e-5, rtol=1e-5)


def test_seqpack_train_runs_a_tiny_mamba_and_exports_it(tmp_path):
    """`seqpack train` with model_type="mamba": packed rows from the embedded corpus, loss falling, activation
    checkpointing on; the HF export loads into transformers' own class and gives the trained model's logits."""
    from seqpack.train import load_config, train

    run = ["--data.seq_len", "64", "--data.micro_num", "2", "--data.max_docs", "60", "--train.tensorboard", "False",
           "--ckpt.checkpoint_every", "8", "--adam.lr", "2e-2"]
    result = train(load_config(None, [*run, "--model_type", "mamba", "--model.hidden_size", "32",
                                      "--model.num_layers", "2", "--lr_scheduler.total_steps", "8",
                                      "--model.checkpoint", "True", "--train.run_dir", str(tmp_path)]))
    assert all(layer.gradient_checkpointing for layer in result.model.backbone.layers)
    assert result.model.seqpack_ssm.adapted
    assert result.final_loss < result.first_loss - 0.1, (result.first_loss, result.final_loss)
    exported = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)
    again = train(load_config(None, [*run, "--model_type", "HF", "--ckpt.load_ckpt_info.path", str(tmp_path / "hf"),
                                     "--lr_scheduler.total_steps", "1", "--train.run_dir", str(tmp_path / "again")]))
    assert type(again.model).__name__ == "MambaForCausalLM" and again.model.seqpack_ssm.adapted  # from the folder
    assert again.first_loss < result.first_loss - 0.1  # starts from the trained weights


def test_from_scratch_mamba2_config_takes_heads_from_the_model_section():
    from seqpack.train import load_config
    from seqpack.train.model import hf_config

    cfg = hf_config(load_config(None, ["--model_type", "mamba2", "--model.hidden_size", "32",
                                       "--model.num_attention_heads", "4"]), vocab_size=300)
    assert (cfg.model_type, cfg.num_heads, cfg.head_dim, cfg.vocab_size) == ("mamba2", 4, 16, 300)
    with pytest.raises(ValueError, match="num_attention_heads=5 must divide 2 \\* model.hidden_size=64"):
        hf_config(load_config(None, ["--model_type", "mamba2", "--model.hidden_size", "32",
                                     "--model.num_attention_heads", "5"]), vocab_size=300)


def test_dispatch_adapts_a_model_built_from_transformers_class_directly():
    """Direct construction bypasses the Auto registration, yet a packed row still raises until seqpack.dispatch
    adapts the model; unpacked calls run unchanged."""
    ref, model = model_pair("mamba")
    plain = MambaForCausalLM(tiny_config("mamba"))
    plain.load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="packed row of 3 documents, but this model is not adapted"):
        plain(**seqpack.pack(docs_of([3, 8, 1])).model_inputs())
    one = docs_of([5])[0][None]
    torch.testing.assert_close(plain(input_ids=one).logits, ref(input_ids=one).logits, atol=0, rtol=0)
    direct = seqpack.dispatch(MambaForCausalLM(tiny_config("mamba")))
    direct.load_state_dict(ref.state_dict())
    assert type(direct) is MambaForCausalLM and direct.seqpack_ssm.adapted
    docs = docs_of([3, 8, 1])
    torch.testing.assert_close(direct(**seqpack.pack(docs).model_inputs()).logits[0], reference(ref, docs)[0],
                               atol=1e-5, rtol=1e-5)
