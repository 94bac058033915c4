"""Cross-tokenizer distillation with ULD: the loss against a plain reference, and a run between two vocabularies."""

from __future__ import annotations

import json

import pytest
import torch

from distillkit.cli.app import main
from distillkit.distill.cross_tokenizer import retokenize, uld_loss
from tests.test_distill.test_engine import markov_lines
from tests.tiny import tiny_llama_other_vocab


def _uld_reference(s, t, mask, temperature):
    """Loop over positions: sort each softmax, pad with zeros, L1; mean over kept positions, times T^2."""
    total, count = 0.0, 0
    for idx in torch.nonzero(mask, as_tuple=False).tolist():
        ps = sorted(torch.softmax(s[tuple(idx)] / temperature, -1).tolist(), reverse=True)
        pt = sorted(torch.softmax(t[tuple(idx)] / temperature, -1).tolist(), reverse=True)
        n = max(len(ps), len(pt))
        ps, pt = ps + [0.0] * (n - len(ps)), pt + [0.0] * (n - len(pt))
        total += sum(abs(a - b) for a, b in zip(ps, pt, strict=True))
        count += 1
    return total / count * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_reference_values_and_gradients(temperature):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 4, 11, generator=g) * 2).double().requires_grad_(True)
    t = (torch.randn(2, 4, 17, generator=g) * 2).double()
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    value = uld_loss(s, t, mask, temperature)
    assert value.item() == pytest.approx(_uld_reference(s.detach(), t, mask, temperature), rel=1e-6)
    value.backward()
    # gradient against a differentiable torch reference (dense sort, pad, L1) and finite differences
    s2 = s.detach().clone().requires_grad_(True)
    ps = torch.softmax(s2 / temperature, -1).sort(-1, descending=True).values
    pt = torch.softmax(t / temperature, -1).sort(-1, descending=True).values
    ps = torch.cat([ps, ps.new_zeros(2, 4, 6)], -1)
    ref = ((ps - pt).abs().sum(-1) * mask).sum() / mask.sum() * temperature**2
    ref.backward()
    torch.testing.assert_close(s.grad, s2.grad)
    assert torch.all(s.grad[0, 3] == 0) and torch.all(s.grad[1, 1] == 0)  # masked positions get no gradient
    assert torch.autograd.gradcheck(lambda x: uld_loss(x, t, mask, temperature), (s.detach().requires_grad_(True),))
    # identical distributions under a relabelling of tokens are at distance 0
    perm = torch.randperm(17, generator=g)
    assert uld_loss(t[..., perm], t).item() == pytest.approx(0.0, abs=1e-12)


def test_retokenize_reads_the_same_words_in_the_other_vocabulary(gpt2, tmp_path):
    from transformers import AutoTokenizer

    _, other = tiny_llama_other_vocab(tmp_path / "s")
    s_tok, t_tok = AutoTokenizer.from_pretrained(other), AutoTokenizer.from_pretrained(gpt2[1])
    text = "the water of the house"  # "house" is unknown to the student: it stays one (unknown) word
    s_ids = torch.tensor([s_tok(text)["input_ids"] + [0, 0]])  # <s> + 5 words + 2 pads
    t_ids, t_mask = retokenize(s_ids, (s_ids != 0).long(), s_tok, t_tok)
    assert t_ids.shape == (1, 8) and t_mask.tolist() == [[1] * 5 + [0] * 3]
    unk = t_tok.unk_token_id
    expected = t_tok("the water of the <unk>", add_special_tokens=False)["input_ids"]
    assert t_ids[0, :5].tolist() == expected and expected.count(unk) == 1
    assert s_ids[0, 1:6].tolist() != t_ids[0, :5].tolist()  # the two vocabularies really differ


def test_cross_tokenizer_run_trains_and_lowers_its_loss(gpt2, tmp_path, capsys):
    _, teacher = gpt2
    _, student = tiny_llama_other_vocab(tmp_path / "student")
    data = tmp_path / "text.txt"
    data.write_text("\n".join(markov_lines(40, seed=2)))
    args = [
        "distill", "--teacher", teacher, "--student", student, "--data", str(data), "--max-length", "16",
        "--batch-size", "4", "--steps", "25", "--lr", "1e-2", "--warmup", "0", "--cross-tokenizer", "uld",
        "-T", "0.1", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    code = main(args)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    manifest = json.loads(cap.out.strip().splitlines()[-1])
    assert manifest["config"]["resolved_losses"] == [["uld", 1.0]]
    assert manifest["metrics"]["cross_tokenizer_paired_fraction"] > 0.8
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 25
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    # the student keeps its own vocabulary
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "out").vocab_size == 96


def test_cross_tokenizer_refuses_a_spec_student_and_logit_losses(gpt2, tmp_path, capsys):
    _, teacher = gpt2
    base = ["distill", "--teacher", teacher, "--steps", "1", "--cross-tokenizer", "uld", "--max-length", "16"]
    code = main([*base, "--student", "layers=1", "--out", str(tmp_path / "a")])
    assert code == 1 and "spec student shares the teacher's" in capsys.readouterr().err
    _, student = tiny_llama_other_vocab(tmp_path / "student")
    code = main([*base, "--student", student, "--loss", "forward_kl", "--out", str(tmp_path / "b")])
    assert code == 1 and "compares token ids" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
