#!/bin/bash
# ember serve (10m) loaded by ember's load generator, then by `vllm bench serve`, same workload.
set -eu
cd /work/main
export EMBER_CACHE_DIR=/work/cache/ember TMPDIR=/work/cache/tmp TOKENIZERS_PARALLELISM=false
OUT=/work/cache/results/serve/crosscheck
M=/work/cache/ember/models/bench-llama-10m-bf16-v1
PORT=18431
setsid .venv/bin/ember serve --model $M --dtype bfloat16 --max-model-len 1024 \
  --kv-cache-memory $((4<<30)) --max-num-seqs 128 --max-num-batched-tokens 2048 --num-threads 2 \
  --served-model-name bench --port $PORT > $OUT/ember-serve.log 2>&1 &
SPID=$!
trap 'kill -TERM -- -$SPID 2>/dev/null; wait $SPID' EXIT
until curl -sf http://127.0.0.1:$PORT/health >/dev/null; do sleep 0.5; done
COMMON="--num-prompts 128 --max-concurrency 16"
# warm-up
.venv/bin/ember bench serve --url http://127.0.0.1:$PORT --model bench --num-prompts 8 --input-len 64 --output-len 16 --ignore-eos --tokenizer $M > /dev/null
for i in 1 2; do
.venv/bin/ember bench serve --url http://127.0.0.1:$PORT --model bench --endpoint chat --dataset random \
  --input-len 256 --output-len 128 --range-ratio 0.5 --ignore-eos --tokenizer $M $COMMON \
  --output $OUT/ember-loadgen-$i.json | tail -8
/work/venvs/vllm/bin/vllm bench serve --backend openai-chat --endpoint /v1/chat/completions \
  --base-url http://127.0.0.1:$PORT --model bench --tokenizer $M --dataset-name random \
  --random-input-len 256 --random-output-len 128 --random-range-ratio 0.5 --ignore-eos $COMMON \
  --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 \
  --save-result --result-dir $OUT --result-filename vllm-bench-$i.json --seed 0 2>&1 | grep -vE "^\s*$|Warning|warn" | tail -40
done
