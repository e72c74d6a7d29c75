# The embedded default job (`seqpack train` with no CONFIG runs exactly this): a small Llama-architecture model
# trained from scratch on the embedded corpus (the Python standard library's sources, tokenized with a BPE trained
# locally) on CPU in about three minutes. Same shape as an InternEvo config file.
model_type = "llama"

data = dict(
    seq_len=256,                 # tokens per packed sample
    micro_num=2,                 # micro-batches per optimizer step
    micro_bsz=1,                 # packed samples per micro-batch row (row = seq_len * micro_bsz tokens)
    pack_sample_into_one=False,  # "cut" packing, as InternEvo
    train_folder=None,           # None = embedded corpus; else an ftdp folder (seqpack tokenize)
)

model = dict(hidden_size=128, num_layers=4, num_attention_heads=4, mlp_ratio=8 / 3, checkpoint=False)

parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="isp"), pipeline=dict(size=1))

ckpt = dict(checkpoint_every=200, auto_resume=True)

adam = dict(lr=3e-3, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.01)
lr_scheduler = dict(total_steps=1000, warmup_ratio=0.05, eta_min=1e-4)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
