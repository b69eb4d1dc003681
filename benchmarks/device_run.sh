#!/usr/bin/env bash
# On the lent GPU machine (see benchmarks/README or the README's benchmarks section):
#   bash benchmarks/device_run.sh speed [speed.py args...]      # results to $OUT
#   bash benchmarks/device_run.sh accuracy [accuracy.py args...] # needs .carry/gguf.part00 and part01
#        (part00 with .wheels in a first call, part01 in the next: each call carries at most 64 MiB)
#   bash benchmarks/device_run.sh cuda-tests
# Installs the carried wheels (.wheels/) first; llm-compressor goes on the same path (it runs in
# a subprocess of the benchmarks).
set -uo pipefail
bash benchmarks/device_setup.sh || exit 1
export PYTHONPATH=/root/site:/root/peer:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
# The SmolLM2 GGUF travels in two parts (each call carries at most 64 MiB): keep each part
# outside the working tree, which the next call's sync replaces.
mkdir -p /root/gguf && cp .carry/gguf.part* /root/gguf/ 2>/dev/null
stage=$1
shift
case "$stage" in
  speed)
    python3 benchmarks/speed.py "$@"
    ;;
  accuracy)
    dir=$HOME/.cache/llmc/models/smollm2-135m-instruct
    mkdir -p "$dir"
    if [ ! -f "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
      cat /root/gguf/gguf.part00 /root/gguf/gguf.part01 > "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" || exit 1
    fi
    python3 -m llmc fetch >/dev/null || exit 1   # verifies the sha256
    # Stop before the call's limit so that the rows written so far still come back.
    timeout "${ACCURACY_TIMEOUT:-540}" python3 benchmarks/accuracy.py --peer-python python3 --resume "$@"
    cp benchmarks/results/accuracy_smollm2*.json benchmarks/results/accuracy_smollm2*.md "$OUT"/  # --table main and rotations
    ;;
  cuda-tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_gptq.py "$@" 2>&1 | tee "$OUT/cuda_tests.log"
    ;;
esac
