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
