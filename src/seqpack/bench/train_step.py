"""``seqpack train``'s step on one packed row, for the benchmarks that compare settings of it (``seqpack bench
offload``, ``seqpack bench longest``): the run's model and optimizer built from a Config, then forward + loss +
backward (:meth:`seqpack.train.task.CausalLM.step`), gradient clipping and AdamW, as the training loop runs them.

    >>> cfg = load_config(None, ["--model.hidden_size", "32", "--train.device", "cpu"])   # doctest: +SKIP
    >>> run = TrainStep(cfg, vocab_size=300, topo=init_topology(device="cpu"))           # doctest: +SKIP
    >>> run.step(seqpack.pack([torch.arange(3, 40)]))                                    # doctest: +SKIP
"""

from __future__ import annotations

import time

import torch

from ..batch import PackedBatch, pack
from ..train.config import Config
from ..train.loop import build_optimizer, clip_grad_norm
from ..train.model import build_model
from ..train.task import CausalLM


class TrainStep:
    """One setting's model and optimizer (``seqpack train``'s, built on ``topo.device``) and its timed steps."""

    def __init__(self, cfg: Config, vocab_size: int, topo):
        self.cfg, self.topo = cfg, topo
        self.model = build_model(cfg, vocab_size, topo)
        self.optimizer = build_optimizer(self.model, cfg)
        self.task = CausalLM()
        self.times: list[float] = []  # seconds of each :meth:`step`

    @property
    def checkpoint_offload(self):
        """The model's :class:`seqpack.ops.checkpoint_offload.CheckpointOffload`, or None."""
        return getattr(self.model, "_seqpack_checkpoint_offload", None)

    def forward_backward(self, row: PackedBatch) -> float:
        """Forward, loss and backward of ``row`` (gradients summed, as ``seqpack train``); the loss."""
        return self.task.step(self.cfg, self.model, [row], self.topo)

    def update(self) -> None:
        """Clip the gradients, AdamW, drop the gradients."""
        clip_grad_norm(self.model, self.cfg.hybrid_zero_optimizer.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, row: PackedBatch) -> None:
        """One timed optimizer step on ``row`` (appended to ``times``)."""
        if self.topo.device.type == "cuda":
            torch.cuda.synchronize(self.topo.device)
        t0 = time.perf_counter()
        self.forward_backward(row)
        self.update()
        if self.topo.device.type == "cuda":
            torch.cuda.synchronize(self.topo.device)
        self.times.append(time.perf_counter() - t0)


def packed_row(seq_len: int, vocab_size: int, doc_len: int | None = None, seed: int = 0) -> PackedBatch:
    """A packed row of ``seq_len`` random tokens: documents of ``doc_len`` tokens (the last one cut), or of 256 to
    2048 tokens drawn with ``seed`` when ``doc_len`` is None."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], seq_len
    while left:
        n = min(left, doc_len or int(torch.randint(256, 2049, (1,), generator=g)))
        lengths.append(n)
        left -= n
    return pack([torch.randint(3, vocab_size, (n,), generator=g) for n in lengths])
