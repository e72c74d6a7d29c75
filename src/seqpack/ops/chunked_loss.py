"""Chunked linear cross-entropy: the causal LM loss from the final hidden states and the output-head weight, never
holding the [T, V] logits (nor their float32 copy).

Shape legend: T tokens (of this rank's shard), H hidden size, V vocabulary, c tokens per chunk.

The loss is computed in chunks of ``c`` tokens. Each chunk's logits [c, V] are made, post-processed as the model
does it (Gemma-2/3 final softcap, Granite's ``/ logits_scaling``, Cohere's ``* logit_scale``), reduced to the summed
cross-entropy, and turned into their gradients at once (softmax − one-hot, chained through the post-processing):
the gradients w.r.t. the hidden states [T, H] and the head weight [V, H] are what is kept for backward, so peak
memory is O(c·V + T·H + V·H) instead of O(T·V), and no matmul is repeated (the same three matmuls as the
full-logits loss). Math and order of operations follow ``seqpack.causal_lm_loss`` on the model's own logits, so
loss and gradients agree to float32 round-off (tested for Llama, Gemma-2 and tied embeddings).

    >>> total = linear_cross_entropy_sum(hidden, model.lm_head.weight, batch.shift_labels)   # doctest: +SKIP
    >>> loss = chunked_causal_lm_loss(model, hidden, batch)        # token mean, like causal_lm_loss  # doctest: +SKIP

In a model's forward (needed under FSDP2, where the head weight exists only inside the forward), see
:func:`enable_chunked_loss`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..batch import IGNORE_INDEX, PackedBatch

DEFAULT_CHUNK = 1024

# families whose forward is `logits = lm_head(hidden)` with nothing after it (transformers' and seqpack's native)
PLAIN_HEAD = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma",
              "internlm", "internlm2", "olmo", "olmo2", "starcoder2", "smollm3", "glm", "ministral"}
# families that post-process the logits, and how (config attribute read by logit_postprocess)
SOFTCAP_HEAD = {"gemma2", "gemma3", "gemma3_text"}   # logits = cap * tanh(logits / cap)
DIVIDED_HEAD = {"granite", "granitemoe", "granitemoeshared"}   # logits = logits / logits_scaling
SCALED_HEAD = {"cohere", "cohere2"}   # logits = logits * logit_scale


@dataclass(frozen=True)
class LogitPostprocess:
    """What the model does to ``lm_head(hidden)`` before its loss: ``softcap`` (cap·tanh(x / cap)), then ``scale``
    (multiply) or ``divisor`` (divide). All None = plain logits."""

    softcap: float | None = None
    scale: float | None = None
    divisor: float | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Same operations, same order as the modeling files (Gemma-2, Granite, Cohere)."""
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        return logits


def logit_postprocess(config) -> LogitPostprocess | None:
    """The logit post-processing of a transformers config's family, or None when seqpack does not know it (then the
    chunked loss must not be used: the caller falls back to full logits)."""
    kind = getattr(config, "model_type", None)
    if kind in PLAIN_HEAD:
        return LogitPostprocess()
    if kind in SOFTCAP_HEAD:
        return LogitPostprocess(softcap=getattr(config, "final_logit_softcapping", None))
    if kind in DIVIDED_HEAD:
        return LogitPostprocess(divisor=float(config.logits_scaling))
    if kind in SCALED_HEAD:
        return LogitPostprocess(scale=float(config.logit_scale))
    return None


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum over valid rows of CE(post(hidden @ weight.T + bias), labels); gradients computed chunk by chunk in
    forward, scaled by the incoming gradient in backward. hidden [N, H], weight [V, H], bias [V] | None, labels [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, post):
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grads = want_h or want_w or want_b
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]  # [c, H], [c]
            raw = torch.nn.functional.linear(h, weight, bias)  # [c, V]
            z = post.apply(raw).float()  # the model's logits, upcast as causal_lm_loss does
            total += torch.nn.functional.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="sum")
            if not grads:
                continue
            valid = y != IGNORE_INDEX  # [c]
            g = torch.softmax(z, dim=-1)  # d CE / d z = softmax - one_hot, zero on ignored rows
            del z
            # g[r, y[r]] -= 1 on valid rows (ignored rows add -0.0 at column 0: unchanged); no data-dependent shapes
            g.scatter_add_(1, y.clamp(min=0).unsqueeze(1), valid.unsqueeze(1).to(g.dtype).neg())
            g.mul_(valid.unsqueeze(1))
            g = _through_postprocess(g, raw, post).to(raw.dtype)  # d CE / d raw [c, V], in the logits' dtype
            del raw  # (autograd casts the logits' gradient the same way; under autocast the matmuls run in bf16)
            if want_h:
                grad_h[start:start + chunk] = (g @ weight).to(hidden.dtype)
            if want_w:
                grad_w += (g.t() @ h).float()
            if want_b:
                grad_b += g.sum(0).float()
            del g  # before the next chunk's logits: one [c, V] buffer fewer at the peak
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(w_dtype),
                None if grad_b is None else (grad_b * grad_out).to(b_dtype),
                None, None, None)


