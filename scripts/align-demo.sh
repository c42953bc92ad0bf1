#!/usr/bin/env bash
# The object_count AlignProp demo on the embedded default model: prompt following measured by
# the analytic evaluator on held-out captions and seeds, before and after a short /align-style
# run (the same code as the server's jobs, offline). Writes adapters/counts.safetensors (+ .json)
# and docs/images/align-{before,after}.png; prints the evaluator's figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${SDSERVE_BIN:-target/release/sdserve}
steps=${STEPS:-40}
images=${IMAGES:-64}
mkdir -p docs/images adapters
[ -x "$bin" ] || cargo build --release --bin sdserve

echo "== before (DDIM 20 steps; then 10, the sampler the run trains through)"
"$bin" evaluate --images "$images" --grid docs/images/align-before.png
"$bin" evaluate --images "$images" --steps 10
echo "== align (object_count, $steps steps)"
time "$bin" align --name counts --adapters-dir adapters --overwrite --prompt-set shapes \
  --reward object_count --steps "$steps" --batch-size 2 --learning-rate 1e-3 \
  --sampler-steps 10 --k 10 --guidance-scale 7.5 --seed 3
echo "== after (DDIM 20 steps, then 10)"
"$bin" evaluate --images "$images" --lora adapters/counts.safetensors --grid docs/images/align-after.png
"$bin" evaluate --images "$images" --steps 10 --lora adapters/counts.safetensors
