"""seqpack inside transformers' Trainer and TRL's SFTTrainer.

- TRL padding-free packing with seqpack attention equals running each document alone (loss and every gradient);
  transformers' own sdpa/eager on the same batch do not separate the documents.
- SequenceParallelTrainer with sp=2 (world 2) and dp=2 × sp=2 (world 4), gradient accumulation 2, plain SGD:
  per-step logged losses, the eval loss and the saved final weights equal a one-process transformers Trainer run
  over the same global batches; SequenceParallelSFTTrainer (assistant-only loss, bfd packing) with sp=2 equals a
  one-process TRL SFTTrainer. Real gloo process groups spawned under pytest (one spawn per world size).
- Misuse errors: sp not dividing the world size, models whose attention seqpack cannot take, non-text batches.

Tolerances: losses 1e-5 relative, gradients / SGD weights 1e-4 relative to the largest entry — float32 round-off of
differently ordered sums (packed vs per-document, sharded vs whole rows), far below the sdpa-vs-document gap.
"""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

import seqpack
from seqpack.hf import DataCollatorForPacking, SequenceParallelTrainer, packed_batch_from_inputs
from seqpack.parallel.ring_split import CHUNKS_PER_RANK

from conftest import tiny_config

LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-4


def _examples(n: int, seed: int) -> list[dict]:
    """Tokenized examples of 3..20 tokens; the first few tokens of each carry no loss (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 21, (1,), generator=g))
        prompt = int(torch.randint(0, length - 1, (1,), generator=g))
        out.append({"input_ids": torch.randint(5, 64, (length,), generator=g).tolist(),
                    "assistant_masks": [0] * prompt + [1] * (length - prompt)})
    return out


def _args(out_dir, **overrides) -> dict:
    args = dict(output_dir=str(out_dir), use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                disable_tqdm=True, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
                weight_decay=0.0, remove_unused_columns=False, train_sampling_strategy="sequential",
                dataloader_pin_memory=False, gradient_accumulation_steps=2, max_steps=3)
    args.update(overrides)
    return args


def _model(vocab_size: int = 64):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=vocab_size), attn_implementation="seqpack")


def _losses(trainer) -> list[float]:
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def _assert_close_weights(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        tol = WEIGHT_RTOL * float(want[name].abs().max())
        gap = float((got[name] - want[name]).abs().max())
        assert gap <= tol, (name, gap, tol)


def _chats(n: int, seed: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    words = ["def", "x", "return", "self", "import", "os", "print", "(", ")", "1", "2", "+", "if", "else"]

    def text():
        count = int(torch.randint(1, 7, (1,), generator=g))
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (count,), generator=g))

    return Dataset.from_list([{"messages": [{"role": "user", "content": text()},
                                            {"role": "assistant", "content": text()}]} for _ in range(n)])


def _sft_config(out_dir, **overrides):
    from trl import SFTConfig

    # bf16=False: SFTConfig defaults to bf16 autocast, even on CPU; parity is checked in float32
    return SFTConfig(**_args(out_dir, bf16=False, assistant_only_loss=True, packing=True, packing_strategy="bfd",
                             max_length=96, per_device_train_batch_size=2, **overrides))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE with the ChatML template (assistant turns in {% generation %}), trained here in ms."""
    from seqpack.data.corpus import train_tokenizer

    texts = [" ".join(["def x return self import os print ( ) 1 2 + if else"] * 3)] * 20
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, vocab_size=300).save_pretrained(path)
    return path


def _load_tokenizer(path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------------------
# one process: TRL padding-free packing == per-document; sdpa / eager are not


def _per_document_reference(state_dict, vocab, batch, attn="eager"):
    """Sum of CE over every document run alone through an unmodified model, / the batch's valid-target count."""
    ref = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=vocab), attn_implementation=attn)
    ref.load_state_dict(state_dict)
    packed = packed_batch_from_inputs(batch)
    cu = packed.cu_seqlens.tolist()
    logits = torch.cat([ref(input_ids=packed.input_ids[:, a:b]).logits for a, b in zip(cu, cu[1:])], dim=1)
    loss = seqpack.ops.loss.token_loss_sum(logits, packed.shift_labels) / packed.num_valid_targets
    loss.backward()
    return loss.detach(), logits.detach(), {n: p.grad for n, p in ref.named_parameters()}


