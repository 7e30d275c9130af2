#!/usr/bin/env bash
# The GPU throughput check and the hot-swap memory check, sized for one device run (about 7 to
# 9.5 minutes on an H100/H200: throughput 6 to 8, swap memory 1 to 1.5):
#   here:    bash bench/gpu-wheels.sh
#   device:  run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
# Results land in $OUT (the device tool brings them back); copy them to bench/results/.
# SHAPE, CONCURRENCY, ITEMS, BUDGET and DEVICE override the defaults; SWAP_SHAPE and
# SWAP_CYCLES those of the swap step (SWAP_CYCLES=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# The project itself runs from the source tree (no install step on the device).
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
"${PYTHON:-python3}" bench/throughput.py \
  --device "${DEVICE:-cuda}" --shape "${SHAPE:-llama-8b}" \
  --concurrency ${CONCURRENCY:-256} --items "${ITEMS:-1024}" \
  --max-batch-tokens "${BUDGET:-65536}" --out "$out/throughput-${SHAPE:-llama-8b}.json"
# CUDA allocated/reserved and RSS after each load/activate/unload cycle of a real service;
# written as swap-memory-<card>.json.
if [ "${SWAP_CYCLES:-10}" -gt 0 ]; then
  "${PYTHON:-python3}" bench/swap_memory.py \
    --device "${DEVICE:-cuda}" --shape "${SWAP_SHAPE:-llama-1b}" --cycles "${SWAP_CYCLES:-10}" \
    --max-batch-tokens "${BUDGET:-65536}" --out-dir "$out"
fi
