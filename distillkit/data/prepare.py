"""Turn raw rows into what a training loop eats: tokenised or packed examples, a split, and a collator.

:func:`prepare_data` is the one entry point. Per task:

- ``causal-lm``: every text is tokenised whole (an eos token appended after each document when the tokenizer has
  one), the token streams are concatenated and cut into ``max_length`` blocks; the ragged tail is dropped. Items are
  ``input_ids``/``attention_mask``/``labels`` of shape ``[T]`` with ``labels == input_ids`` (the model shifts).
- ``masked-lm``: texts truncated to ``max_length``; the collator pads per batch and masks 15% of the tokens, leaving
  ``labels`` at -100 everywhere else. It draws from torch's global RNG, which the engine seeds and checkpoints.
- ``feature-extraction``: texts truncated to ``max_length``, padded per batch, no labels.
- ``sequence-classification``: as feature-extraction plus an integer ``labels`` per example when a label column
  exists (strings map to ids in sorted order). Without one, items carry no labels (pure distillation).
- ``image-classification``: images go through the image processor one item at a time (``pixel_values`` ``[3, H, W]``)
  with labels from the folder names or the label column.

The split is made on examples, before packing, from ``spec.seed`` alone, so it is the same on every run.
``token_type_ids`` are never produced: for single-segment inputs they are all zeros, which is every model's default,
and some students (DistilBERT) do not accept them.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from distillkit.data.sources import DataSpec, RawData, read_raw
from distillkit.errors import ConfigError, DataError

TASKS = ("causal-lm", "masked-lm", "feature-extraction", "sequence-classification", "image-classification")
TEXT_COLUMN_PREFERENCE = ("text", "content", "sentence", "document", "prompt", "question")
LABEL_COLUMN_PREFERENCE = ("label", "labels")
IMAGE_COLUMN_PREFERENCE = ("image", "img", "picture", "photo")
MLM_PROBABILITY = 0.15
_TOKENIZE_CHUNK = 1000


@dataclass
class PreparedData:
    """Train and eval sets ready for a ``DataLoader(ds, collate_fn=prepared.collate_fn)``.

    ``train``/``eval`` are map-style datasets; ``collate_fn`` turns a list of their items into a batch dict of
    tensors (``input_ids``/``attention_mask`` ``[B, T]`` and ``labels`` ``[B, T]`` or ``[B]``; or ``pixel_values``
    ``[B, 3, H, W]`` and ``labels`` ``[B]``). ``info`` is JSON-serialisable and goes into the manifest.
    """

    train: Any
    eval: Any
    collate_fn: Callable[[list[dict]], dict]
    num_labels: int | None
    info: dict = field(default_factory=dict)


class PackedDataset:
    """Fixed-length blocks of a token stream. ``blocks`` is ``[N, T]``; an item is three ``[T]`` tensors."""

    def __init__(self, blocks: Any):
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict:
        import torch

        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class TokenizedDataset:
    """Variable-length examples: ``input_ids``/``attention_mask`` lists of length ``<= max_length``.

    ``extra`` holds further per-token lists (``special_tokens_mask`` for masked-lm); ``labels`` one int per example.
    """

    def __init__(self, input_ids: list[list[int]], labels: list[int] | None = None, extra: dict | None = None):
        self.input_ids = input_ids
        self.labels = labels
        self.extra = extra or {}

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.input_ids[i]
        item = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        for key, values in self.extra.items():
            item[key] = values[i]
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


class ImageClassificationDataset:
    """Rows of a ``datasets.Dataset`` with an image column, processed lazily: ``pixel_values`` ``[3, H, W]``."""

    def __init__(self, ds: Any, image_column: str, rows: list[int], labels: list[int] | None, processor: Any):
        # Only the image column is kept so that reading a row decodes nothing else.
        self.ds = ds.select_columns([image_column])
        self.image_column = image_column
        self.rows = rows
        self.labels = labels
        self.processor = processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        image = self.ds[int(self.rows[i])][self.image_column]
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        item = {"pixel_values": pixel_values}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def stack_collate(items: list[dict]) -> dict:
    """Stack equally shaped items: ``{k: [B, ...]}``; int labels become ``[B]``."""
    import torch

    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}


# --- columns -------------------------------------------------------------------------------------------------------


def _is_string_feature(feature: Any) -> bool:
    return type(feature).__name__ == "Value" and getattr(feature, "dtype", None) in ("string", "large_string")


def _is_image_feature(feature: Any) -> bool:
    return type(feature).__name__ == "Image"


def _columns_hint(ds: Any) -> str:
    return ", ".join(f"{name} ({_feature_name(f)})" for name, f in ds.features.items()) or "(none)"


def _feature_name(feature: Any) -> str:
    dtype = getattr(feature, "dtype", None)
    return dtype if isinstance(dtype, str) and type(feature).__name__ == "Value" else type(feature).__name__


def detect_text_column(ds: Any, text_column: str | None = None) -> str:
    """The column holding the text: ``text_column`` if given, else the first of
    :data:`TEXT_COLUMN_PREFERENCE` that holds strings, else the first string column."""
    features = ds.features
    if text_column is not None:
        if text_column not in features:
            raise DataError(
                f"text column {text_column!r} not found; the columns are: {_columns_hint(ds)}",
                hint="pass --text-column with one of those",
            )
        if not _is_string_feature(features[text_column]):
            raise DataError(
                f"column {text_column!r} holds {_feature_name(features[text_column])}, not text",
                hint=f"pass --text-column naming a text column; the columns are: {_columns_hint(ds)}",
            )
        return text_column
    for name in TEXT_COLUMN_PREFERENCE:
        if name in features and _is_string_feature(features[name]):
            return name
    for name, feature in features.items():
        if _is_string_feature(feature):
            return name
    raise DataError(
        f"no text column found; the columns are: {_columns_hint(ds)}",
        hint="pass --text-column, or give data with a string column such as 'text'",
    )


def detect_label_column(ds: Any, label_column: str | None = None) -> str | None:
    """``label_column`` if given (it must exist), else ``label``/``labels`` if present, else None."""
    if label_column is not None:
        if label_column not in ds.features:
            raise DataError(
                f"label column {label_column!r} not found; the columns are: {_columns_hint(ds)}",
                hint="pass --label-column with one of those, or leave it out to distil without labels",
            )
        return label_column
    return next((name for name in LABEL_COLUMN_PREFERENCE if name in ds.features), None)


def detect_image_column(ds: Any) -> str:
    """The first column of ``datasets.Image`` type, else one named like an image column."""
    for name, feature in ds.features.items():
        if _is_image_feature(feature):
            return name
    for name in IMAGE_COLUMN_PREFERENCE:
        if name in ds.features:
            return name
    raise DataError(
        f"no image column found; the columns are: {_columns_hint(ds)}",
        hint="pass an image folder (one sub-directory of images per class) or a dataset with an Image column",
    )


def _column(ds: Any, name: str) -> list:
    # Arrow access is ~20x faster than iterating a datasets Column, and honours select()'s indices.
    try:
        return ds.with_format("arrow")[name].to_pylist()
    except UnicodeDecodeError as e:  # pyarrow's JSON reader keeps invalid UTF-8 bytes until a string is read
        raise DataError(
            f"column {name!r} of the data holds text that is not UTF-8 ({e.reason} at byte {e.start} of a value)",
            hint="save the data file as UTF-8 text, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8",
        ) from None


def encode_labels(values: Sequence[Any], feature: Any = None) -> tuple[list[int], list[str]]:
    """Integer ids and the name of each id. Strings map to ids in sorted order; ``ClassLabel`` keeps its names.

    Ints (or bools, or integral floats) are used as ids directly, with names ``"0".."max"``.
    """
    missing = sum(v is None for v in values)
    if missing:
        raise DataError(f"{missing} of {len(values)} examples have no label", hint="fill in or drop those rows")
    if not values:
        return [], []
    if type(feature).__name__ == "ClassLabel":
        names = list(feature.names)
        ids = [int(v) for v in values]
        bad = [v for v in ids if not 0 <= v < len(names)]
        if bad:
            raise DataError(f"label {bad[0]} is outside the {len(names)} classes", hint="drop unlabelled rows (-1)")
        return ids, names
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        return [index[v] for v in values], names
    if all(isinstance(v, (bool, int)) or (isinstance(v, float) and v.is_integer()) for v in values):
        ids = [int(v) for v in values]
        if min(ids) < 0:
            raise DataError(f"labels must be >= 0, found {min(ids)}", hint="drop unlabelled rows (often marked -1)")
        return ids, [str(i) for i in range(max(ids) + 1)]
    example = next(v for v in values if not isinstance(v, (str, bool, int)))
    raise DataError(
        f"labels must be class ids (ints) or class names (strings), found {type(example).__name__} {example!r}",
        hint="regression and multi-label targets are not supported; pass --label-column naming a class column",
    )


# --- splitting, tokenising, packing ------------------------------------------------------------------------------


def split_indices(n: int, eval_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint sorted index lists (train, eval) over ``range(n)``; eval has ``max(1, round(eval_split * n))``."""
    if n < 2:
        raise DataError(f"found {n} example(s); need at least 2 (one to train on, one to evaluate)")
    n_eval = min(n - 1, max(1, round(eval_split * n)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def tokenize_stream(texts: Sequence[str], tokenizer: Any) -> Any:
    """All ``texts`` tokenised and concatenated, an eos after each document when the tokenizer has one.

    Returns an int64 numpy array ``[N]``.
    """
    import numpy as np

    eos = tokenizer.eos_token_id
    parts = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        batch = list(texts[start : start + _TOKENIZE_CHUNK])
        # verbose=False: documents longer than the model's context are expected here; packing cuts them.
        encoded = tokenizer(
            batch, add_special_tokens=True, truncation=False, verbose=False, return_attention_mask=False
        )
        for ids in encoded["input_ids"]:
            if eos is not None and (not ids or ids[-1] != eos):
                ids = [*ids, eos]
            parts.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def pack_blocks(stream: Any, block_length: int) -> Any:
    """Cut a token stream ``[N]`` into ``[N // block_length, block_length]``, dropping the tail."""
    import numpy as np
    import torch

    n_blocks = len(stream) // block_length
    used = np.asarray(stream[: n_blocks * block_length], dtype=np.int64)
    return torch.from_numpy(used.copy()).view(n_blocks, block_length)


def _tokenize_truncated(texts: Sequence[str], tokenizer: Any, max_length: int, special_mask: bool) -> dict:
    out: dict[str, list] = {"input_ids": [], "special_tokens_mask": []}
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        encoded = tokenizer(
            list(texts[start : start + _TOKENIZE_CHUNK]),
            add_special_tokens=True,
            truncation=True,
            max_length=max_length,
            return_attention_mask=False,
            return_special_tokens_mask=special_mask,
        )
        out["input_ids"].extend(encoded["input_ids"])
        if special_mask:
            out["special_tokens_mask"].extend(encoded["special_tokens_mask"])
    return out


# --- processors ----------------------------------------------------------------------------------------------------


def _is_tokenizer(obj: Any) -> bool:
    return callable(obj) and hasattr(obj, "convert_tokens_to_ids") and hasattr(obj, "pad")


def text_tokenizer(processor: Any, task: str) -> tuple[Any, bool]:
    """The tokenizer to use for ``task`` and whether its pad token was set to eos.

    Tokenizers of decoder models (GPT-2, Llama) often have no pad token; padded tasks then get a *copy* of the
    tokenizer with ``pad_token = eos_token`` (the attention mask hides the padding, so which id pads does not matter),
    and the caller's tokenizer is left untouched.
    """
    tok = processor
    if tok is not None and not _is_tokenizer(tok):
        tok = getattr(tok, "tokenizer", None)  # a multimodal processor wraps one
    if tok is None or not _is_tokenizer(tok):
        got = "nothing" if processor is None else type(processor).__name__
        raise ConfigError(
            f"task {task} needs a tokenizer, but the model came with {got}",
            hint="save the tokenizer beside the model (tokenizer.json / tokenizer_config.json)",
        )
    pad_from_eos = False
    if task != "causal-lm" and tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(
                "the tokenizer has neither a pad token nor an eos token, so examples cannot be padded into batches",
                hint="add a pad token to the tokenizer and save it with the model",
            )
        tok = copy.deepcopy(tok)
        tok.pad_token = tok.eos_token
        pad_from_eos = True
    if task == "masked-lm" and tok.mask_token is None:
        raise ConfigError(
            "masked-lm needs a tokenizer with a mask token, and this one has none",
            hint="use a masked-LM teacher (BERT-like), or --task causal-lm for a decoder",
        )
    return tok, pad_from_eos


def image_processor(processor: Any) -> Any:
    """The image processor inside ``processor`` (itself, or ``processor.image_processor``)."""
    proc = processor
    if proc is not None and (_is_tokenizer(proc) or not callable(proc)):
        proc = getattr(proc, "image_processor", None)
    if proc is None or not callable(proc) or _is_tokenizer(proc):
        got = "nothing" if processor is None else type(processor).__name__
        raise ConfigError(
            f"image-classification needs an image processor, but the model came with {got}",
            hint="save the image processor beside the model (preprocessor_config.json)",
        )
    return proc


# --- the entry point -----------------------------------------------------------------------------------------------


def prepare_data(spec: DataSpec, processor: Any, task: str) -> PreparedData:
    """Read ``spec``, split it, and tokenise/pack (or process images) for ``task``.

    ``processor`` is the teacher's tokenizer (text tasks) or image processor (image-classification).
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}", hint=f"choose one of: {', '.join(TASKS)}")
    if task == "image-classification":
        proc = image_processor(processor)
        raw = read_raw(spec)
        return _prepare_images(spec, raw, proc)
    tokenizer, pad_from_eos = text_tokenizer(processor, task)
    raw = read_raw(spec)
    prepared = _prepare_text(spec, raw, tokenizer, task)
    prepared.info["pad_token_from_eos"] = pad_from_eos
    return prepared


def _base_info(spec: DataSpec, raw: RawData, task: str) -> dict:
    return {
        "task": task,
        **raw.info(),
        "eval_split": spec.eval_split,
        "seed": spec.seed,
        "max_length": spec.max_length,
        "max_samples": spec.max_samples,
    }


def _split_rows(spec: DataSpec, raw: RawData, train_keep: list[int], eval_keep: list[int] | None, what: str):
    """(train rows, eval rows, train source, eval source): row indices and which dataset each indexes."""
    if raw.eval is None:
        if len(train_keep) < 2:
            raise DataError(
                f"{raw.source} gives {len(train_keep)} usable {what}; need at least 2 (one to train on, one to evaluate)",
                hint="use more data",
            )
        tr, ev = split_indices(len(train_keep), spec.eval_split, spec.seed)
        return [train_keep[i] for i in tr], [train_keep[i] for i in ev], raw.train, raw.train
    if not eval_keep:
        raise DataError(
            f"the {raw.eval_split_name} split of {raw.source} has no usable {what}",
            hint="fill it, or remove that split",
        )
    return train_keep, eval_keep, raw.train, raw.eval


def _labels(label_column: str | None, train_src: Any, train_rows: list[int], eval_src: Any, eval_rows: list[int]):
    """(train label ids, eval label ids, label names) over both splits at once so ids agree; Nones when no column."""
    if label_column is None:
        return None, None, None
    train_vals = _column(train_src, label_column)
    eval_vals = train_vals if eval_src is train_src else _column(eval_src, label_column)
    values = [train_vals[i] for i in train_rows] + [eval_vals[i] for i in eval_rows]
    ids, names = encode_labels(values, train_src.features[label_column])
    return ids[: len(train_rows)], ids[len(train_rows) :], names


def _check_eval_columns(raw: RawData, *columns: str | None) -> None:
    if raw.eval is None:
        return
    for col in columns:
        if col is not None and col not in raw.eval.features:
            raise DataError(
                f"the {raw.eval_split_name} split of {raw.source} has no column {col!r}; it has: {_columns_hint(raw.eval)}",
                hint="give every split the same columns",
            )


def _nonblank_rows(ds: Any, column: str) -> tuple[list[int], list[str]]:
    texts = _column(ds, column)
    keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    return keep, texts


def _prepare_text(spec: DataSpec, raw: RawData, tokenizer: Any, task: str) -> PreparedData:
    info = _base_info(spec, raw, task)
    text_column = detect_text_column(raw.train, spec.text_column)
    label_column = detect_label_column(raw.train, spec.label_column) if task == "sequence-classification" else None
    _check_eval_columns(raw, text_column, label_column)

    train_keep, train_texts_all = _nonblank_rows(raw.train, text_column)
    if not train_keep:
        raise DataError(
            f"{raw.source} has no non-blank text in column {text_column!r} ({len(train_texts_all)} rows, all blank)",
            hint="check the file, or pass --text-column naming the column with the text",
        )
    eval_keep, eval_texts_all = (None, None) if raw.eval is None else _nonblank_rows(raw.eval, text_column)
    train_rows, eval_rows, train_src, eval_src = _split_rows(spec, raw, train_keep, eval_keep, "texts")
    train_texts = [train_texts_all[i] for i in train_rows]
    eval_texts = [(train_texts_all if eval_src is train_src else eval_texts_all)[i] for i in eval_rows]
    train_labels, eval_labels, label_names = _labels(label_column, train_src, train_rows, eval_src, eval_rows)
    n_blank = len(train_texts_all) - len(train_keep) + (0 if raw.eval is None else len(eval_texts_all) - len(eval_keep))
    info.update(
        text_column=text_column,
        label_column=label_column,
        n_blank_dropped=n_blank,
        n_train_examples=len(train_texts),
        n_eval_examples=len(eval_texts),
    )

    if task == "causal-lm":
        return _prepare_causal(spec, tokenizer, train_texts, eval_texts, info)

    special = task == "masked-lm"
    train_enc = _tokenize_truncated(train_texts, tokenizer, spec.max_length, special)
    eval_enc = _tokenize_truncated(eval_texts, tokenizer, spec.max_length, special)
    train_ds = _tokenized_dataset(train_enc, train_labels, special)
    eval_ds = _tokenized_dataset(eval_enc, eval_labels, special)
    if len(train_ds) == 0 or len(eval_ds) == 0:
        raise DataError(
            f"no tokens left in the {'train' if len(train_ds) == 0 else 'eval'} split after tokenisation",
            hint="check that the tokenizer matches the text",
        )
    lengths = [len(ids) for ids in train_ds.input_ids] + [len(ids) for ids in eval_ds.input_ids]
    info.update(
        n_train=len(train_ds),
        n_eval=len(eval_ds),
        n_tokens=sum(lengths),
        n_at_max_length=sum(n >= spec.max_length for n in lengths),
        num_labels=len(label_names) if label_names is not None else None,
        label_names=label_names,
    )
    if task == "masked-lm":
        from transformers import DataCollatorForLanguageModeling

        collate: Callable = DataCollatorForLanguageModeling(
            tokenizer=tokenizer, mlm=True, mlm_probability=MLM_PROBABILITY
        )
        info["mlm_probability"] = MLM_PROBABILITY
    else:
        from transformers import DataCollatorWithPadding

        collate = DataCollatorWithPadding(tokenizer=tokenizer)
    num_labels = len(label_names) if label_names is not None else None
    return PreparedData(train_ds, eval_ds, collate, num_labels, info)


def _tokenized_dataset(enc: dict, labels: list[int] | None, special: bool) -> TokenizedDataset:
    # A text the tokenizer maps to nothing would become an all-padding row; it carries no signal, so it is dropped.
    keep = [i for i, ids in enumerate(enc["input_ids"]) if ids]
    ids = [enc["input_ids"][i] for i in keep]
    extra = {"special_tokens_mask": [enc["special_tokens_mask"][i] for i in keep]} if special else None
    return TokenizedDataset(ids, None if labels is None else [labels[i] for i in keep], extra)


def _prepare_causal(spec: DataSpec, tokenizer: Any, train_texts: list[str], eval_texts: list[str], info: dict):
    block = spec.max_length
    train_stream = tokenize_stream(train_texts, tokenizer)
    eval_stream = tokenize_stream(eval_texts, tokenizer)
    total = len(train_stream) + len(eval_stream)
    n_texts = len(train_texts) + len(eval_texts)
    if len(train_stream) < block or len(eval_stream) < block:
        short = "train" if len(train_stream) < block else "eval"
        raise DataError(
            f"found {total} tokens in {n_texts} texts ({len(train_stream)} train, {len(eval_stream)} eval); packing "
            f"needs at least max_length={block} tokens in each split, and the {short} split falls short",
            hint="use more data, a smaller --max-length, or (if eval is short) a larger --eval-split",
        )
    train_blocks = pack_blocks(train_stream, block)
    eval_blocks = pack_blocks(eval_stream, block)
    info.update(
        n_train=int(train_blocks.shape[0]),
        n_eval=int(eval_blocks.shape[0]),
        n_tokens=int(total),
        n_train_tokens=int(len(train_stream)),
        n_eval_tokens=int(len(eval_stream)),
        n_tokens_dropped=int(total - block * (train_blocks.shape[0] + eval_blocks.shape[0])),
        packed=True,
        eos_between_documents=tokenizer.eos_token_id is not None,
        num_labels=None,
        label_names=None,
    )
    return PreparedData(PackedDataset(train_blocks), PackedDataset(eval_blocks), stack_collate, None, info)


def _prepare_images(spec: DataSpec, raw: RawData, processor: Any) -> PreparedData:
    info = _base_info(spec, raw, "image-classification")
    image_column = detect_image_column(raw.train)
    label_column = detect_label_column(raw.train, spec.label_column)
    _check_eval_columns(raw, image_column, label_column)

    def present(ds: Any) -> list[int]:
        # Arrow nulls are missing images; checking them does not decode anything.
        return [i for i, v in enumerate(ds.with_format("arrow")[image_column].is_null().to_pylist()) if not v]

    train_keep = present(raw.train)
    eval_keep = None if raw.eval is None else present(raw.eval)
    train_rows, eval_rows, train_src, eval_src = _split_rows(spec, raw, train_keep, eval_keep, "images")
    train_labels, eval_labels, label_names = _labels(label_column, train_src, train_rows, eval_src, eval_rows)
    num_labels = len(label_names) if label_names is not None else None
    info.update(
        image_column=image_column,
        label_column=label_column,
        n_train_examples=len(train_rows),
        n_eval_examples=len(eval_rows),
        n_train=len(train_rows),
        n_eval=len(eval_rows),
        num_labels=num_labels,
        label_names=label_names,
    )
    train_ds = ImageClassificationDataset(train_src, image_column, train_rows, train_labels, processor)
    eval_ds = ImageClassificationDataset(eval_src, image_column, eval_rows, eval_labels, processor)
    return PreparedData(train_ds, eval_ds, stack_collate, num_labels, info)
