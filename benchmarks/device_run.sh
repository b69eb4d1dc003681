#!/usr/bin/env bash
# On the lent GPU machine (see benchmarks/README or the README's benchmarks section):
#   bash benchmarks/device_run.sh speed [speed.py args...]      # results to $OUT
#   bash benchmarks/device_run.sh accuracy [accuracy.py args...] # needs .carry/gguf.part00 and part01
#        (each call carries at most 64 MiB, working tree included: [.wheels] -> setup, then
#        [.carry/gguf.part00] -> setup, then [.carry/gguf.part01] -> accuracy, on the warm machine)
#   bash benchmarks/device_run.sh cuda-tests
#   bash benchmarks/device_run.sh setup          # installs what .wheels carries, keeps .carry's GGUF part
#   bash benchmarks/device_run.sh downstream [downstream.py args...]   # issue 16; results as $OUT/downstream.tar
#        (.wheels is too big to travel beside a GGUF part: three calls on the warm machine, carrying
#        [.wheels] -> setup, [.carry/gguf.part00] -> setup, [.carry/gguf.part01] -> downstream;
#        untar downstream.tar in the repo root: a later call's --resume reads the rows from the tree)
#   bash benchmarks/device_run.sh scale [scale.py args...]   # issue 17 (rows dp,peer,host,disk,diskdp); carry [.wheels]; rows written as they
#        finish, the call stops starting rows after SCALE_BUDGET s (default 500); run it again on the warm
#        machine to go on (--resume: the rows and models of the earlier calls stay under /root and /tmp)
# Installs the carried wheels (.wheels/) first; llm-compressor goes on the same path (it runs in
# a subprocess of the benchmarks).
set -uo pipefail
bash benchmarks/device_setup.sh || exit 1
export PYTHONPATH=/root/site:/root/peer:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
# The SmolLM2 GGUF travels in two parts (each call carries at most 64 MiB): keep each part
# outside the working tree, which the next call's sync replaces.
mkdir -p /root/gguf && cp .carry/gguf.part* /root/gguf/ 2>/dev/null
smollm2() {
  local file=$HOME/.cache/llmc/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$(dirname "$file")"
  if [ ! -f "$file" ]; then  # via a temporary name: a missing part leaves no truncated model behind
    cat /root/gguf/gguf.part00 /root/gguf/gguf.part01 > "$file.tmp" && mv "$file.tmp" "$file" || return 1
  fi
  python3 -m llmc fetch >/dev/null   # verifies the sha256
}
stage=$1
shift
case "$stage" in
  setup)
    ls -l /root/gguf
    python3 -c "import pydantic, lm_eval, datasets; print('pydantic', pydantic.VERSION, 'lm_eval', lm_eval.__version__, 'datasets', datasets.__version__)"
    ;;
  speed)
    python3 benchmarks/speed.py "$@"
    ;;
  accuracy)
    smollm2 || exit 1
    # Stop before the call's limit so that the rows written so far still come back.
    timeout "${ACCURACY_TIMEOUT:-540}" python3 benchmarks/accuracy.py --peer-python python3 --resume "$@"
    cp benchmarks/results/accuracy_smollm2*.json benchmarks/results/accuracy_smollm2*.md "$OUT"/  # --table main and rotations
    ;;
  downstream)
    smollm2 || exit 1
    res=benchmarks/results
    # rows of an earlier call on this machine when the tree does not bring them (--resume continues them)
    [ -f $res/downstream_smollm2.json ] || [ ! -f /root/downstream.tar ] || tar xf /root/downstream.tar
    timeout "${DOWNSTREAM_TIMEOUT:-540}" python3 benchmarks/downstream.py --resume "$@"
    rc=$?
    tar cf "$OUT/downstream.tar" $(ls -d $res/downstream_smollm2.json $res/downstream_smollm2.md \
      $res/downstream_report $res/downstream_runs/*/results.json 2>/dev/null) && cp "$OUT/downstream.tar" /root/
    exit $rc
    ;;
  scale)
    mkdir -p /root/scale_results
    cp -n /root/scale_results/scale_* benchmarks/results/ 2>/dev/null  # rows of an earlier call on this machine
    timeout "${SCALE_TIMEOUT:-570}" python3 benchmarks/scale.py --resume --budget-s "${SCALE_BUDGET:-500}" "$@"
    rc=$?
    cp benchmarks/results/scale_*.json benchmarks/results/scale_*.md /root/scale_results/ 2>/dev/null
    cp /root/scale_results/scale_* "$OUT"/
    exit $rc
    ;;
  cuda-tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_gptq.py "$@" 2>&1 | tee "$OUT/cuda_tests.log"
    ;;
esac
