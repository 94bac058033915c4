"""The embedding-space losses (similarity_kd, contrastive_kd) against element-by-element references, values and
gradients; the held-out measures of ``--eval-data`` against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from distillkit.distill.functional import contrastive_kd, similarity_kd
from distillkit.evaluate import embedding_geometry, spearman


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def _similarity_reference(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    n, total = s.shape[0], 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total = total + (_cos(s[i], s[j]) - _cos(t[i], t[j])) ** 2
    return total / (n * (n - 1))


def _contrastive_reference(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    n, total = s.shape[0], 0.0
    for i in range(n):
        logits = torch.stack([_cos(s[i], t[j]) / tau for j in range(n)])
        total = total - (logits[i] - torch.logsumexp(logits, 0))
    return total / n


@pytest.mark.parametrize("widths", [(8, 8), (6, 10)])
def test_similarity_kd_matches_reference_values_and_gradients(widths):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, widths[0], generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, widths[1], generator=g, dtype=torch.float64)
    got = similarity_kd(s, t)
    (gs,) = torch.autograd.grad(got, s)
    s2 = s.detach().clone().requires_grad_(True)
    want = _similarity_reference(s2, t)
    (ws,) = torch.autograd.grad(want, s2)
    assert got.item() == pytest.approx(want.item(), rel=1e-10) and got.item() > 0
    assert torch.allclose(gs, ws, atol=1e-12)
    assert similarity_kd(t, t).item() == pytest.approx(0.0, abs=1e-12)


def test_contrastive_kd_matches_reference_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 8, generator=g, dtype=torch.float64)
    got = contrastive_kd(s, t, temperature=0.1)
    (gs,) = torch.autograd.grad(got, s)
    s2 = s.detach().clone().requires_grad_(True)
    want = _contrastive_reference(s2, t, 0.1)
    (ws,) = torch.autograd.grad(want, s2)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    assert torch.allclose(gs, ws, atol=1e-12)
    # a student equal to the teacher picks its own row with near certainty at a low temperature
    assert contrastive_kd(t, t, temperature=0.01).item() < 1e-3 < got.item()


def test_embedding_losses_refuse_mismatched_batches():
    with pytest.raises(ValueError):
        similarity_kd(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError):
        contrastive_kd(torch.randn(3, 4), torch.randn(3, 5))


def test_spearman_and_geometry_against_direct_computation():
    a = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.7], dtype=torch.float64)
    b = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0], dtype=torch.float64)
    assert spearman(a, b) == pytest.approx(1.0) and spearman(a, -b) == pytest.approx(-1.0)
    c = torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0], dtype=torch.float64)  # ranks 1,0,3,2,4 vs 0,2,1,4,3
    d2 = sum((x - y) ** 2 for x, y in zip([0, 2, 1, 4, 3], [1, 0, 3, 2, 4], strict=True))
    assert spearman(a, c) == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)))

    g = torch.Generator().manual_seed(2)
    t = torch.randn(12, 6, generator=g)
    same = embedding_geometry(t.clone(), t)
    assert same["spearman"] == pytest.approx(1.0) and same["nn_agreement"] == 1.0
    assert same["embedding_cosine"] == pytest.approx(1.0)
    noisy = embedding_geometry(t + 0.8 * torch.randn(12, 6, generator=g), t)

    # nearest neighbours by hand
    def nn(x: torch.Tensor) -> list[int]:
        x = torch.nn.functional.normalize(x.double(), dim=-1)
        out = []
        for i in range(x.shape[0]):
            sims = [(float(x[i] @ x[j]), j) for j in range(x.shape[0]) if j != i]
            out.append(max(sims)[1])
        return out

    s = t + 0.8 * torch.randn(12, 6, generator=torch.Generator().manual_seed(99))
    m = embedding_geometry(s, t)
    assert m["nn_agreement"] == pytest.approx(sum(a == b for a, b in zip(nn(s), nn(t), strict=True)) / 12)
    assert 0 < noisy["spearman"] < 1 and math.isfinite(noisy["embedding_cosine"])
    assert "embedding_cosine" not in embedding_geometry(torch.randn(12, 4), t)  # widths differ
