#!/usr/bin/env bash
# The GPU checks of seqpack, in one command, for a lent GPU machine with a short time budget (see docs/guides/gpus.md).
#
#   bash tools/gpu_check.sh [main|flex|memory|ring|all]   # main (default): tests + bench packing + a seqpack train run;
#                                                     # memory: seqpack bench longest (TinyLlama shape, everything
#                                                     # on) and seqpack bench offload at 64K tokens;
#                                                     # ring: seqpack bench ring (blockwise ring attention on 4
#                                                     # virtual ranks vs one varlen call, bf16, 64K and 128K)
#
# Writes every log under $OUT (default ./gpu_out): env.txt, pytest.log, bench_16k.log, bench_long.log, train.log,
# flex.log, longest.log, offload.log, ring.log, the JSON results, and a one-line summary per part in summary.txt. Each part has its own time limit,
# so one part that hangs or fails leaves the others' results. Wheels the machine lacks (tools/gpu_wheels.sh
# downloads them into .whl/) are installed into /tmp/site first when .whl/ is there.
#
# Sizes (overridable): the TinyLlama shape at T = 16K (seqpack, sdpa-packed, sdpa-posids) and 64K / 128K
# (seqpack, sdpa-posids: the exact sdpa-packed builds a dense T x T mask, 4 GiB at 64K, and its masked kernel does
# all T^2 work); flex_attention separately, because its first call compiles for minutes. The parts' limits add up to
# under 600 s for `main` and for `flex`, the device tool's limit per command: run each as its own call.
# GPU_CHECK_DRY=1 runs the same commands on the CPU at toy sizes, to check this script without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-main}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 SEQPACK_CACHE="${SEQPACK_CACHE:-/tmp/seqpack_cache}"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed" | tee -a "$OUT/summary.txt"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    DEVICE=cpu; MODEL=tiny; SHORT=512; LONG="1024"; STEPS=1; TRAIN_ARGS=(--model.hidden_size 64 --model.num_layers 2
        --model.num_attention_heads 4 --model.num_kv_attention_heads 2 --data.seq_len 512 --data.max_docs 400)
    LONGEST_ARGS=(--mem 256MiB --hidden 128 --layers 2 --heads 4 --kv-heads 2 --vocab 4096 --granularity 1024
        --max-tokens 65536)
    OFFLOAD_ARGS=(--seq-len 1024 --hidden 64 --layers 2 --heads 4 --kv-heads 2 --vocab 512)
    RING_ARGS=(--T 2048 --heads 4 --kv-heads 2 --head-dim 16)
else
    DEVICE=cuda; MODEL=tinyllama; SHORT="${GPU_CHECK_SHORT:-16384}"; LONG="${GPU_CHECK_LONG:-65536 131072}"
    STEPS="${GPU_CHECK_STEPS:-3}"; TRAIN_ARGS=(--model.hidden_size 2048 --model.num_layers 22
        --model.num_attention_heads 32 --model.num_kv_attention_heads 4 --model.checkpoint True
        --data.seq_len "$SHORT")
    LONGEST_ARGS=(--hidden 2048 --layers 22 --heads 32 --kv-heads 4 --inter 5632 --vocab 32000)
    OFFLOAD_ARGS=(--seq-len 65536 --hidden 2048 --layers 22 --heads 32 --kv-heads 4 --inter 5632 --vocab 32000)
    RING_ARGS=(--T 65536 131072 --heads 32 --kv-heads 8 --head-dim 128)
fi

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, one summary line
    local name="$1" limit="$2"; shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - start)) s" >>"$OUT/summary.txt"
}

{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, transformers, sys; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'gpu', torch.cuda.is_available())"
    "$PY" -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: absent"
    "$PY" -c "import liger_kernel; print('liger_kernel present')" 2>/dev/null || echo "liger_kernel: absent"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import seqpack" 2>>"$OUT/env.txt"; then  # e.g. the image's transformers is older than the floor
    echo "import seqpack failed (see env.txt); run tools/gpu_wheels.sh here and carry .whl" | tee -a "$OUT/summary.txt"
    tail -1 "$OUT/env.txt"
    exit 1
fi

if [ "$PART" = main ] || [ "$PART" = all ]; then
    part pytest 180 "$PY" -m pytest -m cuda -k "not flex" -rs -s -q -p no:cacheprovider \
        tests/test_gpu.py tests/test_chunked_loss.py tests/test_fused_kernels.py
    part bench_16k 150 "$PY" -m seqpack.bench.packing --device "$DEVICE" --model "$MODEL" --lengths $SHORT \
        --methods seqpack sdpa-packed sdpa-posids --steps "$STEPS" --json "$OUT/bench_16k.json"
    part bench_long 180 "$PY" -m seqpack.bench.packing --device "$DEVICE" --model "$MODEL" --lengths $LONG \
        --methods seqpack sdpa-posids --steps "$STEPS" --json "$OUT/bench_long.json"
    part train 80 "$PY" -m seqpack.cli train "${TRAIN_ARGS[@]}" --data.micro_num 1 --lr_scheduler.total_steps 12 \
        --train.log_every 1 --train.tensorboard False --ckpt.enable_save_ckpt False --ckpt.export_hf False \
        --train.run_dir /tmp/gpu_check_run
    cp /tmp/gpu_check_run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
fi
if [ "$PART" = flex ] || [ "$PART" = all ]; then
    part pytest_flex 200 "$PY" -m pytest -m cuda -k flex -rs -s -q -p no:cacheprovider tests/test_gpu.py
    part flex 360 "$PY" -m seqpack.bench.packing --device "$DEVICE" --model "$MODEL" --lengths $SHORT \
        --methods flex-packed flex-posids --steps "$STEPS" --json "$OUT/flex.json"
fi
if [ "$PART" = memory ] || [ "$PART" = all ]; then  # the longest row that trains, TinyLlama shape, everything on
    part longest 400 "$PY" -m seqpack.cli bench longest --device "$DEVICE" "${LONGEST_ARGS[@]}" --checkpoint 1 \
        --tiled-mlp --tiled-attention --offload-checkpoints --offload-optimizer --json
    part offload 150 "$PY" -m seqpack.cli bench offload --device "$DEVICE" "${OFFLOAD_ARGS[@]}" --steps 2 --repeats 1
fi
if [ "$PART" = ring ] || [ "$PART" = all ]; then  # ring attention's blockwise cost, Llama-3-8B's head layout
    part ring 400 "$PY" -m seqpack.cli bench ring --device "$DEVICE" "${RING_ARGS[@]}" --ring 4 --repeats 2
fi
cat "$OUT/summary.txt"
