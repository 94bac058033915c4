"""search-student: the space, the scores, the evolution, the artifact and the pipe into distill."""

from __future__ import annotations

import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillkit.cli.app import main
from distillkit.errors import ConfigError
from distillkit.models.spec import resolve_spec
from distillkit.models.student import build_student
from distillkit.search.config import SearchConfig
from distillkit.search.scores import ScoreContext, linear_cka, matrix_similarity
from distillkit.search.space import ParamCounter, SearchSpace, spec_key
from tests.tiny import _WORDS, sample_inputs, tiny_bert, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_vit


def _lines(n: int, seed: int = 0, length: int = 24) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(_WORDS[11:80]) for _ in range(length)) for _ in range(n)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return Path(tiny_llama(tmp_path_factory.mktemp("llama"))[1])


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return Path(tiny_bert(tmp_path_factory.mktemp("bert"))[1])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "text.txt"
    f.write_text("\n".join(_lines(60)))
    return f


def run(args: list[str], capsys) -> tuple[int, list[str], str]:
    code = main(args)
    cap = capsys.readouterr()
    return code, [ln for ln in cap.out.splitlines() if ln.strip()], cap.err


def _search_args(teacher: Path, text_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "search-student",
        str(teacher),
        "--data",
        str(text_file),
        "--max-length",
        "32",
        "--candidates",
        "8",
        "--population",
        "4",
        "--tournament",
        "2",
        "--out",
        str(out),
        *extra,
    ]


# --------------------------------------------------------------------------------------------------------------
# Space


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert, tiny_vit], ids=["llama", "gpt2", "bert", "vit"])
def test_space_yields_only_valid_loadable_candidates(make):
    teacher, _ = make()
    space = SearchSpace.from_teacher(teacher.config)
    rng = random.Random(0)
    specs = [space.sample(rng) for _ in range(40)]
    specs += [space.mutate(s, rng) for s in specs] + [
        space.crossover(a, b, rng) for a, b in zip(specs, specs[1:], strict=False)
    ]
    for spec in specs:
        assert resolve_spec(dict(spec), teacher.config) == spec  # the builder accepts it unchanged
        for key, value in spec.items():
            assert key == "kv_heads" or value in space.values[key]
    for spec in specs[:4]:  # a few are built, initialised from the teacher and run
        student = build_student(teacher, spec).eval()
        with torch.no_grad():
            out = student(**sample_inputs(student))
        assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v))


def test_space_honours_bounds_and_sets():
    teacher, _ = tiny_llama()
    space = SearchSpace.from_teacher(teacher.config, "layers=2..3,hidden=32|48,kv_heads=1")
    assert space.values["layers"] == [2, 3] and space.values["hidden"] == [32, 48] and space.values["kv_heads"] == [1]
    rng = random.Random(1)
    for _ in range(50):
        s = space.mutate(space.sample(rng), rng)
        assert s["layers"] in (2, 3) and s["hidden"] in (32, 48) and s["kv_heads"] == 1
    assert SearchSpace.from_teacher(teacher.config, "hidden=0.5").values["hidden"] == [32]  # a fraction of 64
    assert space.size() == 2 * 2 * len(space.values["intermediate"]) * 2  # 2 head counts fit each width (kv 1)


@pytest.mark.parametrize(
    "space, match",
    [
        ("hidden=128", "larger than the teacher's 64"),
        ("depth=2", "unknown --space key 'depth'"),
        ("layers=3..2", "is empty"),
        ("hidden=20..23", "holds none of the searched values"),
        ("layers=two", "not a whole number"),
    ],
)
def test_bad_space_is_refused(space, match):
    teacher, _ = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        SearchSpace.from_teacher(teacher.config, space)


