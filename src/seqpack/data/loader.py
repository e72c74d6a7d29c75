"""The resumable packed loader: ftdp folder -> per optimizer step, ``micro_num`` packed rows for this DP rank.

Shape legend: ``L = seq_len * micro_bsz`` tokens per row (one ``PackedBatch`` of ``[1, L]``).

Order. The packing plan (see ``packing.py``) yields *units*: rows of ``L`` for ``cut``/``into_one``, packs of
``seq_len`` for ``bfd``/``padded`` (then ``micro_bsz`` consecutive units form a row). Without ``dataset_weights``
epoch e permutes the units with ``np.random.RandomState(seed + e)`` (XTuner's ``InternRepoSampler``), truncates to
whole steps of all DP ranks, and global row k goes to DP rank ``k % dp_size``. With ``dataset_weights`` every
group permutes its own units per group epoch and ``WeightedSchedule`` picks the group of each global row.
Everything is a function of (files, arguments, state), so the ranks of one sequence-parallel group (same
``dp_rank``) get identical batches and ``load_state_dict`` resumes exactly.

    >>> loader = build_packed_loader(seq_len=256, micro_num=2, max_docs=20)    # embedded stdlib corpus
    >>> step = next(loader)                                                   # [PackedBatch, PackedBatch]
    >>> step[0].input_ids.shape, loader.step
    (torch.Size([1, 256]), 1)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from ..batch import PackedBatch
from .ftdp import FtdpFile, check_ids, list_bin_files
from .mixing import WeightedSchedule, group_files
from .packing import Plan, check_strategy, concat_plans, plan_bfd, plan_cut, plan_padded, render_row


@dataclass
class _Group:
    """Documents of one mixing group and their plan. ``file_of``/``line_of`` [n]: where group document g lives."""

    name: str
    file_of: np.ndarray
    line_of: np.ndarray
    plan: Plan
    units_per_epoch: int  # units used per epoch (a multiple of the units of one row, or of one global step)
    tokens: int


def min_length_for(path: str, min_length: int, min_length_dict: dict[str, int] | None) -> int:
    """InternEvo's rule: a ``min_length_dict`` key that is a substring of the file's path overrides ``min_length``.
    ``path`` is the full path as InternEvo forms it, ``os.path.join(train_folder, relative path)``, so a key can
    also match a part of the folder's own path (and then applies to every file)."""
    hits = [k for k in (min_length_dict or {}) if k in path]
    if len(hits) > 1:
        raise ValueError(f"file {path!r} matches several min_length_dict keys {hits}; make them disjoint")
    return int(min_length_dict[hits[0]]) if hits else int(min_length)


