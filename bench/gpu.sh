#!/usr/bin/env bash
# The extraction benchmark on a GPU machine, in one short run (UNTESTED: no GPU was lent to the
# task that wrote it). Needs the repository's dependencies installed (pip install -e '.[gpu]')
# and ../shared (weights + CIFAR-10 JPEGs). Writes bench/results/gpu.json and gpu.md.
#
#   bench/gpu.sh                      # MobileNet a=0.25 at 128 px, 20k images, batches 256 and 1024
#   bench/gpu.sh --backbone vgg16     # random-weight VGG16 at 224 px
set -euo pipefail
cd "$(dirname "$0")"
nvidia-smi -L || { echo "bench/gpu.sh: no NVIDIA GPU visible" >&2; exit 1; }
export TF_CPP_MIN_LOG_LEVEL=2
export TF_GPU_THREAD_MODE=gpu_private   # keep the GPU's launch threads off the decoding cores
timeout 540 python gpu_extraction.py --workers "$(nproc)" "$@"
