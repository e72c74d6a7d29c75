"""``seqpack convert internevo-to-hf|hf-to-internevo`` and the console scripts named after InternEvo's tools
(``convert2hf_internlm``, ``convert2hf_internlm2``, ``revert_internlm``, ``revert_internlm2``), same flags.

    seqpack convert internevo-to-hf --src ckpt/1000 --tgt hf_ckpt --tokenizer tokenizer_internlm2.model --verify
    seqpack convert hf-to-internevo --src hf_ckpt --tgt evo_ckpt --tp_size 2 --pp_size 2 --embed_split
"""

from __future__ import annotations

import argparse
import sys

from ..cli_types import positive_float, positive_int
from .api import DTYPES, hf_to_internevo, internevo_to_hf


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def _to_hf_arguments(p: argparse.ArgumentParser, family: str | None = None) -> None:
    p.add_argument("--src", required=True, help="InternEvo checkpoint folder (model_tp*_pp*.pt + model_config.pt)")
    p.add_argument("--tgt", required=True, help="output Hugging Face folder (created atomically)")
    p.add_argument("--tokenizer", required=True,
                   help="sentencepiece .model file (converted to tokenizer.json) or a tokenizer folder (copied)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="dtype of the saved weights")
    p.add_argument("--max_shard", default="10GB", help="max size of one safetensors shard (10GB, 500MB, 2GiB)")
    p.add_argument("--max_pos", type=positive_int, default=4096, help="max_position_embeddings (usually the training seq_len)")
    p.add_argument("--rotary_type", default="origin", choices=["origin", "dynamic"],
                   help="origin: plain rotary; dynamic: dynamic NTK scaling beyond --max_pos")
    p.add_argument("--scaling_factor", type=positive_float, default=None,
                   help="dynamic NTK factor (default 1.0 for InternLM, 2.0 for InternLM2)")
    if family is None:
        p.add_argument("--model", choices=["internlm", "internlm2"], default=None,
                       help="model family (default: detected from the tensor names)")
    p.add_argument("--qk_interleaved", type=_bool, default=None,
                   help="true if wq/wk use interleaved rotary (InternEvo qk_interleaved=True / adapt_hf=False); "
                        "default: read from model_config.pt")
    p.add_argument("--version", type=int, choices=[1, 2], default=None,
                   help="InternLM only: 1 if w3 is the down projection, 2 if w2 is (default: told from shapes)")
    p.add_argument("--overwrite", action="store_true", help="replace a --tgt that already holds a model")
    p.add_argument("--verify", action="store_true",
                   help="load the result and compare its logits with the InternEvo shards on a few tokens")
    p.set_defaults(direction="internevo-to-hf", model=family)


def _to_internevo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, help="Hugging Face folder (config.json + safetensors or .bin)")
    p.add_argument("--tgt", required=True, help="output InternEvo folder (created atomically)")
    p.add_argument("--tp_size", type=positive_int, default=1, help="tensor-parallel size of the output")
    p.add_argument("--pp_size", type=positive_int, default=1, help="pipeline stages of the output (InternEvo's partition)")
    p.add_argument("--embed_split", action="store_true",
                   help="embed_split_hidden: split the embedding on the hidden dim (default: on the vocab)")
    p.add_argument("--use_flash", action="store_true", help="write use_flash_attn=True into model_config.pt")
    p.add_argument("--version", type=int, choices=[1, 2], default=2,
                   help="InternLM only: 1 writes down_proj as w3 and up_proj as w2 (original InternLM); "
                        "2 writes down_proj as w2 (InternEvo's FeedForward, default)")
    p.add_argument("--qk_interleaved", action="store_true",
                   help="permute wq/wk to interleaved rotary (for InternEvo configs with qk_interleaved=True)")
    p.add_argument("--safetensors", action="store_true", help="require safetensors weights (default: safetensors "
                                                               "if present, else pytorch_model*.bin)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace a --tgt that already holds a model")
    p.add_argument("--verify", action="store_true",
                   help="compare the source model's logits with the written shards' on a few tokens")
    p.set_defaults(direction="hf-to-internevo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True)
    _to_hf_arguments(sub.add_parser("internevo-to-hf", help="InternEvo checkpoint -> Hugging Face folder"))
    _to_internevo_arguments(sub.add_parser("hf-to-internevo", help="Hugging Face folder -> InternEvo checkpoint"))


def run(args: argparse.Namespace) -> int:
    try:
        if args.direction == "internevo-to-hf":
            summary = internevo_to_hf(
                args.src, args.tgt, args.tokenizer, model=args.model, dtype=args.dtype, max_shard=args.max_shard,
                max_pos=args.max_pos, rotary_type=args.rotary_type, scaling_factor=args.scaling_factor,
                qk_interleaved=args.qk_interleaved, version=args.version, overwrite=args.overwrite,
                verify=args.verify)
        else:
            summary = hf_to_internevo(
                args.src, args.tgt, tp_size=args.tp_size, pp_size=args.pp_size, embed_split=args.embed_split,
                use_flash=args.use_flash, version=args.version, qk_interleaved=args.qk_interleaved,
                safetensors=args.safetensors, dtype=args.dtype, overwrite=args.overwrite, verify=args.verify)
    except ValueError as exc:
        print(f"seqpack convert: error: {exc}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def _script(prog: str, family: str | None, to_hf: bool, argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    if to_hf:
        _to_hf_arguments(parser, family)
    else:
        _to_internevo_arguments(parser)
    return run(parser.parse_args(argv))


def convert2hf_internlm(argv: list[str] | None = None) -> int:
    return _script("convert2hf_internlm", "internlm", True, argv)


def convert2hf_internlm2(argv: list[str] | None = None) -> int:
    return _script("convert2hf_internlm2", "internlm2", True, argv)


def revert_internlm(argv: list[str] | None = None) -> int:
    return _script("revert_internlm", None, False, argv)


def revert_internlm2(argv: list[str] | None = None) -> int:
    return _script("revert_internlm2", None, False, argv)
