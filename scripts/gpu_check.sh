#!/usr/bin/env bash
# GPU readiness: every task's ci config on CUDA in bf16 + channels_last + torch.compile, one epoch of the ECG
# hannun config, the speed table against torchvision on the GPU and a one-process NCCL DDP run; writes
# results/gpu.md with the device's name. Without CUDA it says so, checks that each step would start, and exits 0.
# Usage: bash scripts/gpu_check.sh [--dry-run] [--data-dir DIR] [--results DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
exec "$py" -m cnnapps.bench.gpu "$@"
