"""LLaVA-1.5 on packed multimodal rows == each sample alone through the unmodified model (fp32 CPU): logits,
loss, and the gradient of every parameter (language model, projector, vision tower). Also: attention per
sub-model (the vision tower stays bidirectional), and the row builder's errors."""

import pytest
import torch

import seqpack
from seqpack.ops.loss import token_loss_sum
from seqpack.multimodal.batch import encode_sample, pack_multimodal

from llava_tiny import chat, model_pair, random_image, samples, tiny_llava_config, tiny_processor

ATOL = 1e-5  # fp32 logits of O(1): round-off of a different summation order (SDPA vs eager, varlen buckets)
RTOL = 1e-4  # relative gradient error, as for the text families


def _reference(ref, processor, items):
    """Each sample alone: logits [1, t_i, V] and the summed cross-entropy of its assistant targets."""
    outs, total, count = [], 0.0, 0
    for s in items:
        row = pack_multimodal([s], processor)  # one sample = the plain HF inputs (ids, pixel_values)
        inputs = dict(input_ids=row.input_ids)
        if row.pixel_values is not None:
            inputs["pixel_values"] = row.pixel_values
        logits = ref(**inputs).logits
        outs.append(logits)
        total = total + token_loss_sum(logits, row.shift_labels)
        count += row.num_valid_targets
    return outs, total, count


def test_packed_row_equals_samples_alone():
    processor = tiny_processor()
    ref, model = model_pair()
    seqpack.dispatch(model)
    cfg = model.config
    assert cfg.text_config._attn_implementation == "seqpack"
    assert cfg.vision_config._attn_implementation == "sdpa"  # the vision tower stays bidirectional

    items = samples()
    row = pack_multimodal(items, processor, pad_to=200)  # + a pad segment
    moved = row.map_tensors(torch.clone)
    assert moved.pixel_values is not row.pixel_values and torch.equal(moved.input_ids, row.input_ids)
    assert row.images_per_sample == (1, 2, 0, 0) and row.pixel_values.shape == (3, 3, 32, 32)
    out = model(**row.model_inputs()).logits
    loss = seqpack.causal_lm_loss(out, row.shift_labels)
    ref_outs, ref_sum, count = _reference(ref, processor, items)
    assert count == row.num_valid_targets > 0
    cu = row.cu_seqlens.tolist()
    for i, ref_logits in enumerate(ref_outs):
        err = (out[:, cu[i]:cu[i + 1]] - ref_logits).abs().max().item()
        assert err <= ATOL, f"sample {i}: logits differ by {err:.2e}"
    ref_loss = ref_sum / count
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    # transformers' own loss path on the packed row gives the same number
    hf_loss = model(**row.model_inputs(with_labels=True)).loss
    assert abs(hf_loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())

    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    checked = set()
    for name, p in model.named_parameters():
        g_ref = ref_params[name].grad
        assert (p.grad is None) == (g_ref is None), name
        if g_ref is None:  # CLIP's post_layernorm (pooled CLS output) is unused by LLaVA in both
            continue
        if name.endswith("k_proj.bias"):  # softmax ignores a shift of all keys: the exact gradient is 0
            assert max(p.grad.abs().max().item(), g_ref.abs().max().item()) <= 1e-6, name
            continue
        err = float((p.grad - g_ref).norm() / g_ref.norm().clamp(min=1e-12))
        assert err <= RTOL, f"{name}: relative gradient error {err:.2e}"
        checked.add(name.split(".")[1] if name.startswith("model.") else name.split(".")[0])
    assert checked == {"vision_tower", "multi_modal_projector", "language_model", "lm_head"}


def test_from_pretrained_with_plain_seqpack_string(tmp_path):
    """attn_implementation="seqpack" for the whole LLaVA: the vision tower's bidirectional attention runs on
    SDPA (the text row's packed metadata never reaches it); the packed row still equals the samples alone."""
    from transformers import LlavaForConditionalGeneration

    processor = tiny_processor()
    ref, _ = model_pair(seed=1)
    ref.save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="seqpack")
    assert model.config.vision_config._attn_implementation == "seqpack"
    items = samples()[:2]
    row = pack_multimodal(items, processor)
    out = model(**row.model_inputs()).logits
    ref_outs, _, _ = _reference(ref, processor, items)
    cu = row.cu_seqlens.tolist()
    for i, ref_logits in enumerate(ref_outs):
        assert (out[:, cu[i]:cu[i + 1]] - ref_logits).abs().max().item() <= ATOL
    # generate() (KV cache, dense masks) gives the unmodified model's tokens
    text = processor.tokenizer.apply_chat_template(items[0]["messages"][:1], tokenize=False,
                                                   add_generation_prompt=True)
    prompt = processor(images=items[0]["images"], text=[text], return_tensors="pt")  # transformers' own expansion
    assert prompt["input_ids"][0].tolist() == row.input_ids[0, :prompt["input_ids"].shape[1]].tolist()
    kwargs = dict(input_ids=prompt["input_ids"], pixel_values=prompt["pixel_values"], max_new_tokens=4,
                  do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kwargs), ref.generate(**kwargs))
    # seqpack.load_model gives the language model seqpack and the vision tower SDPA
    loaded = seqpack.load_model(tmp_path)
    assert type(loaded) is LlavaForConditionalGeneration
    assert (loaded.config.text_config._attn_implementation, loaded.config.vision_config._attn_implementation) == \
        ("seqpack", "sdpa")


def test_bidirectional_attention_outside_a_vision_encoder_is_refused():
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model("bert", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=48)
    bert = AutoModel.from_config(cfg, attn_implementation="seqpack")
    with pytest.raises(ValueError, match="causal-only.*bidirectional"):
        bert(input_ids=torch.tensor([[5, 6, 7]]))


def test_row_builder_errors():
    processor = tiny_processor()
    with pytest.raises(ValueError, match=r"sample 0: the conversation has 1 image placeholder\(s\) '<image>' but 2"):
        pack_multimodal([{"images": [random_image(0), random_image(1)], "messages": chat("q", "a")}], processor)
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_sample(processor, [{"role": "user", "content": "<image>\nhi"}], [(32, 32)], "x.jsonl line 3")
    with pytest.raises(ValueError, match="cannot read image '/nonexistent.png'"):
        pack_multimodal([{"image": "/nonexistent.png", "messages": chat("q", "a")}], processor)
    ids, mask = encode_sample(processor, chat("q", "a"), [(40, 48)])
    image = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    assert len(image) == 16 and image == list(range(image[0], image[0] + 16))  # (32/8)² features, contiguous
    assert not any(mask[i] for i in image)
    # a model whose image token does not match the processor's fails in the model's own check
    _, model = model_pair()
    row = pack_multimodal(samples()[:1], processor)
    bad = row.model_inputs()
    bad["input_ids"] = bad["input_ids"].clone()
    bad["input_ids"][0, bad["input_ids"][0].tolist().index(processor.image_token_id)] = 5
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        seqpack.dispatch(model)(**bad)


def test_config_has_separate_sub_configs():
    assert tiny_llava_config().vision_config is not tiny_llava_config().vision_config