def _through_postprocess(g: torch.Tensor, raw: torch.Tensor, post: LogitPostprocess) -> torch.Tensor:
    """Chain rule through :meth:`LogitPostprocess.apply`: d/d raw = d/d z · dz/d raw. g float32 [c, V]."""
    if post.divisor is not None:
        g = g / post.divisor
    if post.scale is not None:
        g = g * post.scale
    if post.softcap is not None:  # z = cap · tanh(raw / cap) -> dz/draw = 1 - tanh²
        t = torch.tanh(raw.float() / post.softcap)
        g = g * (1 - t * t)
    return g


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             bias: torch.Tensor | None = None, post: LogitPostprocess | None = None,
                             chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Summed cross-entropy (float32 scalar) over targets != -100 of ``post(hidden @ weight.T + bias)``, computed
    ``chunk_size`` tokens at a time. hidden [..., T, H], weight [V, H], labels [..., T] (shifted targets)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens (e.g. {DEFAULT_CHUNK})")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} must have the same "
                         "leading shape [..., T]")
    h = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
    y = labels.reshape(-1).to(h.device)
    return _LinearCrossEntropySum.apply(h, weight, bias, y, chunk_size, post or LogitPostprocess())


def chunked_causal_lm_loss(model: torch.nn.Module, hidden_states: torch.Tensor, batch: PackedBatch | torch.Tensor,
                           num_valid: int | torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK):
    """``causal_lm_loss(model's logits, batch, num_valid)`` from the final hidden states [1, T, H] (the input of the
    output head, after the final norm) without materialising the logits. Uses ``model.get_output_embeddings()``
    (tied embeddings included) and the family's logit post-processing; a family seqpack does not know raises
    ValueError (use ``causal_lm_loss`` on the logits).

        >>> out = model.model(**batch.model_inputs())                                # doctest: +SKIP
        >>> loss = seqpack.chunked_causal_lm_loss(model, out.last_hidden_state, batch)  # doctest: +SKIP
    """
    post = logit_postprocess(model.config)
    if post is None:
        raise ValueError(f"chunked_causal_lm_loss does not know how {model.config.model_type!r} post-processes its "
                         "logits; use seqpack.causal_lm_loss(model(...).logits, batch) for this model")
    head = model.get_output_embeddings()
    _check_linear_head(head, model)
    labels = batch.shift_labels if not isinstance(batch, torch.Tensor) else batch
    total = linear_cross_entropy_sum(hidden_states, head.weight, labels, getattr(head, "bias", None), post, chunk_size)
    denom = (labels != IGNORE_INDEX).sum() if num_valid is None else num_valid
    return total / torch.as_tensor(denom, device=total.device).clamp(min=1)


def _check_linear_head(head, model) -> None:
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"{type(model).__name__}'s output head is a {type(head).__name__}, not an nn.Linear; the "
                         "chunked loss needs logits = hidden @ weight.T (+ bias): use causal_lm_loss")


