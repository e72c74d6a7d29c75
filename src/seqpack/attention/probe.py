"""The packing probe: prove on two tiny packed documents that a model keeps them apart, before it trains.

Used by every entry point that switches a model to packed batches (:func:`seqpack.dispatch`, ``seqpack train``,
``SequenceParallelTrainer``). A model passes when, on one packed row of two 2-token documents ``[a b | c d]``:

1. its layers call seqpack's attention function (found through transformers' ``AttentionInterface``) — or, for
   Mamba / Mamba-2, seqpack's packed mixer (the state-space adapter) — at least once; and
2. with float32/float64 weights, the logits of the second document in the packed row equal those of the same
   document run alone, to 1e-4 of their scale (exact kernels agree to ~1e-6; a layer that mixes documents, such
   as the state-space layers of a hybrid model (Jamba, Falcon-H1), differs by ~1e-3 even at random init). With
   bf16/fp16 weights, or TF32 matmuls on CUDA, rounding is of the same size as a leak, so only check 1 runs.

Otherwise a ValueError names the model class and what to do. Cost: two forwards of 4 and 2 tokens, once per
dispatch; a model whose parameters are still on the ``meta`` device (weights not loaded yet) or fake tensors
(``FakeTensorMode``: shapes without values, as ``seqpack plan --check-fake`` builds) is not probed.
"""

from __future__ import annotations

import contextlib

import torch

SUPPORT = ("use a model family whose attention goes through transformers' AttentionInterface (the supported "
           "families are listed in the documentation's support matrix), or train without packing "
           "(data.packing='padded')")


def check_packing(model, name: str = "seqpack") -> None:
    """Run the probe (see the module docstring) on ``model``, already switched to the attention function registered
    as ``name``; ValueError if it fails.

        >>> seqpack.dispatch(AutoModelForCausalLM.from_config(cfg))   # runs check_packing  # doctest: +SKIP
    """
    from torch._subclasses.fake_tensor import is_fake

    params = list(model.parameters())
    if not params or any(p.is_meta or is_fake(p) for p in params):
        return
    device, model_name = params[0].device, type(model).__name__
    vocab = model.config.get_text_config().vocab_size
    ids = torch.tensor([[3, 5, 7, 4]], device=device) % vocab  # [1, T=4]: documents [a b | c d]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _counting(model, name) as calls, _typed(model_name):
            cu = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
            packed = model(input_ids=ids, position_ids=torch.tensor([[0, 1, 0, 1]], device=device), use_cache=False,
                           cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=2, max_length_k=2).logits
            reached = calls[0]
            cu = cu[:2]
            alone = model(input_ids=ids[:, 2:], position_ids=torch.tensor([[0, 1]], device=device), use_cache=False,
                          cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=2, max_length_k=2).logits
    finally:
        model.train(was_training)
    if reached == 0:
        raise ValueError(f"{model_name} never called seqpack's attention (attn_implementation='seqpack'): its attention is "
                         f"hard-coded, so packed documents would attend to each other; {SUPPORT}")
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    if params[0].dtype in (torch.float32, torch.float64) and not tf32:
        a, b = packed[0, 2:].double(), alone[0].double()
        diff, scale = (a - b).abs().max().item(), max(b.abs().max().item(), 1e-6)
        if diff > 1e-4 * scale:
            raise ValueError(f"{model_name} lets packed documents see each other: the second of two packed documents gets "
                             f"logits {diff:.2e} away from the same document alone (scale {scale:.2e}); some layer "
                             f"does not go through seqpack's attention or state-space adapter; {SUPPORT}")


@contextlib.contextmanager
def _typed(name: str):
    """A forward that refuses the packed keyword arguments (``cu_seq_lens_q``, ...) is a family seqpack cannot pack."""
    try:
        yield
    except TypeError as e:
        raise ValueError(f"{name} does not accept packed-batch arguments ({e}); {SUPPORT}") from e


@contextlib.contextmanager
def _counting(model, name: str):
    """Count calls of the attention function registered as ``name`` and of the packed state-space mixers."""
    from transformers import AttentionInterface

    original = AttentionInterface()[name]
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    handles = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for m in model.modules() if getattr(m, "seqpack_ssm", None) is not None and m is not model]
    AttentionInterface.register(name, counting)
    try:
        yield calls
    finally:
        AttentionInterface.register(name, original)
        for h in handles:
            h.remove()
