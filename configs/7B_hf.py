# InternEvo's configs/7B_hf.py (seeds/002: "train a Hugging Face format model"), adapted to seqpack:
#   * the model is a LOCAL Hugging Face folder (nothing downloads): MODEL_ONLY_FOLDER below;
#   * the data is a LOCAL tokenized (ftdp) folder, e.g. made from TinyStories with
#       seqpack tokenize TinyStories.jsonl --tokenizer $MODEL_ONLY_FOLDER --out data/tinystories
#   * parallel.tensor mode "isp" is sequence parallel (size S); ZeRO is FSDP2 over all ranks.
# Launch:  seqpack train configs/7B_hf.py --nproc 8      (or torchrun -m seqpack.cli train configs/7B_hf.py)
# Keys InternEvo has but seqpack does not need (alerts, async upload, grad_scaler, ...) are accepted and reported
# as ignored in one warning, so an InternEvo config needs only the two paths changed.
JOB_NAME = "7b_train"
model_type = "INTERNLM_FROM_HF"  # *_FROM_HF: the architecture comes from the folder's config.json (any family)
DO_ALERT = False

SEQ_LEN = 2048
MODEL_ONLY_FOLDER = "/models/internlm-7b"  # local folder: config.json + weights (+ tokenizer)
SAVE_CKPT_FOLDER = "local:llm_ckpts"
CHECKPOINT_EVERY = 100

ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    # initial weights: the HF folder ("hf_model"); optimizer/scheduler/data state resume via auto_resume
    load_ckpt_info=dict(path=MODEL_ONLY_FOLDER, content=("model",), ckpt_type="hf_model"),
    auto_resume=True,  # restart after a crash from the latest COMPLETE checkpoint in save_ckpt_folder
    checkpoint_every=CHECKPOINT_EVERY,
    async_upload=True,  # InternEvo option (boto3 only): ignored
    async_upload_tmp_folder="/dev/shm/internlm_tmp_ckpt/",
    oss_snapshot_freq=int(CHECKPOINT_EVERY / 2),
)

TRAIN_FOLDER = "data/tinystories"  # local ftdp folder (InternEvo's example streamed roneneldan/TinyStories)
data = dict(
    type="tokenized",
    tokenizer_path=MODEL_ONLY_FOLDER,
    seq_len=SEQ_LEN,
    micro_num=4,  # micro-batches per optimizer step
    micro_bsz=2,  # packed row = micro_bsz * seq_len tokens
    valid_micro_num=4,
    valid_every=0,
    pack_sample_into_one=False,
    total_steps=50000,
    skip_batches="",
    rampup_batch_size="",
    min_length=50,  # drop documents shorter than 50 tokens
    train_folder=TRAIN_FOLDER,
    valid_folder=None,
    empty_cache_and_diag_interval=200,
    diag_outlier_ratio=1.1,
    use_packed_dataset=True,  # packed varlen rows (False = one document per row, padded)
    use_shm=False,
)

grad_scaler = dict(fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000), growth_factor=2,
                   backoff_factor=0.5, max_scale=2**24, hysteresis=2)

hybrid_zero_optimizer = dict(overlap_sync_grad=True, overlap_sync_param=False, reduce_bucket_size=512 * 1024 * 1024,
                             clip_grad_norm=1.0)

loss = dict(label_smoothing=0)

adam = dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)

lr_scheduler = dict(total_steps=data["total_steps"], init_steps=0, warmup_ratio=0.01, eta_min=1e-5, last_epoch=-1)

beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)

use_fp32_norm = False
model = dict(
    checkpoint=True,  # activation checkpointing: True/False or the fraction of layers
    dtype="torch.bfloat16",  # bf16 autocast on CUDA over fp32 master weights
    use_flash_attn=True,  # seqpack picks flash-attn varlen automatically when installed
    num_chunks=1,
    # InternLM / InternLM2 / Baichuan2 folders load into seqpack's native classes (no trust_remote_code needed)
)

# zero1 (-1: shard over all ranks) and weight parallel both map onto FSDP2 over every rank (dp x sp flattened);
# tensor mode "isp" with size S = Ulysses/ISP sequence parallel; pipeline parallel is not supported (size 1).
parallel = dict(
    zero1=dict(size=-1),
    tensor=dict(size=1, mode="isp"),
    pipeline=dict(size=1, interleaved_overlap=True),
    weight=dict(size=1, overlap=True, memory_pool=True),
)

cudnn_deterministic = False
cudnn_benchmark = False

monitor = dict(alert=dict(enable_feishu_alert=DO_ALERT, feishu_alert_address=None, light_monitor_address=None))
