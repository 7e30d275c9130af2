#!/usr/bin/env bash
# The prepared device run: each step fits one device command (600 s) on an H100/H200, not all
# of them together, so STEPS picks them (default "grpo"):
#   grpo        prompt-prefix reuse on a GRPO-shaped workload, a 1B then an 8B llama
#               (bench/throughput.py --workload grpo: bare, bare-reuse, crs, crs-reuse;
#               about 6 to 8 minutes; the 8B step is cut at GRPO_8B_TIMEOUT s, 1B results kept)
#   throughput  the PPO-shaped throughput check (about 6 to 8 minutes)
#   swap        the hot-swap memory check (about 1 to 1.5 minutes)
#   here:    bash bench/gpu-wheels.sh
#   device:  run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
#            run(command="STEPS='throughput swap' bash bench/gpu.sh", carry=[".whl"], ...)
# Results land in $OUT (the device tool brings them back); copy them to bench/results/.
# SHAPE, CONCURRENCY, ITEMS, BUDGET and DEVICE override the throughput step's defaults;
# GRPO_PROMPTS_1B, GRPO_PROMPTS_8B, GRPO_COMPLETIONS, GRPO_CONCURRENCY and GRPO_PASSES the
# grpo step's; SWAP_SHAPE and SWAP_CYCLES those of the swap step.
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
steps=" ${STEPS:-grpo} "
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

status=0
failed() {  # step, exit status
  echo "$1 did not finish (exit $2)" >&2
  status=$2
}

grpo() {  # shape, prompts, then an optional command to run it under (timeout ...)
  local shape="$1" prompts="$2"
  shift 2
  "$@" "${PYTHON:-python3}" bench/throughput.py --workload grpo \
    --device "${DEVICE:-cuda}" --shape "$shape" --prompts "$prompts" \
    --completions "${GRPO_COMPLETIONS:-8}" --concurrency ${GRPO_CONCURRENCY:-64} \
    --passes "${GRPO_PASSES:-3}" --max-batch-tokens "${BUDGET:-65536}" \
    --out "$out/throughput-grpo-$shape.json"
}

if [[ "$steps" == *" grpo "* ]]; then
  # Four copies of the model at once (two in process, two servers): 64 GB for the 8B in bf16.
  # A failed shape does not stop the other; the script's exit status still says so.
  grpo llama-1b "${GRPO_PROMPTS_1B:-64}" || failed "grpo llama-1b" $?
  # On SIGTERM the benchmark stops the servers it started on its way out.
  grpo llama-8b "${GRPO_PROMPTS_8B:-32}" timeout -k 30 "${GRPO_8B_TIMEOUT:-330}" \
    || failed "grpo llama-8b" $?
fi
if [[ "$steps" == *" throughput "* ]]; then
  "${PYTHON:-python3}" bench/throughput.py \
    --device "${DEVICE:-cuda}" --shape "${SHAPE:-llama-8b}" \
    --concurrency ${CONCURRENCY:-256} --items "${ITEMS:-1024}" \
    --max-batch-tokens "${BUDGET:-65536}" --out "$out/throughput-${SHAPE:-llama-8b}.json"
fi
# CUDA allocated/reserved and RSS after each load/activate/unload cycle of a real service;
# written as swap-memory-<card>.json.
if [[ "$steps" == *" swap "* ]] && [ "${SWAP_CYCLES:-10}" -gt 0 ]; then
  "${PYTHON:-python3}" bench/swap_memory.py \
    --device "${DEVICE:-cuda}" --shape "${SWAP_SHAPE:-llama-1b}" --cycles "${SWAP_CYCLES:-10}" \
    --max-batch-tokens "${BUDGET:-65536}" --out-dir "$out"
fi
exit "$status"
