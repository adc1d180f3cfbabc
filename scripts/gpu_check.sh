#!/usr/bin/env bash
# The figures only a GPU can give, for the README's "GPU figures" section. Run it on a CUDA
# machine after `bash scripts/install.sh` (a CUDA torch already installed is kept); nothing in it
# is part of CI. Everything is printed; redirect to a file to keep it:
#
#   bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import torch
assert torch.cuda.is_available(), "scripts/gpu_check.sh needs a CUDA device"
print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB,",
      "torch", torch.__version__)
PY

echo "== the GPU tests (CUDA-only bitsandbytes kernels, device placement)"
python -m pytest -q -m gpu

echo "== optimizer step and state, LLaMA-60M, fp32 and bf16 weights (CUDA events)"
python scripts/bench_optim.py --device cuda --dtype fp32 --size 60m
python scripts/bench_optim.py --device cuda --dtype bf16 --size 60m
echo "== LLaMA-1B, bf16"
python scripts/bench_optim.py --device cuda --dtype bf16 --size 1b \
    --methods adamw adamw-fused galore-torch galore galore-8bit apollo apollo-mini q-galore

echo "== refresh without the spike, LLaMA-1B bf16: GaLore against galore-torch in one run, the guard's share"
python scripts/bench_optim.py --device cuda --dtype bf16 --size 1b --interleave \
    --methods galore-torch galore galore-unguarded --steps 15
echo "== a full refresh cycle at 1B: worst step, amortized refresh (svd, rsvd, svd-warm; staggered or not)"
python scripts/bench_optim.py --device cuda --dtype bf16 --size 1b --cycle

echo "== how cost grows with size and rank"
python scripts/bench_scaling.py --device cuda --out bench/scaling-cuda

echo "== layer-wise peak memory (torch.cuda.max_memory_allocated)"
python scripts/measure_layerwise_memory.py --device cuda --hidden 1024 --layers 8 --vocab-size 32000 --seq 512

echo "== LLaMA-7B layer-wise: measured peak against the estimate (papers: 8-bit GaLore < 24 GB, Q-GaLore < 16 GB)"
python scripts/measure_7b_peak.py --methods galore-8bit q-galore --seq 256
python scripts/estimate_memory.py --size 7b --methods galore-8bit-layerwise q-galore-layerwise
