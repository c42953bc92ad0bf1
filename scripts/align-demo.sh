#!/usr/bin/env bash
# The object_count AlignProp demo on the embedded default model: prompt following measured by
# the analytic evaluator on held-out captions and seeds, before and after a short /align-style
# run (the same code as the server's jobs, offline; it keeps its best state on 32 validation
# images of the training captions). Writes adapters/counts.safetensors (+ .json) and
# docs/images/align-{before,after}.png; prints the evaluator's figures (IMAGES=512 for the
# README's).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${SDSERVE_BIN:-target/release/sdserve}
steps=${STEPS:-40}
images=${IMAGES:-64}
mkdir -p docs/images adapters
[ -x "$bin" ] || cargo build --release --bin sdserve

# DDIM 10 is the sampler the run trains through; 20 is the evaluator's default. The grids
# show the first 64 captions at DDIM 10.
evaluate() {
  "$bin" evaluate --images "$images" --steps 10 "$@"
  "$bin" evaluate --images "$images" "$@"
}
echo "== before (DDIM 10, then 20)"
evaluate
"$bin" evaluate --images 64 --steps 10 --grid docs/images/align-before.png > /dev/null
echo "== align (object_count, $steps steps)"
time "$bin" align --name counts --adapters-dir adapters --overwrite --prompt-set shapes \
  --reward object_count --steps "$steps" --batch-size 2 --learning-rate 1e-3 \
  --sampler-steps 10 --k 10 --guidance-scale 7.5 --validate 32,10 --seed 3
echo "== after (DDIM 10, then 20)"
evaluate --lora adapters/counts.safetensors
"$bin" evaluate --images 64 --steps 10 --lora adapters/counts.safetensors --grid docs/images/align-after.png > /dev/null
