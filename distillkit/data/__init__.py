"""Data for distillation: read files, directories or hub datasets; tokenise, pack and split; an embedded corpus.

``import distillkit.data`` is light: torch, ``datasets`` and ``transformers`` are imported inside the functions that
need them.
"""

from __future__ import annotations

from distillkit.data.corpus import CORPUS_DESCRIPTION, load_corpus
from distillkit.data.prepare import (
    TASKS,
    ImageClassificationDataset,
    PackedDataset,
    PreparedData,
    TokenizedDataset,
    detect_image_column,
    detect_label_column,
    detect_text_column,
    encode_labels,
    pack_blocks,
    prepare_data,
    split_indices,
    stack_collate,
    text_tokenizer,
    tokenize_stream,
)
from distillkit.data.sources import EMBEDDED_SOURCE, SUPPORTED_EXTENSIONS, DataSpec, RawData, read_dataset, read_raw

__all__ = [
    "CORPUS_DESCRIPTION",
    "EMBEDDED_SOURCE",
    "SUPPORTED_EXTENSIONS",
    "TASKS",
    "DataSpec",
    "ImageClassificationDataset",
    "PackedDataset",
    "PreparedData",
    "RawData",
    "TokenizedDataset",
    "detect_image_column",
    "detect_label_column",
    "detect_text_column",
    "encode_labels",
    "load_corpus",
    "pack_blocks",
    "prepare_data",
    "read_dataset",
    "read_raw",
    "split_indices",
    "stack_collate",
    "text_tokenizer",
    "tokenize_stream",
]
