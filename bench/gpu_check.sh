#!/usr/bin/env bash
# The GPU check in one short script (a session with a CUDA machine runs this once):
# bf16, GPT-2-small shape with every suite and the anchors, then GPT-2-medium shape with the
# suites whose targets name it. --quick keeps each under a few minutes on an H100; a suite that
# fails is recorded in results.json and the others go on. Results go under $OUT (or
# bench/results/) in gpu-small/ and gpu-medium/.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
python="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
timeout 330 "$python" -m bench --device cuda --dtype bfloat16 --size small --quick --anchors --out "$out/gpu-small"
timeout 240 "$python" -m bench --device cuda --dtype bfloat16 --size medium --quick --out "$out/gpu-medium" \
    --suite forward --suite cache --suite compile --suite optimizer --suite grads --suite patching
for size in small medium; do
    [ -f "$out/gpu-$size/results.md" ] && sed -n '/^## Targets/,/^Chart\|^No chart/p' "$out/gpu-$size/results.md"
done
