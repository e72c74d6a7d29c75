"""``seqpack generate RUN_DIR --prompt "def "``: sample text from a trained run.

RUN_DIR may be a run folder (its ``hf/`` export, or — for a run that has not finished — its latest complete
checkpoint rebuilt from ``seqpack_config.json``) or any local Hugging Face model folder.

    seqpack generate runs/20260101-120000 --prompt "def " --max_new_tokens 120
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..cli_types import non_negative_float, non_negative_int, positive_int

RUN_CONFIG = "seqpack_config.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder of `seqpack train`, or a Hugging Face model folder")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--max_new_tokens", type=positive_int, default=160, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=non_negative_int, default=40, help="sample among the k most likely tokens")
    parser.add_argument("--num_samples", type=positive_int, default=1, help="samples to print")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda:0 when a GPU is available, else cpu")


def load_for_generation(path: str | Path):
    """(model in eval mode, tokenizer) from a run folder or an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import quiet_transformers

    path = Path(path)
    if (path / "hf" / "config.json").is_file():
        path = path / "hf"
    if (path / "config.json").is_file():
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    if not (path / RUN_CONFIG).is_file():
        raise ValueError(f"{path} is neither a seqpack run folder ({RUN_CONFIG}) nor a Hugging Face model folder "
                         "(config.json)")
    from .checkpoint import latest_checkpoint, load_model_weights
    from .config_load import from_dict
    from .setup import load_tokenizer

    cfg = from_dict(json.loads((path / RUN_CONFIG).read_text()), source=str(path / RUN_CONFIG))
    ckpt = latest_checkpoint(Path((cfg.ckpt.save_ckpt_folder or str(path / "checkpoints")).removeprefix("local:")))
    if ckpt is None:
        raise ValueError(f"run {path} has neither an hf/ export nor a complete checkpoint yet")
    from .model import hf_config, model_source

    tokenizer = load_tokenizer(cfg)
    source = model_source(cfg)
    if source is not None:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_config(hf_config(cfg, len(tokenizer)))
    load_model_weights(ckpt, model)
    print(f"(weights of {ckpt})", file=sys.stderr)
    return model.eval(), tokenizer


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 160, temperature: float = 0.8,
                  top_k: int = 40, seed: int = 0) -> str:
    """Prompt + continuation (sampled with temperature/top-k; greedy at temperature 0)."""
    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    if ids.numel() == 0:
        raise ValueError(f"--prompt {prompt!r} has no tokens; give some text to continue (e.g. --prompt 'def ')")
    sample = temperature > 0
    kwargs = dict(do_sample=True, temperature=temperature, top_k=top_k) if sample else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                             eos_token_id=tokenizer.eos_token_id, **kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def run(args: argparse.Namespace) -> int:
    from ..parallel.topology import choose_device

    try:
        _, device = choose_device(getattr(args, "device", "auto"))
        model, tokenizer = load_for_generation(args.run_dir)
    except ValueError as e:
        print(f"seqpack generate: error: {e}", file=sys.stderr)
        return 2
    model.to(device)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"----- sample {i + 1}")
        try:
            text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                 args.seed + i)
        except ValueError as e:
            print(f"seqpack generate: error: {e}", file=sys.stderr)
            return 2
        print(text)
    return 0