class PackedLoader:
    """Infinite iterator over optimizer steps; ``next(loader)`` -> list of ``micro_num`` ``PackedBatch``.

    ``loader.step`` steps produced, ``loader.epoch`` completed passes (the slowest group's, with mixing),
    ``loader.stats`` counts (documents, tokens, units, dropped/split documents, per group),
    ``state_dict()`` / ``load_state_dict()`` resume exactly."""

    def __init__(self, folder, *, seq_len: int, micro_bsz: int = 1, micro_num: int = 1, packing: str = "cut",
                 min_length: int = 0, min_length_dict=None, dataset_weights=None, data_order_file=None,
                 seed: int = 1024, dp_rank: int = 0, dp_size: int = 1, pad_token_id: int = 0,
                 overlong: str = "split", max_docs: int | None = None, vocab_size: int | None = None):
        for name, v in dict(seq_len=seq_len, micro_bsz=micro_bsz, micro_num=micro_num, dp_size=dp_size).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.packing = check_strategy(packing)
        self.folder, self.seq_len, self.micro_bsz, self.micro_num = str(folder), seq_len, micro_bsz, micro_num
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.pad_token_id, self.vocab_size = pad_token_id, vocab_size
        self.row_len = seq_len * micro_bsz
        self.per_row = 1 if packing in ("cut", "into_one") else micro_bsz
        unit_len = self.row_len if self.per_row == 1 else seq_len

        self.rels = list_bin_files(folder, data_order_file)
        self.files = [FtdpFile(os.path.join(folder, r)) for r in self.rels]
        names, group_of, weights = group_files(self.rels, dataset_weights)
        keep = self._select_documents(min_length, min_length_dict, max_docs)
        mixing = dataset_weights is not None and len(dataset_weights) > 0
        step_units = self.per_row * (1 if mixing else dp_size * micro_num)
        self.groups = []
        for gi, name in enumerate(names):
            fids = [i for i, g in enumerate(group_of) if g == gi]
            self.groups.append(self._build_group(name, fids, keep, unit_len, overlong, step_units))
        self.mixing = mixing
        self.weights = weights
        self.stats = self._stats(keep)
        self.step, self._cursors, self._schedule = 0, [[0, 0] for _ in self.groups], WeightedSchedule(weights)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    # ---------------------------------------------------------------- planning
    def _select_documents(self, min_length, min_length_dict, max_docs) -> list[np.ndarray]:
        """Per file: indices of the documents kept (min_length filter, then the first ``max_docs`` overall)."""
        keep, budget = [], max_docs
        unmatched = [k for k in (min_length_dict or {}) if not any(k in os.path.join(self.folder, r) for r in self.rels)]
        if unmatched:  # like dataset_weights: a key that matches nothing is a typo, not a no-op
            more = " ..." if len(self.rels) > 5 else ""
            raise ValueError(f"min_length_dict keys {unmatched} match no .bin file path (keys are substrings of the "
                             f"path; files: {self.rels[:5]}{more})")
        for rel, f in zip(self.rels, self.files):
            full = os.path.join(self.folder, rel)  # InternEvo matches the keys against the full path
            idx = np.flatnonzero(f.lengths >= min_length_for(full, min_length, min_length_dict))
            if budget is not None:
                idx, budget = idx[:budget], budget - min(budget, len(idx))
            keep.append(idx)
        if sum(len(k) for k in keep) == 0:
            raise ValueError(f"no documents left in {self.folder} after min_length={min_length}, "
                             f"min_length_dict={min_length_dict}, max_docs={max_docs}")
        return keep

    def _build_group(self, name, fids, keep, unit_len, overlong, step_units) -> _Group:
        file_of = np.concatenate([np.full(len(keep[i]), i) for i in fids] + [np.zeros(0, np.int64)])
        line_of = np.concatenate([keep[i] for i in fids] + [np.zeros(0, np.int64)])
        if self.packing in ("cut", "into_one"):  # per file, then concatenated (InternEvo's ConcatDataset)
            offsets = np.cumsum([0] + [len(keep[i]) for i in fids])[:-1].tolist()
            plans = [plan_cut(self.files[i].lengths[keep[i]], unit_len, self.seed) for i in fids]
            plan = concat_plans(plans, offsets) if plans else plan_padded(np.zeros(0, np.int64), unit_len)
        else:
            lengths = np.concatenate([self.files[i].lengths[keep[i]] for i in fids] + [np.zeros(0, np.int64)])
            plan = (plan_bfd if self.packing == "bfd" else plan_padded)(lengths, unit_len, overlong)
        units = plan.num_units - plan.num_units % step_units
        tokens = int(sum(self.files[i].lengths[keep[i]].sum() for i in fids))
        if units == 0:
            raise ValueError(f"{self.folder}: group {name!r} ({tokens} tokens in {len(fids)} files) gives "
                             f"{plan.num_units} {self.packing} packs of {unit_len} tokens, fewer than the "
                             f"{step_units} one step needs; lower seq_len / micro_bsz / micro_num or add data")
        return _Group(name, file_of, line_of, plan, units, tokens)

    def _stats(self, keep) -> dict:
        stats = dict(documents=sum(len(g.line_of) for g in self.groups), tokens=sum(g.tokens for g in self.groups),
                     filtered=int(sum(len(f) - len(k) for f, k in zip(self.files, keep))),
                     steps_per_epoch=None if self.mixing else
                     self.groups[0].units_per_epoch // (self.per_row * self.dp_size * self.micro_num))
        for g in self.groups:
            stats[f"group/{g.name}"] = dict(documents=len(g.line_of), tokens=g.tokens, units=g.plan.num_units,
                                            **g.plan.stats)
            for k in ("dropped", "split", "dropped_tokens"):
                stats[k] = stats.get(k, 0) + g.plan.stats.get(k, 0)
        if stats.get("dropped"):
            warnings.warn(f"{self.folder}: dropped {stats['dropped']} documents ({stats['dropped_tokens']} tokens) "
                          f"longer than seq_len={self.seq_len} (overlong='drop')", stacklevel=3)
        return stats

    # ---------------------------------------------------------------- order
    def _permutation(self, gi: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(gi)  # one epoch per group is kept
        if cached is None or cached[0] != epoch:
            rng = np.random.RandomState([self.seed, gi, epoch] if self.mixing else self.seed + epoch)
            perm = np.arange(self.groups[gi].plan.num_units)
            rng.shuffle(perm)
            cached = self._perm_cache[gi] = (epoch, perm[: self.groups[gi].units_per_epoch])
        return cached[1]

    def _take_row(self) -> tuple[int, np.ndarray]:
        """Advance the global order by one row: (group index, its units)."""
        gi = self._schedule.next() if self.mixing else 0
        cursor = self._cursors[gi]
        units = self._permutation(gi, cursor[0])[cursor[1]: cursor[1] + self.per_row]
        cursor[1] += self.per_row
        if cursor[1] >= self.groups[gi].units_per_epoch:
            cursor[0], cursor[1] = cursor[0] + 1, 0
        return gi, units

    def __iter__(self):
        return self

    def __next__(self) -> list[PackedBatch]:
        rows = []
        for _ in range(self.micro_num):
            for r in range(self.dp_size):  # global row (step * micro_num + micro) * dp_size + r
                gi, units = self._take_row()
                if r == self.dp_rank:
                    rows.append(self._render(gi, units))
        self.step += 1
        return rows

    @property
    def epoch(self) -> int:
        return min(c[0] for c in self._cursors)

    # ---------------------------------------------------------------- rows
    def _render(self, gi: int, units: np.ndarray) -> PackedBatch:
        g = self.groups[gi]
        return render_row(g.plan, units, lambda d: self._raw(g, d), self.seq_len, self.packing, self.pad_token_id)

    def _raw(self, g: _Group, d: int) -> np.ndarray:
        f, line = self.files[g.file_of[d]], int(g.line_of[d])
        raw = f.raw(line)
        if self.vocab_size is not None:
            check_ids(raw, self.vocab_size, f.path, line + 1)
        return raw

    def check_vocab(self, vocab_size: int) -> int:
        """Read every used document and raise ValueError (file, line) on an id >= ``vocab_size``; returns the
        largest id. Call before training when the data's tokenizer is in doubt."""
        largest = -1
        for f, idx in zip(self.files, self._used_lines()):
            for line in idx:
                raw = f.raw(int(line))
                check_ids(raw, vocab_size, f.path, int(line) + 1)
                largest = max(largest, int(np.abs(raw).max()))
        return largest

    def _used_lines(self) -> list[np.ndarray]:
        lines = [[] for _ in self.files]
        for g in self.groups:
            for fi in np.unique(g.file_of):
                lines[fi].append(g.line_of[g.file_of == fi])
        return [np.unique(np.concatenate(x)) if x else np.zeros(0, np.int64) for x in lines]

    # ---------------------------------------------------------------- resume
    def _fingerprint(self) -> dict:
        return dict(files=self.rels, units=[g.plan.num_units for g in self.groups], packing=self.packing,
                    seq_len=self.seq_len, micro_bsz=self.micro_bsz, micro_num=self.micro_num, seed=self.seed,
                    dp_size=self.dp_size, weights=self.weights)

    def state_dict(self) -> dict:
        """Plain Python data (JSON/pickle friendly); identical on every rank."""
        return dict(step=self.step, cursors=[list(c) for c in self._cursors],
                    credits=list(self._schedule.credits), config=self._fingerprint())

    def load_state_dict(self, sd: dict) -> None:
        mine = self._fingerprint()
        saved = sd["config"]
        diff = "; ".join(f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in mine.items() if saved.get(k) != v)
        if diff:
            raise ValueError(f"loader state does not match this loader ({diff[:600]}); resume with the same data "
                             "and data settings")
        self.step = int(sd["step"])
        self._cursors = [list(map(int, c)) for c in sd["cursors"]]
        self._schedule = WeightedSchedule(self.weights, sd["credits"])


def build_packed_loader(*, train_folder=None, seq_len, micro_bsz=1, micro_num=1, packing="cut", min_length=0,
                        min_length_dict=None, dataset_weights=None, data_order_file=None, seed=1024, dp_rank=0,
                        dp_size=1, tokenizer=None, max_docs=None, overlong="split", vocab_size=None) -> PackedLoader:
    """The loader the training engine uses. ``train_folder=None`` -> the embedded stdlib corpus, tokenized with
    ``tokenizer`` (default: ``default_tokenizer()``) and cached as an ftdp folder. Pass the same ``dp_rank`` on every
    rank of a sequence-parallel group. ``overlong`` ("split"/"drop") applies to bfd/padded; ``vocab_size`` makes
    every document read check its ids (ValueError naming file and line)."""
    if train_folder is None:
        from .corpus import default_corpus_folder, default_tokenizer

        tokenizer = tokenizer or default_tokenizer()
        train_folder = default_corpus_folder(tokenizer, max_docs)
    pad = getattr(tokenizer, "pad_token_id", None)
    return PackedLoader(train_folder, seq_len=seq_len, micro_bsz=micro_bsz, micro_num=micro_num, packing=packing,
                        min_length=min_length, min_length_dict=min_length_dict, dataset_weights=dataset_weights,
                        data_order_file=data_order_file, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
                        pad_token_id=0 if pad is None else pad, overlong=overlong, max_docs=max_docs,
                        vocab_size=vocab_size)
