#!/usr/bin/env bash
# The object_count AlignProp demo on the embedded default model: prompt following measured by
# the analytic evaluator on held-out captions and seeds, before and after a short /align-style
# run (the same code as the server's jobs, offline). Writes docs/images/align-{before,after}.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${SDSERVE_BIN:-target/release/sdserve}
steps=${STEPS:-40}
images=${IMAGES:-64}
mkdir -p docs/images demo
[ -x "$bin" ] || cargo build --release --bin sdserve

echo "== before"
"$bin" evaluate --images "$images" --grid docs/images/align-before.png | tee demo/before.txt
echo "== align (object_count, $steps steps)"
time "$bin" align --name counts-demo --adapters-dir demo --overwrite --prompt-set shapes \
  --reward object_count --steps "$steps" --batch-size 2 --learning-rate 1e-3 \
  --sampler-steps 10 --guidance-scale 7.5 --seed 1
echo "== after"
"$bin" evaluate --images "$images" --lora demo/counts-demo.safetensors \
  --grid docs/images/align-after.png | tee demo/after.txt
