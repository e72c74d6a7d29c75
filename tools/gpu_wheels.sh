#!/usr/bin/env bash
# Download, on a machine with pip access, the wheels the GPU image lacks (its python 3.12 has torch 2.11 and
# transformers 5.17; seqpack needs transformers >= 5.23, and the fused-kernel tests liger-kernel) into .whl/, which
# the device tool carries (`carry: [".whl"]`) and tools/gpu_check.sh installs. .whl/ is kept out of git.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "transformers==5.24.0" "liger-kernel==0.8.5"
ls -la .whl
