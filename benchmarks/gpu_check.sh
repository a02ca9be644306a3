#!/usr/bin/env bash
# One prepared GPU check: first the CUDA tests (goldens through the CUDA graph, eager and with the compiled
# flow head, fp8, int4, layer streaming), then the `full` preset (NextStep-14B dimensions, random weights) at
# 512x512, 28 steps, cfg 7.5, sampler sde, in bf16, with fp8 and with int4 decoder weights; one JSON line
# each, timing the compiled head against the eager one (interleaved) and reporting the compile time.
# Needs a CUDA GPU with about 40 GB free; finishes in under ten minutes (each part is capped).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, transformers, safetensors, einops, PIL" 2>/dev/null \
  || python3 -m pip install --quiet transformers safetensors einops pillow
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())"
timeout 180 python3 -m pytest -q tests/test_cuda.py || echo "CUDA TESTS FAILED (benchmarks follow anyway)"
common=(--preset full --height 512 --width 512 --steps 28 --cfg 7.5 --sampler sde --device cuda --dtype bfloat16 --repeat 1)
timeout 200 python3 benchmarks/bench_generate.py "${common[@]}"
timeout 200 python3 benchmarks/bench_generate.py "${common[@]}" --fp8
timeout 200 python3 benchmarks/bench_generate.py "${common[@]}" --int4