class ChunkedLossHook:
    """The chunked loss inside a model's forward (installed by :func:`enable_chunked_loss`).

    ``model(**inputs, chunked_loss_labels=shift_labels)`` then returns ``loss`` = the **summed** float32
    cross-entropy over the valid targets (divide by your token count, e.g. with ``StepLoss.sum_loss``) and empty
    logits [1, 0, V]. Without that keyword the model behaves as before. Three hooks, no change to the modeling code:
    a pre-hook on the model takes the labels out of the keywords, a pre-hook on the output head computes the loss
    from its input (where FSDP2 has gathered the head weight) and hands the head an empty slice, and a hook after
    the model's forward puts the loss into the output (before FSDP2's own hook, so its backward hooks see it).
    ``fused`` = a callable (hidden [N, H], weight, labels [N], bias) -> sum, e.g. Liger's fused linear CE on CUDA.
    """

    KEYWORD = "chunked_loss_labels"

    def __init__(self, model: torch.nn.Module, post: LogitPostprocess, chunk_size: int, fused=None):
        self.post, self.chunk_size, self.fused = post, chunk_size, fused
        self._labels = self._loss = None
        head = model.get_output_embeddings()
        self.handles = [model.register_forward_pre_hook(self._take_labels, with_kwargs=True),
                        head.register_forward_pre_hook(self._head),
                        model.register_forward_hook(self._attach, prepend=True)]

    def _take_labels(self, module, args, kwargs):
        labels = kwargs.pop(self.KEYWORD, None)
        self._labels = labels
        return args, kwargs

    def _head(self, head, args):
        if self._labels is None:
            return None
        hidden, labels = args[0], self._labels  # [1, T, H], [1, T]
        self._labels = None
        if self.fused is not None:
            self._loss = self.fused(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                    labels.reshape(-1).to(hidden.device), head.bias)
        else:
            self._loss = linear_cross_entropy_sum(hidden, head.weight, labels, head.bias, self.post, self.chunk_size)
        # the head then makes empty logits [1, 0, V] from a new empty tensor: a view of the hidden states would keep
        # their storage [1, T, H] alive until backward (the loss already holds what backward needs)
        return (hidden.new_empty(*hidden.shape[:-2], 0, hidden.shape[-1]),)

    def _attach(self, module, args, output):
        if self._loss is not None:
            output["loss"] = self._loss
            self._loss = None
        return output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def enable_chunked_loss(model: torch.nn.Module, chunk_size: int = DEFAULT_CHUNK, fused=None,
                        notice=warnings.warn) -> ChunkedLossHook | None:
    """Install :class:`ChunkedLossHook` on a transformers causal LM (before FSDP2, like the attention switch).
    Returns None — after a one-line ``notice`` — for a family whose logit post-processing seqpack does not know or
    whose head is not an nn.Linear (Baichuan2's NormHead): that model keeps the full-logits loss.

        >>> hook = seqpack.enable_chunked_loss(model)                                       # doctest: +SKIP
        >>> total = model(**batch.model_inputs(), chunked_loss_labels=batch.shift_labels).loss   # doctest: +SKIP
    """
    if chunk_size < 1:
        raise ValueError(f"loss.chunk_size={chunk_size} must be a positive number of tokens (e.g. {DEFAULT_CHUNK})")
    post = logit_postprocess(model.config)
    head = model.get_output_embeddings()
    if post is None or type(head) is not torch.nn.Linear:
        why = (f"its output head is a {type(head).__name__}" if post is not None
               else f"seqpack does not know how {model.config.model_type!r} post-processes its logits")
        notice(f"chunked loss off for {type(model).__name__}: {why}; using the full-logits loss")
        return None
    if getattr(model, "_seqpack_chunked_loss", None) is not None:
        model._seqpack_chunked_loss.remove()
    hook = ChunkedLossHook(model, post, chunk_size, fused)
    model._seqpack_chunked_loss = hook
    return hook
