#!/bin/bash
# One device call: relay vs vanilla SGLang serving benchmark for one model (see run_serving.py).
# Run from the repository root with .device carried (site312.tar.xz):
#   bash bench/serving/run_serving.sh --model llama2-7b-mha --workloads core
#   bash bench/serving/run_serving.sh --model llama3-8b-gqa --workloads more --dry-run
# Results under $OUT (default ./out): results.json, summary.md, logs.tar.gz.
T0=$(date +%s)
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1
exec python3 bench/serving/run_serving.py --t0 "$T0" "$@"
