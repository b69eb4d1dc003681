"""Calibration and evaluation data: readers, bundled copies, preprocessors and eval windows."""

from llmc.data.calibration import PREPROCESSORS, build_calibration, register_preproc
from llmc.data.evaluation import load_eval_text, tokenize_windows
from llmc.data.sources import (
    DATASET_NAMES,
    SUPPORTED_SUFFIXES,
    bundled_path,
    download_documents,
    load_named_documents,
    read_documents,
    wikitext2_test_text_from_raw,
)

__all__ = [
    "DATASET_NAMES",
    "PREPROCESSORS",
    "SUPPORTED_SUFFIXES",
    "build_calibration",
    "bundled_path",
    "download_documents",
    "load_eval_text",
    "load_named_documents",
    "read_documents",
    "register_preproc",
    "tokenize_windows",
    "wikitext2_test_text_from_raw",
]
