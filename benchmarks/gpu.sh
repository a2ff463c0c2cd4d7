#!/usr/bin/env bash
# mmjax GPU benchmark on one GPU, under 5 minutes on an H100 (8 mmjax configurations compiled
# with scanned layers, 10 timed steps each, plus timm / open_clip in bf16 autocast):
#   bash benchmarks/gpu.sh            # results in $OUT (default benchmarks/results)
#   SMOKE=1 bash benchmarks/gpu.sh    # tiny models, any backend: checks the script itself
# Needs jax with CUDA, torch with CUDA, timm and open_clip_torch installed; nothing is
# downloaded. Extra arguments go to both runs (e.g. --batch 128, --models vit).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
extra=("$@")
if [[ "${SMOKE:-0}" == "1" ]]; then
  extra+=(--smoke)
else
  python - <<'PY'
import sys
import jax
if jax.default_backend() != "gpu":
    sys.exit(f"benchmarks/gpu.sh: JAX sees no GPU (devices: {jax.devices()}); use SMOKE=1 to check the script")
print("JAX devices:", jax.devices())
PY
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
# JAX must not pre-allocate the GPU: PyTorch runs first, in its own process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python -m benchmarks.gpu --framework torch --out "$out/gpu_torch.json" "${extra[@]}"
python -m benchmarks.gpu --framework mmjax --torch-results "$out/gpu_torch.json" --out "$out/gpu.json" "${extra[@]}"