def test_trl_padding_free_packing_equals_per_document(tmp_path, tokenizer_dir):
    pytest.importorskip("trl")
    from transformers import TrainerCallback
    from trl import SFTTrainer

    tok = _load_tokenizer(tokenizer_dir)
    model = _model(len(tok))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {}

    class FirstStepGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                grads.update({n: p.grad.clone() for n, p in model.named_parameters()})

    args = _sft_config(tmp_path / "run", padding_free=True, gradient_accumulation_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_chats(24, seed=1), processing_class=tok,
                         callbacks=[FirstStepGrads()])
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and len(batch["cu_seq_lens_q"]) > 3  # several documents in one row
    labels = batch["labels"][0]
    assert (labels == -100).any() and (labels != -100).any()  # assistant-only loss masks the user turns

    want_loss, want_logits, want_grads = _per_document_reference(initial, len(tok), batch)
    for attn in ("seqpack", "sdpa", "eager"):  # transformers 5.24 does not separate documents from position_ids
        other = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok)), attn_implementation=attn)
        other.load_state_dict(initial)
        with torch.no_grad():
            gap = float((other(**batch).logits - want_logits).abs().max())
        assert gap <= 1e-5 if attn == "seqpack" else gap > 1e-2, (attn, gap)

    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert abs(losses[0] - float(want_loss)) <= LOSS_RTOL * float(want_loss), (losses[0], float(want_loss))
    for name, g in want_grads.items():
        tol = WEIGHT_RTOL * float(g.abs().max())
        assert torch.allclose(grads[name], g, atol=tol, rtol=0), name

    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    _assert_close_weights(loaded.state_dict(), trainer.model.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# collator and batch conversion


def test_collator_and_conversion_of_every_batch_layout():
    pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ex = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8], "messages": "ignored"},
          {"input_ids": [9, 10], "labels": [9, 10], "seq_idx": 0}]
    want = DataCollatorForPacking()(ex)
    assert want["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert want["shift_labels"].tolist() == [[6, 7, 8, -100, 10, -100]] and want["cu_seq_lens_q"].tolist() == [0, 4, 6]
    for padding_free in (True, False):  # TRL's padding-free row and its padded [B, L] batch give the same row
        got = packed_batch_from_inputs(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(ex))
        assert got.shift_labels.tolist() == want["shift_labels"].tolist() and got.cu_seqlens.tolist() == [0, 4, 6]
    left = {"input_ids": torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]]),  # left padding
            "attention_mask": torch.tensor([[1] * 4, [0, 0, 1, 1]]),
            "labels": torch.tensor([[-100, 6, 7, 8], [-100, -100, 9, 10]])}
    assert packed_batch_from_inputs(left).input_ids.tolist() == want["input_ids"].tolist()
    # TRL bfd rows: one example = several documents (seq_lengths); masks combine with labels; SP padding
    packed = DataCollatorForPacking(pad_to_multiple_of=4).pack(
        [{"input_ids": [5, 6, 7, 8, 9], "seq_lengths": [3, 2], "completion_mask": [1, 1, 1, 0, 1]}])
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert packed.shift_labels.tolist() == [[6, 7, -100, 9, -100, -100, -100, -100]]
    with pytest.raises(ValueError, match="pixel_values"):
        packed_batch_from_inputs({**left, "pixel_values": torch.zeros(1)})
    with pytest.raises(ValueError, match="seq_lengths"):
        DataCollatorForPacking()([{"input_ids": [5, 6, 7], "seq_lengths": [2, 2]}])
    with pytest.raises(ValueError, match="no 'input_ids'"):
        DataCollatorForPacking()([{"text": "abc"}])


def test_models_whose_attention_seqpack_cannot_take_are_refused(tmp_path):
    from transformers.models.llama import modeling_llama

    mamba = AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=1,
                                                                  vocab_size=64, state_size=4))
    hard_coded = _model()  # a hand-edited modeling file: attention that ignores attn_implementation
    for layer in hard_coded.model.layers:
        def eager_only(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
            shape = (*hidden_states.shape[:-1], -1, self.head_dim)
            q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            q, k = modeling_llama.apply_rotary_pos_emb(q, k, *position_embeddings)
            out, _ = modeling_llama.eager_attention_forward(self, q, k, v, None, scaling=self.scaling)
            return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), None
        layer.self_attn.forward = eager_only.__get__(layer.self_attn)
    for model, match in ((mamba, "does not support custom attention"), (hard_coded, "never called seqpack.s attention")):
        with pytest.raises(ValueError, match=match):
            SequenceParallelTrainer(model=model, args=TrainingArguments(**_args(tmp_path / "run")),
                                    train_dataset=_examples(4, 0), data_collator=DataCollatorForPacking())


# ---------------------------------------------------------------------------------------------------------------
# several processes: sequence parallel Trainer == one process


