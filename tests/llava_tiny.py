"""Tiny LLaVA-1.5 pieces for the multimodal tests, all built locally: a byte-level BPE tokenizer with a ChatML
template and an ``<image>`` token, a CLIP image processor (32 px crop), a LlavaProcessor, a LLaVA config (CLIP
vision: image 32, patch 8, hidden 32; Llama text: hidden 32, 2 layers), PIL images of random pixels, and for
``seqpack train`` a saved model folder and a JSONL of colour questions about generated PNGs."""

import json
from functools import lru_cache

import numpy as np
import torch
from transformers import AutoConfig, LlavaProcessor

from seqpack.data.corpus import CHAT_TOKENS, train_tokenizer

TEXTS = ["A red square on a blue field. What colour is the square? The square is red.",
         "Two cats sit on a green mat; one is black and one is white. How many cats are there?",
         "Describe the picture: random pixels, noise, nothing else. It shows noise."] * 8


@lru_cache(maxsize=1)
def tiny_processor():
    from transformers import CLIPImageProcessorPil

    tok = train_tokenizer(TEXTS, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": [*CHAT_TOKENS, "<image>"]})
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=tok.chat_template)


def tiny_llava_config(processor=None, **text_overrides):
    processor = processor or tiny_processor()
    text = dict(model_type="llama", vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    text.update(text_overrides)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    # vision_feature_layer=-1: every vision layer feeds the features, so every one of them gets a gradient
    return AutoConfig.for_model("llava", text_config=text, vision_config=vision,
                                image_token_id=processor.image_token_id, projector_hidden_act="gelu",
                                vision_feature_layer=-1, vision_feature_select_strategy="default")


def random_image(seed: int, height: int = 40, width: int = 48):
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def chat(question: str, answer: str, images: int = 1, follow_up: tuple | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": "<image>\n" * images + question},
            {"role": "assistant", "content": answer}]
    if follow_up:
        msgs += [{"role": "user", "content": follow_up[0]}, {"role": "assistant", "content": follow_up[1]}]
    return msgs


def samples() -> list[dict]:
    """Three samples: one image and two turns, two images, no image."""
    return [
        {"images": [random_image(0)], "messages": chat("What colour is the square?", "The square is red.",
                                                       follow_up=("And the field?", "Blue."))},
        {"images": [random_image(1, 32, 32), random_image(2, 50, 36)],
         "messages": chat("How many cats are there?", "Two cats.", images=2)},
        {"messages": [{"role": "user", "content": "Describe noise."}, {"role": "assistant", "content": "Noise."}]},
    ]


def model_pair(seed: int = 0):
    """(unmodified eager LLaVA, a copy with the same fp32 weights) — configs are separate objects."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    ref = LlavaForConditionalGeneration(tiny_llava_config()).float()
    ref.set_attn_implementation("eager")
    model = LlavaForConditionalGeneration(tiny_llava_config()).float()
    model.load_state_dict(ref.state_dict())
    return ref, model


COLOURS = ["red", "green", "blue", "white"]


def write_dataset(folder, n=8):
    """n samples: a solid-colour image (with a little noise) and the question what colour it is."""
    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    rgb = {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 220), "white": (240, 240, 240)}
    lines = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        pixels = np.clip(np.array(rgb[colour]) + np.random.RandomState(i).randint(-15, 15, (36, 40, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / "images" / f"{i}.png")
        record = {"image": f"images/{i}.png",
                  "messages": [{"role": "user", "content": "<image>\nWhat colour is the square?"},
                               {"role": "assistant", "content": f"The square is {colour}."}]}
        if i % 3 == 2:  # a second turn without image, and one sample with two images
            record = {"images": [f"images/{i}.png", f"images/{i - 1}.png"],
                      "messages": [{"role": "user", "content": "<image>\n<image>\nWhich colours?"},
                                   {"role": "assistant", "content": f"{colour} and {COLOURS[(i - 1) % 4]}."}]}
        lines.append(json.dumps(record))
    (folder / "chats.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "chats.jsonl"


def write_model_folder(folder, seed: int = 0):
    """A tiny LLaVA folder as a user has one: weights, config and processor, saved with save_pretrained."""
    _, model = model_pair(seed)
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def train_args(model_dir, data, run_dir, steps: int) -> list[str]:
    """``seqpack train`` overrides for the tiny LLaVA folder and JSONL."""
    return ["--model_type", "HF", "--ckpt.load_ckpt_info.path", str(model_dir), "--data.train_folder", str(data),
            "--data.seq_len", "128", "--data.micro_num", "2", "--lr_scheduler.total_steps", str(steps),
            "--lr_scheduler.warmup_ratio", "0", "--adam.lr", "1e-2", "--train.tensorboard", "False",
            "--ckpt.checkpoint_every", "100", "--train.run_dir", str(run_dir)]
