"""`seqpack train` on a tiny LLaVA folder (saved locally with its processor) and a JSONL of generated images:
loss falls, and the Hugging Face export loads with from_pretrained. Plus the multimodal loader: whole samples per
row, DP ranks disjoint, exact resume, and errors naming file and line."""

import json

import pytest
import torch

from seqpack.multimodal.data import MultimodalLoader, read_records
from seqpack.tasks import train
from seqpack.train import load_config

from llava_tiny import random_image, tiny_processor, train_args, write_dataset, write_model_folder


def test_train_llava_folder_and_export(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = write_model_folder(tmp_path / "tiny-llava")
    data = write_dataset(tmp_path / "data")
    result = train(load_config(None, train_args(model_dir, data, tmp_path / "run", steps=8)
                               + ["--model.checkpoint", "True"]))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(map(lambda x: x == x, losses))
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses  # loss falls
    trained = result.model
    assert trained.config.text_config._attn_implementation == "seqpack"  # export restored the per-model setting
    assert trained.config.vision_config._attn_implementation == "sdpa"

    loaded = LlavaForConditionalGeneration.from_pretrained(result.hf_dir)  # plain transformers, no seqpack needed
    state = trained.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    processor = AutoProcessor.from_pretrained(result.hf_dir)
    assert processor.image_token_id == loaded.config.image_token_id


def test_loader_rows_dp_and_resume(tmp_path):
    data = write_dataset(tmp_path, n=12)
    processor = tiny_processor()
    full = MultimodalLoader(data, processor, row_len=160, micro_num=1)
    lengths = [full._length(i) for i in range(12)]
    assert all(row.text.num_tokens == 160 for row in next(full))
    ranks = [MultimodalLoader(data, processor, row_len=160, micro_num=2, dp_rank=r, dp_size=2) for r in (0, 1)]
    seen = [[tuple(row.text.cu_seqlens.tolist()) for _ in range(3) for row in next(ld)] for ld in ranks]
    single = MultimodalLoader(data, processor, row_len=160, micro_num=1)
    order = [tuple(next(single)[0].text.cu_seqlens.tolist()) for _ in range(12)]
    assert seen[0] == order[0::2] and seen[1] == order[1::2]  # global rows r, r + dp, ...
    # every sample is whole: a row's segments are its samples' lengths (+ the pad), each sample once per epoch
    probe, picked_all = MultimodalLoader(data, processor, row_len=160, micro_num=1), []
    while probe.cursor < 12:
        state = probe.state_dict()
        picked = probe._next_samples()
        probe.load_state_dict(state)
        segments = next(probe)[0].text.cu_seqlens.diff().tolist()
        assert segments[:len(picked)] == [lengths[i] for i in picked] and sum(segments) == 160
        assert len(segments) - len(picked) in (0, 1)
        picked_all += picked
    assert sorted(picked_all) == list(range(12))
    # resume: the state after k steps gives the same next rows
    a = MultimodalLoader(data, processor, row_len=160, micro_num=2)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    want = [[r.input_ids for r in next(a)] for _ in range(3)]
    b = MultimodalLoader(data, processor, row_len=160, micro_num=2)
    b.load_state_dict(state)
    got = [[r.input_ids for r in next(b)] for _ in range(3)]
    assert all(torch.equal(x, y) for gw, gg in zip(want, got) for x, y in zip(gw, gg))


def test_bad_records_name_file_and_line(tmp_path):
    random_image(0).save(tmp_path / "a.png")
    bad = tmp_path / "bad.jsonl"
    good = {"image": "a.png", "messages": [{"role": "user", "content": "<image>\nq"},
                                           {"role": "assistant", "content": "a"}]}
    for line, message in [("{not json", "line 2: invalid JSON"),
                          (json.dumps({"image": "missing.png", "messages": []}),
                           "line 2: image 'missing.png' not found"),
                          (json.dumps({"image": "a.png"}), "line 2: a record needs 'messages'")]:
        bad.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=message):
            read_records(bad)
    with pytest.raises(ValueError, match="no JSONL file"):
        read_records(tmp_path / "nothing")
    bad.write_text(json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="no sample fits into a row of 8 tokens"):
        MultimodalLoader(bad, tiny_processor(), row_len=8)
