"""Sequence-level KD: teacher completions cached as `datasets` shards, resumable, then trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distillkit.cli.app import main
from distillkit.config import DistillConfig
from distillkit.distill import onpolicy, sequence
from distillkit.errors import DataError
from tests.test_distill.test_engine import markov_lines


def _cfg(teacher: str, **kw):
    base = dict(teacher=teacher, mode="sequence", max_length=12, max_new_tokens=5, batch_size=2, sequence_shard_size=3)
    base.update(kw)
    return DistillConfig.of(**base)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (7, 6), generator=g)


def test_generation_resumes_after_an_interruption_and_matches_one_go(gpt2, tmp_path, monkeypatch):
    model, path = gpt2
    cfg, prompts = _cfg(path), _prompts()
    whole = tmp_path / "whole"
    assert sequence.generate_sequences(cfg, model, prompts, whole, pad_token_id=0, eos_token_id=2) == 3
    reference = sequence.load_sequences(whole)
    assert len(reference) == 7 and len(reference[0]["input_ids"]) == 11
    assert torch.equal(torch.tensor(reference["input_ids"])[:, :6], prompts)  # prompts kept, 5 new tokens each

    # interrupt while generating the second shard
    real, calls = onpolicy.generate_continuations, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # shard 0 needs 2 batches (3 prompts, batch 2); the 3rd call is shard 1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(onpolicy, "generate_continuations", flaky)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        sequence.generate_sequences(cfg, model, prompts, resumed, pad_token_id=0, eos_token_id=2)
    assert sorted(p.name for p in resumed.iterdir() if p.name.startswith("shard")) == ["shard-00000"]
    monkeypatch.setattr(onpolicy, "generate_continuations", real)
    first_shard = (resumed / "shard-00000").stat().st_mtime_ns
    # the rerun keeps shard 0 and generates only shards 1 and 2
    assert sequence.generate_sequences(cfg, model, prompts, resumed, pad_token_id=0, eos_token_id=2) == 2
    assert (resumed / "shard-00000").stat().st_mtime_ns == first_shard
    again = sequence.load_sequences(resumed)
    assert again["input_ids"] == reference["input_ids"] and again["attention_mask"] == reference["attention_mask"]

    # a cache for other settings is refused
    with pytest.raises(DataError, match="gen_temperature"):
        sequence.generate_sequences(
            _cfg(path, gen_temperature=0.5), model, prompts, resumed, pad_token_id=0, eos_token_id=2
        )


def test_sequence_dataset_labels_only_the_completion():
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [[5, 6, 7, 8, 2, 0]], "attention_mask": [[1, 1, 1, 1, 1, 0]]})
    item = sequence.SequenceDataset(ds, prompt_length=2)[0]
    assert item["labels"].tolist() == [-100, -100, 7, 8, 2, -100]


def test_sequence_mode_cli_trains_on_cached_completions(llama, tmp_path, capsys):
    _, teacher = llama
    data = tmp_path / "text.txt"
    data.write_text("\n".join(markov_lines(30, seed=4)))
    cache = tmp_path / "seq-cache"
    args = [
        "distill", "--teacher", teacher, "--student", "layers=1", "--data", str(data), "--max-length", "12",
        "--batch-size", "4", "--steps", "3", "--mode", "sequence", "--max-new-tokens", "4",
        "--sequence-shard-size", "8", "--sequence-cache", str(cache), "--alpha", "0.5",
    ]  # fmt: skip
    code = main([*args, "--out", str(tmp_path / "a")])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    info = json.loads(cap.out.strip().splitlines()[-1])["extra"]["data"]
    n_shards = json.loads((cache / "index.json").read_text())["n_shards"]
    assert info["sequence_shards_generated"] == n_shards >= 2 and info["sequence_length"] == 10
    assert info["n_train"] == json.loads((cache / "index.json").read_text())["n_prompts"]
    # a second run reuses every shard
    code = main([*args, "--out", str(tmp_path / "b")])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert json.loads(cap.out.strip().splitlines()[-1])["extra"]["data"]["sequence_shards_generated"] == 0
    m = json.loads(cap.out.strip().splitlines()[-1])["metrics"]
    assert m["steps"] == 3 and m["final_train_loss"] > 0
    assert Path(tmp_path / "a" / "model.safetensors").is_file()