def test_kv_heads_space_refused_without_gqa():
    teacher, _ = tiny_bert()
    with pytest.raises(ConfigError, match="grouped-query attention"):
        SearchSpace.from_teacher(teacher.config, "kv_heads=2")


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert_cls, tiny_vit], ids=["llama", "gpt2", "bert", "vit"])
def test_param_counter_is_exact(make):
    teacher, _ = make()
    space = SearchSpace.from_teacher(teacher.config)
    count = ParamCounter(teacher)
    rng = random.Random(2)
    for spec in [space.sample(rng) for _ in range(5)] + [space.smallest(count)]:
        assert count(spec) == sum(p.numel() for p in build_student(teacher, spec, init="random").parameters())
    smallest = space.smallest(count)
    assert all(count(space.sample(rng)) >= count(smallest) for _ in range(30))


# --------------------------------------------------------------------------------------------------------------
# Scores


def _ctx(teacher, task, batch=None, **kw):
    return ScoreContext(teacher, batch or sample_inputs(teacher, batch=4, length=12), task, **kw)


def test_similarities_on_constructed_matrices():
    a = torch.randn(6, 6, dtype=torch.float64)
    assert matrix_similarity(a, a) == pytest.approx(1.0)
    assert matrix_similarity(a, 3.0 * a) == pytest.approx(1.0)  # rows are normalised: scale does not matter
    assert matrix_similarity(a, -a) == pytest.approx(0.0)  # opposite directions: the minimum
    x = torch.randn(20, 5, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    assert linear_cka(x, x @ q) == pytest.approx(1.0)  # CKA is invariant to rotations
    assert linear_cka(x, torch.cat([x, x], 1) * 2.0) == pytest.approx(1.0)  # and to width and scale


@pytest.mark.parametrize(
    "make, task",
    [
        (tiny_llama, "causal-lm"),
        (tiny_gpt2, "causal-lm"),
        (tiny_bert, "feature-extraction"),
        (tiny_bert_cls, "sequence-classification"),
        (tiny_vit, "image-classification"),
    ],
    ids=["llama", "gpt2", "bert", "bert-cls", "vit"],
)
@pytest.mark.parametrize("relation", ["gram", "cka"])
def test_diswot_of_the_teacher_with_itself_is_the_maximum(make, task, relation):
    from distillkit.search.scores import diswot

    teacher, _ = make()
    teacher.eval().requires_grad_(False)
    ctx = _ctx(teacher, task, relation=relation)
    own = diswot(ctx, teacher)
    assert own["score"] == pytest.approx(2.0, abs=1e-9)
    assert own["semantic"] == pytest.approx(1.0, abs=1e-9) and own["relation"] == pytest.approx(1.0, abs=1e-9)
    small = build_student(teacher, {"layers": 1, "hidden": 32, "heads": 2}).eval()
    other = diswot(ctx, small)
    assert 0.0 <= other["semantic"] <= 1.0 and 0.0 <= other["relation"] <= 1.0 and other["score"] < 2.0 - 1e-6
    assert other["score"] == pytest.approx(other["semantic"] + other["relation"])


def test_diswot_prefers_the_teacher_initialised_larger_student():
    from distillkit.search.scores import diswot

    teacher, _ = tiny_llama()
    teacher.eval().requires_grad_(False)
    ctx = _ctx(teacher, "causal-lm")
    big = diswot(ctx, build_student(teacher, {"layers": 3}).eval())["score"]
    tiny = diswot(ctx, build_student(teacher, {"layers": 1, "hidden": 16, "heads": 1}).eval())["score"]
    rand = diswot(ctx, build_student(teacher, {"layers": 3}, init="random").eval())["score"]
    assert big > tiny and big > rand


@pytest.mark.parametrize(
    "make, task",
    [(tiny_llama, "causal-lm"), (tiny_bert, "feature-extraction"), (tiny_vit, "image-classification")],
    ids=["llama", "bert", "vit"],
)
def test_every_score_is_finite_and_leaves_the_model_unchanged(make, task):
    from distillkit.registry import SCORES

    teacher, _ = make()
    teacher.eval().requires_grad_(False)
    ctx = _ctx(teacher, task)
    student = build_student(teacher, {"layers": 2, "hidden": 32, "heads": 2}).eval()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    for entry in SCORES:
        result = entry.obj(ctx, student)
        assert all(math.isfinite(v) for v in result.values()), (entry.name, result)
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # synflow restores the signs exactly
    assert all(p.grad is None for p in student.parameters())


def test_params_and_flops_are_exact_counts():
    from distillkit.search.scores import flops, params

    teacher, _ = tiny_llama()
    teacher.eval().requires_grad_(False)
    batch = sample_inputs(teacher, batch=3, length=10)
    ctx = _ctx(teacher, "causal-lm", batch=batch)
    student = build_student(teacher, {"layers": 2, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64})
    assert params(ctx, student)["score"] == sum(p.numel() for p in student.parameters())
    h, kv_dim, i, v, n_layers = 32, 1 * 16, 64, 128, 2
    per_layer = h * h + 2 * h * kv_dim + h * h + 3 * h * i  # q, k, v, o, gate, up, down
    matmul_params = n_layers * per_layer + h * v  # + the LM head (the embedding lookup is free)
    tokens = 3 * 10
    assert flops(ctx, student)["score"] == 2 * tokens * matmul_params


def test_naswot_sees_duplicate_examples():
    from distillkit.search.scores import naswot

    teacher, _ = tiny_bert()
    teacher.eval().requires_grad_(False)
    batch = sample_inputs(teacher, batch=4, length=12)
    distinct = naswot(_ctx(teacher, "feature-extraction", batch=batch), teacher)["score"]
    same = {k: v[:1].repeat(4, 1) for k, v in batch.items()}
    duplicated = naswot(_ctx(teacher, "feature-extraction", batch=same), teacher)["score"]
    assert duplicated < distinct  # identical activation patterns make the kernel (nearly) singular


# --------------------------------------------------------------------------------------------------------------
# Search end to end


def test_search_is_deterministic_respects_budget_and_writes_the_best_student(llama_dir, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    manifests = []
    for name in ("a", "b"):
        code, lines, err = run(_search_args(llama_dir, text_file, tmp_path / name, "--params", "0.4"), capsys)
        assert code == 0, err
        manifests.append(json.loads(lines[0]))
    m = manifests[0]
    ranking = m["extra"]["ranking"]
    assert [r["student"] for r in ranking] == [r["student"] for r in manifests[1]["extra"]["ranking"]]
    assert [r["score"] for r in ranking] == [r["score"] for r in manifests[1]["extra"]["ranking"]]
    assert len(ranking) == 8 and len({r["student"] for r in ranking}) == 8
    assert [r["rank"] for r in ranking] == list(range(1, 9))
    assert all(a["score"] >= b["score"] for a, b in zip(ranking, ranking[1:], strict=False))
    budget = m["config"]["budget_params"]
    assert budget == int(0.4 * m["metrics"]["teacher_params"])
    assert all(r["params"] <= budget for r in ranking)
    assert m["stage"] == "search-student" and m["config"]["student"] == ranking[0]["student"]
    assert "diswot" in err and "rank" in err  # the table went to stderr

    teacher = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    expected = build_student(teacher, ranking[0]["spec"]).state_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    assert expected.keys() == reloaded.keys()
    assert all(torch.equal(expected[k], reloaded[k]) for k in expected)
    assert sum(t.numel() for t in reloaded.values()) >= m["metrics"]["student_params"]
    assert (tmp_path / "a" / "tokenizer.json").is_file() and (tmp_path / "a" / "README.md").is_file()


def test_search_output_pipes_into_distill(bert_dir, text_file, tmp_path, capsys, monkeypatch):
    code, lines, err = run(
        _search_args(bert_dir, text_file, tmp_path / "s", "--max-params", "60000", "--report", "naswot"), capsys
    )
    assert code == 0, err
    found = json.loads(lines[0])
    assert all("naswot" in r["scores"] for r in found["extra"]["ranking"])
    monkeypatch.setattr("sys.stdin", io.StringIO(lines[0] + "\n"))
    code, lines, err = run(
        [
            "distill",
            "-",
            "--teacher",
            str(bert_dir),
            "--data",
            str(text_file),
            "--steps",
            "2",
            "--max-length",
            "32",
            "--out",
            str(tmp_path / "d"),
        ],
        capsys,
    )
    assert code == 0, err
    m = json.loads(lines[0])
    assert [h["stage"] for h in m["history"]] == ["search-student"]
    assert m["inputs"]["student"]["path"] == str(tmp_path / "s")
    assert m["metrics"]["student_params"] == found["metrics"]["student_params"] <= 60000


def test_latency_budget_is_measured_and_enforced(llama_dir, text_file, tmp_path, capsys):
    code, lines, err = run(
        _search_args(llama_dir, text_file, tmp_path / "s", "--max-latency-ms", "10000", "--seq", "16"), capsys
    )
    assert code == 0, err
    ranking = json.loads(lines[0])["extra"]["ranking"]
    assert all(0 < r["latency_ms"] <= 10000 for r in ranking)


# --------------------------------------------------------------------------------------------------------------
# Errors: exit 1, one line, nothing written


def _one_line_error(code: int, err: str, out: Path) -> str:
    assert code == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert not out.exists()
    return err


def test_budget_below_the_smallest_candidate(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "s"
    code, _, err = run(_search_args(llama_dir, text_file, out, "--max-params", "1000"), capsys)
    err = _one_line_error(code, err, out)
    teacher, _ = tiny_llama()
    space = SearchSpace.from_teacher(teacher.config)
    count = ParamCounter(teacher)
    smallest = count(space.smallest(count))
    assert "below the smallest candidate" in err and f"{smallest:,} parameters" in err


def test_latency_budget_below_the_smallest_candidate(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "s"
    code, _, err = run(_search_args(llama_dir, text_file, out, "--max-latency-ms", "1e-6"), capsys)
    assert "smallest candidate" in _one_line_error(code, err, out)


def test_family_without_a_search_space(tmp_path, text_file, capsys):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    teacher_dir = tmp_path / "convnext"
    cfg = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    ConvNextForImageClassification(cfg).save_pretrained(teacher_dir)
    out = tmp_path / "s"
    code, _, err = run(_search_args(teacher_dir, text_file, out, "--params", "0.5"), capsys)
    err = _one_line_error(code, err, out)
    assert "no student search space for convnext models" in err
    assert "Llama-style" in err and "GPT-2" in err and "BERT-style" in err and "ViT" in err and "ResNet" in err


def test_data_too_small_for_one_batch(bert_dir, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("\n".join(_lines(4)))
    out = tmp_path / "s"
    code, _, err = run(_search_args(bert_dir, small, out, "--params", "0.5", "--batch-size", "8"), capsys)
    assert "fewer than one batch of 8" in _one_line_error(code, err, out)


@pytest.mark.parametrize(
    "args, match",
    [
        ([], "needs a budget"),
        (["--params", "1.5"], "in (0, 1]"),
        (["--params", "0.5", "--max-params", "10"], "both set a parameter budget"),
        (["--params", "0.5", "--score", "nope"], "unknown score 'nope'"),
        (["--params", "0.5", "--space", "hidden=999"], "larger than the teacher's"),
    ],
)
def test_bad_options_are_one_line_errors(args, match, llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "s"
    code, _, err = run(_search_args(llama_dir, text_file, out, *args), capsys)
    assert match in _one_line_error(code, err, out)


def test_config_validation_and_round_trip():
    cfg = SearchConfig(teacher="t", params=0.25, report=("params", "flops"))
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="--tournament"):
        SearchConfig(teacher="t", params=0.25, population=4, tournament=5)


def test_help_stays_torch_free_and_lists_scores():
    code = (
        "import sys\n"
        "from distillkit.cli.app import main\n"
        "assert main(['search-student', '--help']) == 0\n"
        "assert 'torch' not in sys.modules, 'search-student --help pulled in torch'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    for name in ("diswot", "params", "flops", "naswot", "gradnorm", "synflow"):
        assert name in out


def test_spec_keys_are_unique_per_candidate():
    teacher, _ = tiny_llama()
    space = SearchSpace.from_teacher(teacher.config)
    rng = random.Random(0)
    specs = {spec_key(space.sample(rng)) for _ in range(200)}
    assert len(specs) > 50  # sampling covers the space rather than collapsing onto a few candidates


def test_rank_correlations_match_hand_computed_values():
    from distillkit.search.correlation import kendall_tau, spearman_rho

    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert kendall_tau(x, x) == pytest.approx(1.0) and spearman_rho(x, x) == pytest.approx(1.0)
    assert kendall_tau(x, x[::-1]) == pytest.approx(-1.0) and spearman_rho(x, x[::-1]) == pytest.approx(-1.0)
    y = [1.0, 3.0, 2.0, 5.0, 4.0]  # two swapped pairs: 8 concordant, 2 discordant of 10
    assert kendall_tau(x, y) == pytest.approx(0.6)
    assert spearman_rho(x, y) == pytest.approx(1 - 6 * 4 / (5 * 24))  # sum d^2 = 4
    ties = [1.0, 1.0, 2.0, 3.0]  # tau-b: (5 - 0) / sqrt(5 * 6)
    assert kendall_tau(ties, [1.0, 2.0, 3.0, 4.0]) == pytest.approx(5 / math.sqrt(30))


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_spec_strings_are_what_distill_accepts(make):
    from distillkit.models.spec import parse_student_spec

    teacher, _ = make()
    space = SearchSpace.from_teacher(teacher.config)
    rng = random.Random(3)
    for _ in range(20):
        spec = space.sample(rng)
        assert parse_student_spec(space.spec_string(spec), teacher.config) == spec


def test_vocabulary_sample_estimates_the_encoder_semantic_term(monkeypatch):
    """A sentence encoder's embedding-as-head softmax over a vocabulary sample: every target kept, the normaliser
    estimated without bias, the semantic term close to the whole-vocabulary one; small vocabularies stay exact."""
    import distillkit.search.scores as scores

    teacher, _ = tiny_bert()
    teacher.eval().requires_grad_(False)
    vocab = teacher.config.vocab_size
    batch = sample_inputs(teacher, batch=4, length=12)
    students = [build_student(teacher, spec).eval() for spec in ("layers=1,hidden=32,heads=2", "layers=2")]
    exact = [scores.diswot(_ctx(teacher, "feature-extraction", batch), s)["semantic"] for s in students]

    monkeypatch.setattr(scores, "VOCAB_SAMPLE", vocab // 2)
    ctx = _ctx(teacher, "feature-extraction", batch)
    sampled = [scores.diswot(ctx, s)["semantic"] for s in students]
    columns, log_w = scores.vocabulary_sample(ctx, ctx.targets(), vocab)
    assert columns.numel() == vocab // 2 and torch.equal(columns, torch.sort(columns).values)
    assert torch.isin(ctx.targets(), columns).all()  # every target token is a column, with weight 1
    assert (log_w[torch.isin(columns, ctx.targets())] == 0).all()
    assert float(log_w.exp().sum()) == pytest.approx(vocab)  # the columns stand for the whole vocabulary
    for a, b in zip(sampled, exact, strict=True):
        assert b == pytest.approx(a, abs=0.01)
    # the normaliser estimate against the exact one, on the teacher's own logits
    view, full = ctx.teacher_view(), teacher.get_input_embeddings().weight
    z_full = view.x @ full.T
    estimate = torch.logsumexp(view.z.double() + log_w, -1)
    assert torch.allclose(estimate, torch.logsumexp(z_full.double(), -1), atol=0.1)

    monkeypatch.setattr(scores, "VOCAB_SAMPLE", vocab)  # a vocabulary that fits is taken whole: exact
    ctx = _ctx(teacher, "feature-extraction", batch)
    assert [scores.diswot(ctx, s)["semantic"] for s in students] == exact
