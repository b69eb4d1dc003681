#!/usr/bin/env bash
# On the lent GPU machine (no network): install the carried wheels (.wheels/) beside its torch.
# llmc's own needs go to /root/site, llm-compressor's to /root/peer (it pins other versions).
set -euo pipefail
if [ ! -d /root/site/pydantic ]; then
  python3 -m pip install -q --no-index --no-deps --target /root/site \
    .wheels/pydantic-*.whl .wheels/pydantic_core-*.whl .wheels/annotated_types-*.whl \
    .wheels/typing_inspection-*.whl .wheels/typing_extensions-*.whl .wheels/gguf-*.whl \
    .wheels/pytest-*.whl .wheels/pluggy-*.whl .wheels/iniconfig-*.whl
  python3 -m pip install -q --no-index --no-deps --target /root/peer \
    .wheels/llmcompressor-*.whl .wheels/compressed_tensors-*.whl .wheels/datasets-*.whl .wheels/dill-*.whl \
    .wheels/multiprocess-*.whl .wheels/loguru-*.whl .wheels/auto_round-*.whl
fi
# lm-evaluation-harness for eval.tasks (benchmarks/downstream.py): of its requirements only these are missing
# there and imported on llmc's path (evaluate, pytablewriter, rouge-score, sqlitedict, word2number, more-itertools
# are not; sacrebleu, pandas, httpx, xxhash are in the image); datasets, dill and multiprocess at the peer's
# versions, so both paths agree. Installed in whichever call carries .wheels (the lm-eval wheel alone is 8.7 MiB,
# so .wheels travels in a call of its own: see device_run.sh).
if [ ! -d /root/site/lm_eval ] && ls .wheels/lm_eval-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /root/site \
    .wheels/lm_eval-*.whl .wheels/datasets-*.whl .wheels/dill-*.whl .wheels/multiprocess-*.whl
fi
