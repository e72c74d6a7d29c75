# The embedded Flux job (`seqpack train configs/flux_demo.py`, or `seqpack train --model_type flux`): a small
# diffusers FluxTransformer2DModel trained from scratch with rectified flow on procedurally drawn coloured shapes
# (six classes, a fixed text embedding per class) at a mix of resolutions, in pixel space (4x4 patches), packed
# several images per row. CPU, about 7 minutes; RUN_DIR/samples_step*.png show Euler samples every 500 steps.
model_type = "flux"

data = dict(
    seq_len=512,       # joint (text + image) tokens per packed row
    micro_num=1,       # rows per optimizer step
    micro_bsz=1,
    train_folder=None,  # None = embedded shapes; else a folder of images/latents + cached caption embeddings
)

model = dict(hidden_size=96, num_layers=2, num_attention_heads=2, checkpoint=False)  # head dim 48: rope 8/20/20

diffusion = dict(
    patch_size=4,
    single_layers=2,
    resolutions=((16, 16), (16, 24), (24, 16), (24, 24), (32, 32), (32, 16)),
    timestep_sampling="logit_normal",
    sample_steps=24,
    sample_every=500,
)

parallel = dict(tensor=dict(size=1, mode="isp"))
ckpt = dict(checkpoint_every=100, auto_resume=True)
adam = dict(lr=2e-3, weight_decay=0.0)
lr_scheduler = dict(total_steps=1500, warmup_ratio=0.05, eta_min=1e-4)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
