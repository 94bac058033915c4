"""search-student over HF ResNet stage depths and widths: space, teacher-initialised students, search, pipe."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
from transformers import AutoModelForImageClassification

from distillkit.cli.app import main
from distillkit.errors import ConfigError
from distillkit.search.cnn import ResNetCounter, ResNetSpace, build_resnet_student, student_config
from distillkit.search.space import SearchSpace


def _run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, [ln for ln in cap.out.splitlines() if ln.strip()], cap.err


def _teacher(path):
    return AutoModelForImageClassification.from_pretrained(path).eval()


def _pixels(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_space_values_and_every_sample_loads(resnet_dir):
    teacher = _teacher(resnet_dir)
    space = SearchSpace.from_teacher(teacher.config)
    assert isinstance(space, ResNetSpace)
    assert space.values == {
        "depth0": [1, 2],
        "depth1": [1, 2, 3],
        "width0": list(range(2, 17, 2)),
        "width1": list(range(4, 33, 4)),
    }
    count = ResNetCounter(teacher)
    rng = random.Random(0)
    for _ in range(12):
        spec = space.mutate(space.sample(rng), rng)
        model = type(teacher)(student_config(teacher.config, spec))  # a config the class accepts
        assert sum(p.numel() for p in model.parameters()) == count(spec)
        assert model(pixel_values=_pixels()).logits.shape == (4, 3)
        # the stem keeps following stage 0 (identity shortcut as in the teacher)
        assert model.config.embedding_size == spec["width0"]
    assert count({"depth0": 2, "depth1": 3, "width0": 16, "width1": 32}) == sum(p.numel() for p in teacher.parameters())


def test_space_constraints_and_errors(resnet_dir):
    teacher = _teacher(resnet_dir)
    space = SearchSpace.from_teacher(teacher.config, "depth0=1,width1=16..24")
    assert space.values["depth0"] == [1] and space.values["width1"] == [16, 20, 24]
    with pytest.raises(ConfigError, match="unknown --space key 'layers'"):
        SearchSpace.from_teacher(teacher.config, "layers=2")
    with pytest.raises(ConfigError, match="larger than the teacher's 3"):
        SearchSpace.from_teacher(teacher.config, "depth1=4")


def test_full_size_student_is_the_teacher_and_depth_keeps_the_chosen_blocks(resnet_dir):
    teacher = _teacher(resnet_dir)
    full = build_resnet_student(teacher, {"depth0": 2, "depth1": 3, "width0": 16, "width1": 32}).eval()
    with torch.no_grad():
        assert torch.equal(full(pixel_values=_pixels()).logits, teacher(pixel_values=_pixels()).logits)
    # stage 1 of 3 blocks -> 2 keeps teacher blocks 0 and 2 (evenly spread, first and last), whole at full width
    shallow = build_resnet_student(teacher, {"depth0": 1, "depth1": 2, "width0": 16, "width1": 32})
    t_stages, s_stages = teacher.resnet.encoder.stages, shallow.resnet.encoder.stages
    for s_block, t_block in ((0, 0), (1, 2)):
        for (name, a), (_, b) in zip(
            s_stages[1].layers[s_block].state_dict().items(),
            t_stages[1].layers[t_block].state_dict().items(),
            strict=True,
        ):
            assert torch.equal(a, b), name
    assert torch.equal(shallow.classifier[1].weight, teacher.classifier[1].weight)


def test_narrow_student_keeps_the_largest_channels(resnet_dir):
    teacher = _teacher(resnet_dir)
    spec = {"depth0": 1, "depth1": 1, "width0": 8, "width1": 16}
    student = build_resnet_student(teacher, spec)
    # stage 1's residual channels: the classifier reads them, so its columns are the teacher's kept channels
    t_cls, s_cls = teacher.classifier[1].weight, student.classifier[1].weight
    cols = [int((t_cls - s_cls[:, [j]]).abs().sum(0).argmin()) for j in range(16)]
    assert cols == sorted(cols) and len(set(cols)) == 16  # sorted, distinct teacher channels
    assert torch.equal(s_cls, t_cls[:, cols])
    # random init draws from the seed, not from the caller's RNG
    state = torch.get_rng_state()
    a = build_resnet_student(teacher, spec, init="random", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_resnet_student(teacher, spec, init="random", seed=3)
    assert torch.equal(a.classifier[1].weight, b.classifier[1].weight)
    assert not torch.equal(a.classifier[1].weight, s_cls)


def test_bottleneck_students_load(resnet_bottleneck_dir):
    teacher = _teacher(resnet_bottleneck_dir)
    space = SearchSpace.from_teacher(teacher.config)
    assert all(v % 4 == 0 for k in ("width0", "width1") for v in space.values[k])
    rng = random.Random(1)
    for _ in range(6):
        spec = space.sample(rng)
        student = build_resnet_student(teacher, spec).eval()
        # the stem (32 -> scaled with stage 0) never becomes as wide as stage 0: the projection shortcut stays
        assert student.config.embedding_size != spec["width0"]
        with torch.no_grad():
            assert student(pixel_values=_pixels()).logits.shape == (4, 3)


def test_resnet_search_respects_the_budget_and_pipes_into_distill(resnet_dir, image_dir, tmp_path, capsys, monkeypatch):
    teacher = _teacher(resnet_dir)
    t_params = sum(p.numel() for p in teacher.parameters())
    code, lines, err = _run(
        [
            "search-student",
            str(resnet_dir),
            "--data",
            str(image_dir),
            "--params",
            "0.5",
            "--candidates",
            "6",
            "--batch-size",
            "6",
            "--report",
            "naswot",
            "--out",
            str(tmp_path / "s"),
        ],
        capsys,
    )
    assert code == 0, err
    found = json.loads(lines[0])
    ranking = found["extra"]["ranking"]
    assert len(ranking) == 6 and found["config"]["budget_params"] == int(0.5 * t_params)
    assert "D" in err and "stage depths" in err  # the table on stderr names the stage dimensions
    for r in ranking:
        assert r["params"] <= 0.5 * t_params
        model = type(teacher)(student_config(teacher.config, r["spec"]))
        assert sum(p.numel() for p in model.parameters()) == r["params"]
        assert 0.0 <= r["terms"]["semantic"] <= 1.0 and 0.0 <= r["terms"]["relation"] <= 1.0
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    best = ranking[0]["spec"]
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        assert torch.equal(
            saved(pixel_values=_pixels()).logits,
            build_resnet_student(teacher, best).eval()(pixel_values=_pixels()).logits,
        )
    assert found["metrics"]["student_params"] == ranking[0]["params"]

    monkeypatch.setattr("sys.stdin", io.StringIO(lines[0] + "\n"))
    code, lines, err = _run(
        [
            "distill",
            "-",
            "--teacher",
            str(resnet_dir),
            "--data",
            str(image_dir),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--eval-split",
            "0.25",
            "--out",
            str(tmp_path / "d"),
        ],
        capsys,
    )
    assert code == 0, err
    m = json.loads(lines[0])
    assert [h["stage"] for h in m["history"]] == ["search-student"]
    assert m["metrics"]["student_params"] == found["metrics"]["student_params"]


def test_resnet_budget_below_smallest_candidate(resnet_dir, image_dir, tmp_path, capsys):
    code, _, err = _run(
        [
            "search-student",
            str(resnet_dir),
            "--data",
            str(image_dir),
            "--max-params",
            "100",
            "--out",
            str(tmp_path / "s"),
        ],
        capsys,
    )
    assert code == 1 and "below the smallest candidate" in err and "depth0=1,depth1=1,width0=2,width1=4" in err
    assert not (tmp_path / "s").exists()


def test_a_zeroed_channel_is_cut_first(resnet_dir):
    import copy

    from distillkit.prune.resnet import spaces_of

    teacher = copy.deepcopy(_teacher(resnet_dir))
    with torch.no_grad():
        for key, tensor in teacher.state_dict().items():
            roles = spaces_of(teacher.config, key)
            if key.endswith(".weight") and roles:
                for dim, space in enumerate(roles):
                    if space == "stage1":
                        tensor.index_fill_(dim, torch.tensor([5]), 0.0)
    assert float(teacher.classifier[1].weight.detach()[:, 5].abs().sum()) == 0.0
    student = build_resnet_student(teacher, {"depth0": 2, "depth1": 3, "width0": 16, "width1": 31})
    # 31 of 32 channels: exactly the zeroed one is gone, so no column of the classifier is all zero
    cls = student.classifier[1].weight
    assert cls.shape == (3, 31) and bool((cls.abs().sum(0) > 0).all())
    assert torch.equal(cls, torch.cat([teacher.classifier[1].weight[:, :5], teacher.classifier[1].weight[:, 6:]], 1))