def _sp_trainer_case(out, dp: int, sp: int, ring: int = 1):
    args = TrainingArguments(**_args(out / "run", per_device_train_batch_size=2, per_device_eval_batch_size=2))
    trainer = SequenceParallelTrainer(model=_model(), args=args, train_dataset=_examples(24, seed=7),
                                      eval_dataset=_examples(8, seed=8), data_collator=DataCollatorForPacking(),
                                      sp_size=sp, ring_size=ring)
    assert (trainer.topology.dp_size, trainer.topology.sp_size, trainer.topology.ring_size) == (dp, sp, ring)
    sampler = trainer._dp_sampler(range(11), shuffle=True, seed=3)  # train_sampling_strategy="random"
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(sampler))
    assert all(everyone[r] == everyone[r - r % sp] for r in range(len(everyone)))  # SP peers: the same examples
    assert set().union(*everyone) == set(range(11)) and everyone[0] != sorted(everyone[0])  # shuffled, all covered
    if dp == 2:
        assert not set(everyone[0]) & set(everyone[2]) - {everyone[0][0]}  # DP groups: disjoint (one repeat pads)
    row = DataCollatorForPacking()(_examples(24, seed=7)[:2])
    multiple = sp if ring == 1 else CHUNKS_PER_RANK * sp  # the ring split cuts chunks
    padded = -(-row["input_ids"].shape[1] // multiple) * multiple
    assert trainer.shard_inputs(row)["input_ids"].shape[1] == padded // sp  # [1, T/S]
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(out / "saved"))
    losses = _losses(trainer)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (losses, metrics["eval_loss"]))
    assert all(e == everyone[0] for e in everyone), everyone  # every rank logs the same step losses
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps({"losses": losses, "eval_loss": metrics["eval_loss"]}))


def _sp_sft_case(out, tokenizer_dir):
    from seqpack.hf import SequenceParallelSFTTrainer

    tok = _load_tokenizer(tokenizer_dir)
    trainer = SequenceParallelSFTTrainer(model=_model(len(tok)), args=_sft_config(out / "run", max_steps=2),
                                         train_dataset=_chats(24, seed=1), processing_class=tok, sp_size=2)
    trainer.train()
    trainer.save_model(str(out / "saved"))
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps({"losses": _losses(trainer)}))


def _worker(rank, world, port, out, tokenizer_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from pathlib import Path

    out = Path(out)
    try:
        if world == 2:
            _sp_trainer_case(out / "trainer", dp=1, sp=2)
            _sp_sft_case(out / "sft", tokenizer_dir)
            with pytest.raises(ValueError, match="not divisible by sequence parallel degree sp=3"):
                SequenceParallelTrainer(model=_model(), args=TrainingArguments(**_args(out / "bad")),
                                        train_dataset=_examples(4, 0), sp_size=3)
        else:
            _sp_trainer_case(out / "trainer", dp=2, sp=2)
            _sp_trainer_case(out / "ring", dp=2, sp=2, ring=2)  # ring attention over the SP pairs
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4], ids=["sp2", "dp2xsp2"])
def test_sequence_parallel_trainer_equals_one_process(tmp_path, world, tokenizer_dir):
    if world == 2:
        pytest.importorskip("trl")
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), str(tokenizer_dir)), nprocs=world, join=True)

    dp = world // 2  # one process over the same global batches: dp x 2 examples per micro-batch
    args = TrainingArguments(**_args(tmp_path / "ref", per_device_train_batch_size=2 * dp,
                                     per_device_eval_batch_size=2))
    ref = Trainer(model=_model(), args=args, train_dataset=_examples(24, seed=7), eval_dataset=_examples(8, seed=8),
                  data_collator=DataCollatorForPacking())
    ref.train()
    want = _losses(ref)
    for case in ("trainer",) + (("ring",) if world == 4 else ()):
        got = json.loads((tmp_path / case / "result.json").read_text())
        assert len(got["losses"]) == 3
        for g, w in zip(got["losses"], want):
            assert abs(g - w) <= LOSS_RTOL * w, (case, got["losses"], want)
    if dp == 1:  # the same eval batches (with dp=2 they are grouped differently, so the batch means differ)
        want_eval = ref.evaluate()["eval_loss"]
        assert abs(got["eval_loss"] - want_eval) <= LOSS_RTOL * want_eval, (got["eval_loss"], want_eval)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "trainer" / "saved").state_dict()
    _assert_close_weights(saved, ref.model.state_dict())
    assert not torch.equal(saved["model.embed_tokens.weight"], _model().state_dict()["model.embed_tokens.weight"])

    if world == 2:  # TRL SFT, assistant-only loss, bfd packing, sp=2 == one-process SFTTrainer
        from trl import SFTTrainer

        tok = _load_tokenizer(tokenizer_dir)
        sft = SFTTrainer(model=_model(len(tok)), args=_sft_config(tmp_path / "sft_ref", max_steps=2),
                         train_dataset=_chats(24, seed=1), processing_class=tok)
        sft.train()
        got = json.loads((tmp_path / "sft" / "result.json").read_text())["losses"]
        for g, w in zip(got, _losses(sft), strict=True):
            assert abs(g - w) <= LOSS_RTOL * w, (got, _losses(sft))
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "saved").state_dict()
        _assert_close_weights(saved, sft.model.state_dict())
