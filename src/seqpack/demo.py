"""``seqpack demo``: packed training of a tiny Llama built from a config, on the embedded corpus (the running
interpreter's standard-library sources, tokenized by a BPE trained locally). Prints loss and tokens/s.

Everything runs on the CPU in a minute or two; nothing is downloaded.
"""

from __future__ import annotations

import time

from .cli_types import positive_float, positive_int


def add_arguments(parser):
    parser.add_argument("--steps", type=positive_int, default=60, help="optimizer steps")
    parser.add_argument("--seq_len", type=positive_int, default=1024, help="tokens per packed row")
    parser.add_argument("--hidden", type=positive_int, default=128, help="hidden size of the tiny Llama")
    parser.add_argument("--layers", type=positive_int, default=2, help="number of layers")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model initialisation")


def run(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import seqpack
    from seqpack.data import build_packed_loader
    from seqpack.data.corpus import default_tokenizer

    torch.manual_seed(args.seed)
    tokenizer = default_tokenizer()
    cfg = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32), num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq_len, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack")
    loader = build_packed_loader(seq_len=args.seq_len, packing="cut", tokenizer=tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny llama: {n_params / 1e6:.2f}M parameters, rows of {args.seq_len} tokens, attn_implementation=seqpack")
    tokens, start = 0, time.perf_counter()
    for step, micro_batches in zip(range(1, args.steps + 1), loader):
        for batch in micro_batches:
            loss = seqpack.causal_lm_loss(model(**batch.model_inputs()).logits, batch) / len(micro_batches)
            loss.backward()
            tokens += batch.num_tokens
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == args.steps:
            docs = len(batch.cu_seqlens) - 1
            print(f"step {step:4d}  loss {loss.item() * len(micro_batches):.3f}  docs/row {docs:3d}  "
                  f"{tokens / (time.perf_counter() - start):7.0f} tokens/s", flush=True)
    return 0
