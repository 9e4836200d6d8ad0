#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): CUDA against CPU codes, extraction throughput against
# its limits, the out-of-memory halving, DDP over nccl, fine-tuning throughput; one table,
# exit 1 when a check fails. Without a CUDA GPU: "no CUDA GPU", exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
exec "$python" bench/gpu_check.py "$@"
