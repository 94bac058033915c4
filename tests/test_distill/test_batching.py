"""Training batches: deterministic epochs, and --group-by-length's grouping of similar lengths."""

from __future__ import annotations

import json

import torch

from distillkit.cli.app import main
from distillkit.data.prepare import TokenizedDataset
from distillkit.distill.engine import GROUP_WINDOW, EpochBatches, example_lengths, group_by_length
from tests import tiny


def _dataset(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 65, (n,), generator=g).tolist()
    return TokenizedDataset([[5] * k for k in lengths]), lengths


def _epoch(batches):
    return [list(batches.next()["input_ids"].shape) + [tuple(batches.last_indices)] for _ in range(batches.per_epoch)]


def test_group_by_length_is_a_permutation_of_full_similar_batches():
    _, lengths = _dataset()
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1)).tolist()
    b = 8
    grouped = group_by_length(order, lengths, b, torch.Generator().manual_seed(2))
    assert sorted(grouped) == sorted(order)
    # every full batch comes from one window of GROUP_WINDOW * b examples, sorted by length: its spread is what that
    # window's sorted neighbours differ by, far below the spread of a random batch
    spread = [
        max(lengths[i] for i in grouped[k : k + b]) - min(lengths[i] for i in grouped[k : k + b])
        for k in range(0, len(grouped) - b + 1, b)
    ]
    random_spread = [
        max(lengths[i] for i in order[k : k + b]) - min(lengths[i] for i in order[k : k + b])
        for k in range(0, len(order) - b + 1, b)
    ]
    assert sum(spread) / len(spread) < 0.25 * sum(random_spread) / len(random_spread)
    # the batches are not in length order: the first windows' longest batches are spread over the epoch
    firsts = [lengths[grouped[k]] for k in range(0, len(grouped) - b + 1, b)]
    assert firsts != sorted(firsts, reverse=True)
    window = set(order[: GROUP_WINDOW * b])
    assert any(grouped[k] in window for k in range(len(grouped) // 2, len(grouped) - b + 1, b))


def _collate(items):
    return {"input_ids": torch.nn.utils.rnn.pad_sequence([torch.tensor(i) for i in items], batch_first=True)}


def test_grouped_epochs_are_deterministic_and_cover_every_example():
    ds, lengths = _dataset(200)
    items = ds.input_ids

    def batches(grouped=True):
        return EpochBatches(items, _collate, 16, seed=3, rank=0, world=1, lengths=lengths if grouped else None)

    a = batches()
    ea, eb = _epoch(a), _epoch(batches())
    assert ea == eb
    seen = [i for row in ea for i in row[2]]
    assert len(seen) == len(set(seen)) == a.per_epoch * 16
    # padded widths: grouped batches pad far less than ungrouped ones
    assert sum(row[1] for row in ea) < 0.75 * sum(row[1] for row in _epoch(batches(grouped=False)))
    # a resumed position replays the same batches
    c = batches()
    c.load_state_dict({"epoch": 0, "index": 3})
    c.next()
    assert tuple(c.last_indices) == ea[3][2]


def test_example_lengths_only_for_varied_token_lists():
    assert example_lengths(TokenizedDataset([[1, 2], [3]])) == [2, 1]
    assert example_lengths(TokenizedDataset([[1, 2], [3, 4]])) is None  # one length: nothing to group
    assert example_lengths([{"input_ids": [1]}]) is None


def test_distill_records_the_setting(tmp_path, capsys):
    _, teacher = tiny.tiny_bert(tmp_path / "t")
    data = tmp_path / "d.txt"
    data.write_text("\n".join(" ".join(["word"] * (1 + i % 17)) for i in range(120)))
    for flag in ("--group-by-length", "--no-group-by-length"):
        out = tmp_path / flag
        code = main(
            ["distill", "--teacher", teacher, "--student", "layers=1", "--data", str(data), "--steps", "2"]
            + ["--batch-size", "4", "--max-length", "32", "--eval-data", "none", flag, "--out", str(out)]
        )
        assert code == 0, capsys.readouterr().err
        manifest = json.loads((out / "distillkit.json").read_text())
        assert manifest["config"]["group_by_length"] is (flag == "--group-by-length")
