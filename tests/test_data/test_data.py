"""distillkit.data: reading every source format, column detection, labels, splitting, packing, collators, errors,
the embedded corpus, and the light import. Tokenizers are tiny WordLevel ones trained in-test; nothing is downloaded."""

from __future__ import annotations

import gzip
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from distillkit.data import (
    CORPUS_DESCRIPTION,
    SUPPORTED_EXTENSIONS,
    DataSpec,
    encode_labels,
    load_corpus,
    prepare_data,
    read_dataset,
    split_indices,
    tokenize_stream,
)
from distillkit.data import corpus as corpus_mod
from distillkit.errors import ConfigError, DataError

WORDS = (
    "the cat sat on a mat while dog ran far away from home and bird sang song in tree "
    "every morning sun rose over hill river flowed past old mill children played game"
).split()
SENTENCES = [
    "the cat sat on a mat",
    "the dog ran far away from home",
    "a bird sang a song in the tree",
    "every morning the sun rose over the hill",
    "the river flowed past the old mill",
    "children played a game in the morning",
    "the old dog sat in the sun",
    "a cat ran past the tree and the mill",
]
LABELS = ["pos", "neg", "pos", "neu", "neg", "pos", "neu", "neg"]


@pytest.fixture(scope="session")
def tokenizers_pair():
    """(gpt, bert): a GPT-2-like tokenizer (eos, no pad) and a BERT-like one ([CLS] x [SEP], [PAD], [MASK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def word_level(specials):
        tok = Tokenizer(models.WordLevel(unk_token=specials[0]))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
        return tok

    g = word_level(["<unk>", "<eos>"])
    gpt = PreTrainedTokenizerFast(tokenizer_object=g, unk_token="<unk>", eos_token="<eos>")
    b = word_level(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"])
    b.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", b.token_to_id("[CLS]")), ("[SEP]", b.token_to_id("[SEP]"))]
    )
    bert = PreTrainedTokenizerFast(
        tokenizer_object=b,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    return gpt, bert


@pytest.fixture(scope="session")
def gpt(tokenizers_pair):
    return tokenizers_pair[0]


@pytest.fixture(scope="session")
def bert(tokenizers_pair):
    return tokenizers_pair[1]


def _write_all_formats(d):
    """The same 8 rows (text, label) in every supported format; returns {name: path}."""
    import datasets
    import pandas as pd

    rows = [{"text": t, "label": lab} for t, lab in zip(SENTENCES, LABELS, strict=True)]
    paths = {}
    paths["txt"] = d / "data.txt"
    # Blank and whitespace-only lines are not examples.
    paths["txt"].write_text("\n".join(SENTENCES[:4]) + "\n\n   \n" + "\n".join(SENTENCES[4:]) + "\n")
    paths["jsonl"] = d / "data.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["jsonl.gz"] = d / "data.jsonl.gz"
    paths["jsonl.gz"].write_bytes(gzip.compress(paths["jsonl"].read_bytes()))
    paths["json"] = d / "data.json"
    paths["json"].write_text(json.dumps(rows))
    paths["csv"] = d / "data.csv"
    pd.DataFrame(rows).to_csv(paths["csv"], index=False)
    paths["parquet"] = d / "data.parquet"
    pd.DataFrame(rows).to_parquet(paths["parquet"])
    paths["saved"] = d / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["saved"]))
    paths["dir"] = d / "shards"
    paths["dir"].mkdir()
    (paths["dir"] / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    (paths["dir"] / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[5:]))
    return paths


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    return _write_all_formats(tmp_path_factory.mktemp("formats"))


# --- sources ---------------------------------------------------------------------------------------------------------


def test_every_format_reads_the_same_rows(data_files):
    for name, path in data_files.items():
        ds = read_dataset(DataSpec(data=str(path)))
        assert list(ds.with_format("arrow")["text"].to_pylist()) == SENTENCES, name
        if name != "txt":
            assert ds.with_format("arrow")["label"].to_pylist() == LABELS, name
    assert read_dataset(DataSpec(data=str(data_files["csv"]), max_samples=3)).num_rows == 3


def test_saved_dataset_dict_uses_its_validation_split(tmp_path, gpt):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": SENTENCES[:6]}),
            "validation": datasets.Dataset.from_dict({"text": SENTENCES[6:]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    prep = prepare_data(DataSpec(data=str(tmp_path / "dd"), eval_split=0.5), gpt, "feature-extraction")
    assert prep.info["eval_from"] == "validation" and prep.info["train_split"] == "train"
    assert (len(prep.train), len(prep.eval)) == (6, 2)
    assert prep.eval[1]["input_ids"] == gpt(SENTENCES[7])["input_ids"]


def test_text_column_detection(tmp_path, gpt):
    import datasets

    from distillkit.data import detect_text_column

    def ds(**cols):
        return datasets.Dataset.from_dict({k: v for k, v in cols.items()})

    assert detect_text_column(ds(id=[1], content=["x"], text=["y"])) == "text"
    assert detect_text_column(ds(id=[1], prompt=["x"], sentence=["y"])) == "sentence"
    assert detect_text_column(ds(id=[1], body=["x"], title=["y"])) == "body"
    assert detect_text_column(ds(body=["x"], title=["y"]), "title") == "title"
    with pytest.raises(DataError, match=r"no text column found; the columns are: id \(int64\), score \(float64\)"):
        detect_text_column(ds(id=[1], score=[0.5]))
    with pytest.raises(DataError, match=r"text column 'txt' not found; the columns are: body \(string\)"):
        detect_text_column(ds(body=["x"]), "txt")
    with pytest.raises(DataError, match="column 'id' holds int64, not text"):
        detect_text_column(ds(id=[1], body=["x"]), "id")


# --- labels ------------------------------------------------------------------------------------------------------------


def test_string_labels_map_to_sorted_ids(data_files, bert):
    prep = prepare_data(DataSpec(data=str(data_files["jsonl"]), eval_split=0.25), bert, "sequence-classification")
    assert prep.num_labels == 3 and prep.info["label_names"] == ["neg", "neu", "pos"]
    assert prep.info["label_column"] == "label"
    ids = {"neg": 0, "neu": 1, "pos": 2}
    train_rows, eval_rows = split_indices(8, 0.25, 0)
    assert [prep.train[i]["labels"] for i in range(len(prep.train))] == [ids[LABELS[r]] for r in train_rows]
    assert [prep.eval[i]["labels"] for i in range(len(prep.eval))] == [ids[LABELS[r]] for r in eval_rows]
    batch = prep.collate_fn([prep.train[0], prep.train[1]])
    assert batch["labels"].tolist() == [ids[LABELS[train_rows[0]]], ids[LABELS[train_rows[1]]]]
    assert batch["input_ids"].shape == batch["attention_mask"].shape


def test_encode_labels_ints_classlabel_and_errors():
    import datasets

    assert encode_labels([2, 0, 2]) == ([2, 0, 2], ["0", "1", "2"])
    assert encode_labels([1.0, 0.0]) == ([1, 0], ["0", "1"])
    assert encode_labels([True, False]) == ([1, 0], ["0", "1"])
    assert encode_labels([1, 0], datasets.ClassLabel(names=["cat", "dog"])) == ([1, 0], ["cat", "dog"])
    with pytest.raises(DataError, match="1 of 3 examples have no label"):
        encode_labels(["a", None, "b"])
    with pytest.raises(DataError, match="labels must be >= 0, found -1"):
        encode_labels([0, -1])
    with pytest.raises(DataError, match="found float 0.5"):
        encode_labels([0, 0.5])


def test_classification_without_labels_and_missing_label_column(tmp_path, bert):
    path = tmp_path / "nolabel.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    prep = prepare_data(DataSpec(data=str(path)), bert, "sequence-classification")
    assert prep.num_labels is None and prep.info["label_column"] is None
    assert "labels" not in prep.train[0] and "labels" not in prep.collate_fn([prep.train[0]])
    with pytest.raises(DataError, match=r"label column 'sentiment' not found; the columns are: text \(string\)"):
        prepare_data(DataSpec(data=str(path), label_column="sentiment"), bert, "sequence-classification")


# --- splitting, packing, collators -----------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_sized():
    train, ev = split_indices(100, 0.1, seed=3)
    assert (train, ev) == split_indices(100, 0.1, seed=3)
    assert ev != split_indices(100, 0.1, seed=4)[1]
    assert len(ev) == 10 and len(train) == 90 and not set(train) & set(ev)
    assert sorted(train + ev) == list(range(100))
    assert [len(split_indices(n, f, 0)[1]) for n, f in [(100, 0.0), (2, 0.5), (3, 0.5), (7, 0.05)]] == [1, 1, 2, 1]
    with pytest.raises(DataError, match="found 1 example"):
        split_indices(1, 0.1, 0)


def test_causal_lm_packing_is_exact(tmp_path, gpt):
    texts = [" ".join(WORDS[(i * 7) % len(WORDS) :][: 3 + (i * 5) % 11]) for i in range(60)]
    path = tmp_path / "lm.txt"
    path.write_text("\n".join(texts) + "\n")
    spec = DataSpec(data=str(path), max_length=16, eval_split=0.1, seed=1)
    prep = prepare_data(spec, gpt, "causal-lm")
    train_rows, eval_rows = split_indices(60, 0.1, 1)
    eos = gpt.eos_token_id
    stream = [tok for r in train_rows for tok in [*gpt(texts[r])["input_ids"], eos]]
    assert len(stream) == prep.info["n_train_tokens"]
    n_blocks = len(stream) // 16
    assert len(prep.train) == n_blocks == prep.info["n_train"]
    got = [tok for i in range(len(prep.train)) for tok in prep.train[i]["input_ids"].tolist()]
    assert got == stream[: n_blocks * 16]
    eval_stream = tokenize_stream([texts[r] for r in eval_rows], gpt)
    assert len(prep.eval) == len(eval_stream) // 16
    assert prep.info["n_tokens"] == len(stream) + len(eval_stream)
    batch = prep.collate_fn([prep.train[0], prep.train[1], prep.train[2]])
    assert batch["input_ids"].shape == (3, 16) and batch["input_ids"].dtype.is_floating_point is False
    assert batch["attention_mask"].eq(1).all() and batch["labels"].equal(batch["input_ids"])
    assert prepare_data(spec, gpt, "causal-lm").train.blocks.equal(prep.train.blocks)


def test_masked_lm_collator_pads_and_masks(tmp_path, bert):
    import datasets
    import torch

    texts = [" ".join(WORDS[i : i + 3 + (i % 9)]) for i in range(40)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "mlm"))
    prep = prepare_data(DataSpec(data=str(tmp_path / "mlm"), max_length=12, eval_split=0.1), bert, "masked-lm")
    items = [prep.train[i] for i in range(len(prep.train))]
    assert max(len(it["input_ids"]) for it in items) == 12  # truncated to max_length
    torch.manual_seed(0)
    batch = prep.collate_fn(items)
    torch.manual_seed(0)
    assert prep.collate_fn(items)["input_ids"].equal(batch["input_ids"])  # global RNG drives the masking
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    lengths = torch.tensor([len(it["input_ids"]) for it in items])
    assert ids.shape == (len(items), int(lengths.max())) and mask.sum(1).equal(lengths)
    original = torch.full_like(ids, bert.pad_token_id)
    for r, it in enumerate(items):
        original[r, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
    masked = labels != -100
    assert labels[masked].equal(original[masked])  # labels hold the true token where masked
    assert ids[~masked].equal(original[~masked])  # and nothing else was touched
    specials = (original == bert.cls_token_id) | (original == bert.sep_token_id) | (original == bert.pad_token_id)
    assert not (masked & specials).any()
    fraction = masked.sum().item() / (~specials).sum().item()
    assert 0.07 < fraction < 0.25, fraction
    assert (ids[masked] == bert.mask_token_id).float().mean() > 0.5  # most masked positions show [MASK]
    assert "special_tokens_mask" not in batch


def test_feature_extraction_pads_dynamically_and_pad_token_from_eos(data_files, gpt):
    prep = prepare_data(DataSpec(data=str(data_files["txt"]), max_length=5), gpt, "feature-extraction")
    assert gpt.pad_token is None  # the caller's tokenizer is left alone; a copy pads with eos
    assert prep.info["pad_token_from_eos"] is True
    items = [prep.train[i] for i in range(len(prep.train))]
    assert all(len(it["input_ids"]) <= 5 for it in items) and "labels" not in items[0]
    short = {"input_ids": [gpt.convert_tokens_to_ids("cat")], "attention_mask": [1]}
    batch = prep.collate_fn([items[0], short])
    assert batch["input_ids"].shape == (2, len(items[0]["input_ids"]))
    assert batch["attention_mask"][1].tolist() == [1] + [0] * (batch["input_ids"].shape[1] - 1)
    assert batch["input_ids"][1, 1:].eq(gpt.eos_token_id).all()


def test_embedded_corpus_is_the_default_source(gpt):
    prep = prepare_data(DataSpec(max_samples=300, max_length=32), gpt, "causal-lm")
    assert prep.info["source"] == "builtin:english" and prep.info["n_rows"] == 300
    assert (prep.info["n_train_examples"], prep.info["n_eval_examples"]) == (285, 15)
    assert len(prep.train) == prep.info["n_train_tokens"] // 32 > 100
    json.dumps(prep.info)  # goes into the manifest


# --- errors ----------------------------------------------------------------------------------------------------------


def test_input_errors_are_data_or_config_errors(tmp_path, gpt, bert):
    def fails(exc, match, spec, task="causal-lm", processor=gpt):
        with pytest.raises(exc, match=match) as info:
            prepare_data(spec, processor, task)
        assert info.value.hint, info.value.message

    fails(DataError, "does not exist", DataSpec(data=str(tmp_path / "missing.jsonl")))
    fails(DataError, "does not exist", DataSpec(data="./nowhere/data"))
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported extension '.xlsx'") as info:
        prepare_data(DataSpec(data=str(tmp_path / "data.xlsx")), gpt, "causal-lm")
    assert all(ext in info.value.hint for ext in SUPPORTED_EXTENSIONS)
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    fails(DataError, "holds no rows", DataSpec(data=str(tmp_path / "blank.txt")))
    (tmp_path / "blank.jsonl").write_text('{"text": " "}\n{"text": ""}\n')
    fails(
        DataError,
        r"no non-blank text in column 'text' \(2 rows, all blank\)",
        DataSpec(data=str(tmp_path / "blank.jsonl")),
    )
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{not json\n')
    fails(DataError, "cannot read .*bad.jsonl as json", DataSpec(data=str(tmp_path / "bad.jsonl")))
    (tmp_path / "nums.csv").write_text("a,b\n1,2\n3,4\n")
    fails(
        DataError,
        r"no text column found; the columns are: a \(int64\), b \(int64\)",
        DataSpec(data=str(tmp_path / "nums.csv")),
    )
    (tmp_path / "one.txt").write_text("the cat sat\n")
    fails(
        DataError, "gives 1 usable texts; need at least 2", DataSpec(data=str(tmp_path / "one.txt")), "masked-lm", bert
    )
    (tmp_path / "short.txt").write_text("the cat sat\nthe dog ran\na bird sang\n")
    fails(
        DataError,
        r"found 12 tokens in 3 texts \(8 train, 4 eval\); packing needs at least max_length=64",
        DataSpec(data=str(tmp_path / "short.txt"), max_length=64),
    )
    fails(ConfigError, "unknown task 'translation'", DataSpec(), "translation")
    fails(ConfigError, "masked-lm needs a tokenizer with a mask token", DataSpec(), "masked-lm", gpt)
    fails(ConfigError, "needs a tokenizer, but the model came with nothing", DataSpec(), "causal-lm", None)
    for bad in (-0.1, 0.6, "0.1"):
        with pytest.raises(ConfigError, match="eval_split"):
            DataSpec(eval_split=bad)
    with pytest.raises(ConfigError, match="max_samples"):
        DataSpec(max_samples=0)


def test_hub_name_while_offline_fails_fast(monkeypatch, gpt):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set and it is not in the local cache") as info:
        prepare_data(DataSpec(data="someone/some-dataset-that-is-not-cached"), gpt, "causal-lm")
    assert time.perf_counter() - start < 5
    assert ".jsonl" in info.value.hint


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path, gpt):
    path = tmp_path / "secret.txt"
    path.write_text("the cat sat\nthe dog ran\n")
    path.chmod(0)
    with pytest.raises(DataError, match="cannot be read"):
        prepare_data(DataSpec(data=str(path)), gpt, "causal-lm")


# --- images ----------------------------------------------------------------------------------------------------------


def test_image_folder_gives_pixel_values_and_labels(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write test images")
    try:
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor

    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for name, colour in colours.items():
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            img = Image.new("RGB", (5 + i, 7), colour)
            (img.convert("L") if i == 3 else img).save(tmp_path / "imgs" / name / f"{i}.png")
    processor = Processor(size={"height": 8, "width": 8}, do_normalize=False)
    prep = prepare_data(DataSpec(data=str(tmp_path / "imgs"), eval_split=0.25), processor, "image-classification")
    assert prep.num_labels == 2 and prep.info["label_names"] == ["cat", "dog"]
    assert (len(prep.train), len(prep.eval)) == (6, 2) and prep.info["source_kind"] == "imagefolder"
    batch = prep.collate_fn([prep.train[i] for i in range(len(prep.train))] + [prep.eval[0], prep.eval[1]])
    assert batch["pixel_values"].shape == (8, 3, 8, 8)
    red = batch["pixel_values"][:, 0].mean((1, 2)) > batch["pixel_values"][:, 2].mean((1, 2))
    # Colour of each image agrees with its label (cat = red = 0), grayscale images aside.
    colourful = (batch["pixel_values"][:, 0] - batch["pixel_values"][:, 2]).abs().mean((1, 2)) > 0.1
    assert colourful.sum() >= 4
    assert (red[colourful] == batch["labels"][colourful].eq(0)).all()
    assert sorted(batch["labels"].tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]


# --- embedded corpus -------------------------------------------------------------------------------------------------


def test_embedded_corpus_content():
    corpus = load_corpus()
    assert len(corpus) > 1000 and len(corpus) == corpus_mod.CORPUS_PARAGRAPHS
    assert sum(len(p.split()) for p in corpus) == corpus_mod.CORPUS_WORDS
    assert f"{len(corpus):,} English paragraphs" in CORPUS_DESCRIPTION
    assert len(set(corpus)) == len(corpus)
    assert not any(">>>" in p or p.startswith("...") for p in corpus)
    assert min(len(p) for p in corpus) >= 40 and all(p == " ".join(p.split()) for p in corpus)
    raw = (corpus_mod.resources.files("distillkit.data") / corpus_mod.CORPUS_FILE).read_bytes()
    assert len(raw) < 1_000_000 and raw[4:8] == b"\0\0\0\0"  # gzip mtime 0: reproducible bytes
    assert 500_000 <= len(gzip.decompress(raw)) <= 1_500_000
    corpus.clear()
    assert len(load_corpus()) == corpus_mod.CORPUS_PARAGRAPHS  # callers get a copy


def test_corpus_cleaning_rules():
    from distillkit.data.build_corpus import paragraphs

    doc = """Summary line that is short.

    Return the sum of the two numbers given to this function as arguments.

    >>> add(1, 2)
    3

    Examples follow here and they are code:
        x = add(1, 2)

    The result is exact for integers. It may round for floats, as usual.
    result = add(a, b)
    """
    assert paragraphs(doc) == [
        "Return the sum of the two numbers given to this function as arguments.",
        "The result is exact for integers. It may round for floats, as usual.",
    ]


@pytest.mark.skipif(platform.python_version() != corpus_mod.CORPUS_PYTHON, reason="corpus built on another Python")
def test_corpus_rebuilds_byte_identical():
    result = subprocess.run(
        [sys.executable, "-m", "distillkit.data.build_corpus", "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_import_distillkit_data_stays_light():
    code = (
        "import sys, distillkit.data; "
        "print(sorted(m for m in ('torch', 'datasets', 'transformers', 'numpy', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
