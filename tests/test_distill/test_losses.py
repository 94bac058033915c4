"""Distillation losses: exact values, gradients against independent references, padding, dtypes."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from distillkit.distill import functional as F
from distillkit.distill.losses import (
    Features,
    LossContext,
    resolve_layer_map,
    uniform_layer_map,
)
from distillkit.errors import ConfigError
from distillkit.registry import LOSSES

LOGIT_LOSSES = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "taid"]
FEATURE_LOSSES = ["hidden_mse", "hidden_cosine", "minilm_attention", "minilm_value"]
ALL_LOSSES = [*LOGIT_LOSSES, *FEATURE_LOSSES, "embedding_cosine"]


def build(name: str, **ctx) -> object:
    return LOSSES.get(name).obj(LossContext(**ctx))


def cfg(layers: int, width: int, heads: int, **extra) -> SimpleNamespace:
    return SimpleNamespace(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads, **extra)


# --- independent references: explicit probabilities, plain sums, no shared code ---------------


def ref_probs(z: torch.Tensor, temperature: float) -> torch.Tensor:
    e = torch.exp(z / temperature - (z / temperature).max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (torch.log(p) - torch.log(q))).sum(-1)


def ref_masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.sum() / values.numel()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum()


def ref_logit_loss(name, zs, zt, mask, temperature=1.0, beta=0.5, skew=0.1, t=0.7):
    ps, pt = ref_probs(zs, temperature), ref_probs(zt, temperature)
    if name == "forward_kl":
        per = ref_kl(pt, ps)
    elif name == "reverse_kl":
        per = ref_kl(ps, pt)
    elif name == "jsd":
        m = beta * pt + (1 - beta) * ps
        per = beta * ref_kl(pt, m) + (1 - beta) * ref_kl(ps, m)
    elif name == "tvd":
        per = 0.5 * (pt - ps).abs().sum(-1)
    elif name == "skew_kl":
        per = ref_kl(pt, skew * pt + (1 - skew) * ps)
    elif name == "skew_reverse_kl":
        per = ref_kl(ps, skew * ps + (1 - skew) * pt)
    elif name == "taid":
        target = ref_probs((1 - t) * zs.detach() + t * zt, temperature)
        per = ref_kl(target, ps)
    else:
        raise AssertionError(name)
    return ref_masked_mean(per, mask) * temperature**2


def functional_logit_loss(name, zs, zt, mask=None, temperature=1.0, beta=0.5, skew=0.1, t=0.7, **kw):
    extra = {"jsd": {"beta": beta}, "skew_kl": {"skew": skew}, "skew_reverse_kl": {"skew": skew}, "taid": {"t": t}}
    return getattr(F, name)(zs, zt, mask, temperature, **extra.get(name, {}), **kw)


def logits_batch(dtype=torch.float64, seed=0, shape=(2, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    zt = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    mask[0, -2:] = False
    mask[1, -1] = False
    return zs, zt, mask


# --- hand-computed values ------------------------------------------------------------------------

# p_T = [1/2, 1/2] (logits [0, 0]); p_S = [1/4, 3/4] (logits [0, ln 3]).
HAND_S = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
HAND_T = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
HAND = {
    "forward_kl": 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75),  # = 0.5 ln(4/3)
    "reverse_kl": 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5),
    "tvd": 0.5 * (abs(0.5 - 0.25) + abs(0.5 - 0.75)),  # = 0.25
    # M = [0.375, 0.625]
    "jsd": 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
    + 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)),
    # lambda = 0.1: M = 0.1 * p_T + 0.9 * p_S = [0.275, 0.725]
    "skew_kl": 0.5 * math.log(0.5 / 0.275) + 0.5 * math.log(0.5 / 0.725),
    # lambda = 0.1: M = 0.1 * p_S + 0.9 * p_T = [0.475, 0.525]
    "skew_reverse_kl": 0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_two_class_hand_values(name):
    loss = build(name, temperature=1.0)
    value = loss(Features(logits=HAND_S), Features(logits=HAND_T), None, progress=0.0)
    assert value.item() == pytest.approx(HAND[name], rel=1e-12)


def test_hand_values_are_the_known_numbers():
    assert HAND["forward_kl"] == pytest.approx(0.5 * math.log(4 / 3))
    assert HAND["forward_kl"] == pytest.approx(0.14384103622589045)
    assert HAND["reverse_kl"] == pytest.approx(0.75 * math.log(3) - math.log(2))  # 0.1308120...
    assert HAND["tvd"] == 0.25


def test_temperature_squared_scaling():
    # At temperature 2 the logits [0, 2 ln 3] soften to p_S = [1/4, 3/4]: the value is 4x the T=1 one.
    zs = torch.tensor([[0.0, 2 * math.log(3.0)]], dtype=torch.float64)
    value = build("forward_kl", temperature=2.0)(Features(logits=zs), Features(logits=HAND_T), None, progress=0.0)
    assert value.item() == pytest.approx(4 * 0.5 * math.log(4 / 3), rel=1e-12)
    zs, zt, mask = logits_batch()
    for name in LOGIT_LOSSES:
        at_3 = functional_logit_loss(name, zs, zt, mask, temperature=3.0)
        at_1 = functional_logit_loss(name, zs / 3, zt / 3, mask, temperature=1.0)
        torch.testing.assert_close(at_3, 9 * at_1, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_divergence_of_a_distribution_with_itself_is_zero(name):
    zs, _, mask = logits_batch()
    value = build(name, temperature=2.0)(Features(logits=zs), Features(logits=zs.clone()), mask, progress=0.3)
    assert abs(value.item()) < 1e-12


def test_reverse_kl_is_forward_kl_with_roles_swapped():
    zs, zt, mask = logits_batch()
    torch.testing.assert_close(F.reverse_kl(zs, zt, mask, 2.0), F.forward_kl(zt, zs, mask, 2.0), rtol=1e-12, atol=0)


def test_jsd_symmetric_at_half_and_bounded_by_log2():
    zs, zt, mask = logits_batch()
    torch.testing.assert_close(F.jsd(zs, zt, mask, beta=0.5), F.jsd(zt, zs, mask, beta=0.5), rtol=1e-12, atol=0)
    per = F.jsd(10 * zs, 10 * zt, beta=0.5, reduction="none")
    assert per.shape == zs.shape[:-1]
    assert (per >= 0).all() and (per <= math.log(2) + 1e-12).all()
    # Disjoint one-hot distributions reach the bound.
    far = torch.tensor([[0.0, -1e4]], dtype=torch.float64)
    assert F.jsd(far, far.flip(-1), beta=0.5).item() == pytest.approx(math.log(2), rel=1e-9)


def test_jsd_limits_are_forward_and_reverse_kl():
    zs, zt, mask = logits_batch()
    torch.testing.assert_close(F.jsd(zs, zt, mask, beta=0.0), F.forward_kl(zs, zt, mask), rtol=1e-12, atol=0)
    torch.testing.assert_close(F.jsd(zs, zt, mask, beta=1.0), F.reverse_kl(zs, zt, mask), rtol=1e-12, atol=0)
    # The endpoints are the continuous limits of jsd/beta and jsd/(1-beta), not a jump.
    eps = 1e-6
    torch.testing.assert_close(F.jsd(zs, zt, mask, beta=eps) / eps, F.forward_kl(zs, zt, mask), rtol=1e-4, atol=0)
    torch.testing.assert_close(F.jsd(zs, zt, mask, beta=1 - eps) / eps, F.reverse_kl(zs, zt, mask), rtol=1e-4, atol=0)
    for beta, expected in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        value = build("jsd", jsd_beta=beta)(Features(logits=zs), Features(logits=zt), mask, progress=0.0)
        torch.testing.assert_close(value, build(expected)(Features(logits=zs), Features(logits=zt), mask, progress=0))


def test_tvd_in_unit_interval_and_disjoint_is_one():
    zs, zt, _ = logits_batch()
    per = F.tvd(5 * zs, 5 * zt, reduction="none")
    assert (per >= 0).all() and (per <= 1).all()
    far = torch.tensor([[0.0, -1e4]], dtype=torch.float64)
    assert F.tvd(far, far.flip(-1)).item() == pytest.approx(1.0, abs=1e-12)


def test_skew_kl_with_zero_lambda_is_forward_kl():
    zs, zt, mask = logits_batch()
    torch.testing.assert_close(F.skew_kl(zs, zt, mask, 2.0, skew=0.0), F.forward_kl(zs, zt, mask, 2.0))
    torch.testing.assert_close(F.skew_reverse_kl(zs, zt, mask, 2.0, skew=0.0), F.reverse_kl(zs, zt, mask, 2.0))
    value = build("skew_kl", skew_lambda=0.0, temperature=2.0)(
        Features(logits=zs), Features(logits=zt), mask, progress=0.0
    )
    torch.testing.assert_close(value, F.forward_kl(zs, zt, mask, 2.0))


def test_zero_teacher_probability_contributes_zero():
    # Teacher [1/2, 0, 1/2], student softmax([0, 1, 0]) = [1, e, 1] / (2 + e).
    zt = torch.tensor([[0.0, -math.inf, 0.0]], dtype=torch.float64)
    zs = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    value = F.forward_kl(zs, zt)
    assert value.item() == pytest.approx(math.log((2 + math.e) / 2), rel=1e-12)
    (grad,) = torch.autograd.grad(value, zs)
    # d KL / d z_S = p_S - p_T
    expected = torch.tensor([[1, math.e, 1]], dtype=torch.float64) / (2 + math.e) - torch.tensor([[0.5, 0, 0.5]])
    torch.testing.assert_close(grad, expected.to(torch.float64))
    for name in ("skew_kl", "jsd", "tvd", "taid"):
        value = functional_logit_loss(name, zs, zt, t=1.0)
        (grad,) = torch.autograd.grad(value, zs)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), name


def test_kl_from_log_probs_ignores_log_q_where_p_is_zero():
    log_p = torch.tensor([0.0, -math.inf], dtype=torch.float64)
    log_q = torch.tensor([-0.5, -math.inf], dtype=torch.float64, requires_grad=True)
    value = F.kl_from_log_probs(log_p, log_q)
    (grad,) = torch.autograd.grad(value, log_q)
    assert value.item() == pytest.approx(0.5)
    assert grad.tolist() == [-1.0, 0.0]


# --- gradients -------------------------------------------------------------------------------

CTX = {"temperature": 2.0, "jsd_beta": 0.3, "skew_lambda": 0.1, "taid_t_start": 0.4, "taid_t_end": 1.0}


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_logit_loss_value_and_gradient_match_reference(name):
    zs, zt, mask = logits_batch()
    zs.requires_grad_(True)
    loss = build(name, **CTX)
    value = loss(Features(logits=zs), Features(logits=zt), mask, progress=0.5)
    expected = ref_logit_loss(name, zs, zt, mask, temperature=2.0, beta=0.3, skew=0.1, t=0.7)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(value, zs)
    (expected_grad,) = torch.autograd.grad(expected, zs)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_functional_teacher_gradient_matches_reference(name):
    zs, zt, mask = logits_batch(seed=1)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    value = functional_logit_loss(name, zs, zt, mask, temperature=1.5, beta=0.3, skew=0.2, t=0.6)
    expected = ref_logit_loss(name, zs, zt, mask, temperature=1.5, beta=0.3, skew=0.2, t=0.6)
    grads = torch.autograd.grad(value, (zs, zt))
    expected_grads = torch.autograd.grad(expected, (zs, zt))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_logit_gradcheck(name):
    zs, zt, mask = logits_batch(seed=2, shape=(2, 2, 3))
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    if name == "taid":
        # The target holds stopgrad(student): finite differences would see it move, autograd must not.
        assert torch.autograd.gradcheck(lambda b: F.taid(zs.detach(), b, mask, 1.7, t=0.6), (zt,))
        assert torch.autograd.gradcheck(lambda a, b: F.taid(a, b, mask, 1.7, t=1.0), (zs, zt))
        return
    assert torch.autograd.gradcheck(
        lambda a, b: functional_logit_loss(name, a, b, mask, temperature=1.7, beta=0.3, skew=0.2), (zs, zt)
    )


def test_feature_gradcheck():
    g = torch.Generator().manual_seed(3)
    a, b, c, d = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.autograd.gradcheck(lambda x, y: F.hidden_mse(x, y, mask), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: F.hidden_cosine(x, y, mask), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: F.embedding_cosine(x, y), (a[:, 0], b[:, 0]))
    assert torch.autograd.gradcheck(lambda *x: F.minilm_relation(*x, heads=2, mask=mask), (a, b, c, d))


# --- padding ------------------------------------------------------------------------------------


def scramble(x: torch.Tensor, mask: torch.Tensor, seed: int = 9) -> torch.Tensor:
    """``x`` with large random values, a NaN and an inf at every padded position."""
    noise = 50 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    noise[..., 0], noise[..., 1] = math.nan, -math.inf
    keep = mask.bool().reshape(*mask.shape, *([1] * (x.dim() - mask.dim())))
    return torch.where(keep, x, noise).detach()


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_padding_changes_neither_logit_loss_nor_gradient(name):
    zs, zt, mask = logits_batch()
    loss = build(name, **CTX)
    results = []
    for s, t in ((zs, zt), (scramble(zs, mask, 1), scramble(zt, mask, 2))):
        s = s.clone().requires_grad_(True)
        value = loss(Features(logits=s), Features(logits=t), mask.long(), progress=0.5)
        results.append((value, torch.autograd.grad(value, s)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=0)
    assert (results[0][1][~mask] == 0).all()


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_fully_masked_batch_gives_zero(name):
    zs, zt, mask = logits_batch()
    zs.requires_grad_(True)
    value = build(name, **CTX)(Features(logits=zs), Features(logits=zt), torch.zeros_like(mask), progress=0.5)
    (grad,) = torch.autograd.grad(value, zs)
    assert value.item() == 0.0
    assert (grad == 0).all()


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_bf16_inputs_computed_in_float32(name):
    zs, zt, mask = logits_batch(dtype=torch.float32)
    loss = build(name, **CTX)
    low = loss(Features(logits=zs.bfloat16()), Features(logits=zt.bfloat16()), mask, progress=0.5)
    assert low.dtype == torch.float32
    same_values = loss(
        Features(logits=zs.bfloat16().float()), Features(logits=zt.bfloat16().float()), mask, progress=0.5
    )
    torch.testing.assert_close(low, same_values, rtol=1e-6, atol=1e-7)
    full = loss(Features(logits=zs), Features(logits=zt), mask, progress=0.5)
    torch.testing.assert_close(low, full, rtol=3e-2, atol=1e-3)


def test_sequence_level_logits_without_mask():
    g = torch.Generator().manual_seed(11)
    zs, zt = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    value = build("forward_kl", temperature=2.0)(Features(logits=zs), Features(logits=zt), None, progress=0.0)
    torch.testing.assert_close(value, ref_logit_loss("forward_kl", zs, zt, None, temperature=2.0))


# --- TAID ------------------------------------------------------------------------------------------


def test_taid_schedule_and_targets():
    zs, zt, mask = logits_batch()
    loss = build("taid", temperature=2.0, taid_t_start=0.0, taid_t_end=1.0)
    # progress 0 and t_start 0: the target is the student itself.
    assert loss(Features(logits=zs), Features(logits=zt), mask, progress=0.0).item() == pytest.approx(0.0, abs=1e-12)
    assert loss.state_dict() == {"t": 0.0}
    # progress 1: the target is the teacher, i.e. forward KL at the same temperature.
    end = loss(Features(logits=zs), Features(logits=zt), mask, progress=1.0)
    torch.testing.assert_close(end, F.forward_kl(zs, zt, mask, 2.0), rtol=1e-12, atol=0)
    # Linear in progress; progress past 1 is clamped.
    default = build("taid")
    assert [default.interpolation(p) for p in (0.0, 0.5, 1.0, 1.5)] == pytest.approx([0.4, 0.7, 1.0, 1.0])
    # Halfway the target is softmax(0.5 * z_S + 0.5 * z_T).
    half = loss(Features(logits=zs), Features(logits=zt), mask, progress=0.5)
    torch.testing.assert_close(half, ref_logit_loss("taid", zs, zt, mask, temperature=2.0, t=0.5))


def test_taid_state_round_trips():
    zs, zt, mask = logits_batch()
    first = build("taid")
    first(Features(logits=zs), Features(logits=zt), mask, progress=0.25)
    assert first.state_dict() == {"t": pytest.approx(0.55)}
    resumed = build("taid")
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == first.state_dict()
    a = first(Features(logits=zs), Features(logits=zt), mask, progress=0.75)
    b = resumed(Features(logits=zs), Features(logits=zt), mask, progress=0.75)
    assert a.item() == b.item()


def test_stateless_losses_have_empty_state():
    assert build("forward_kl").state_dict() == {}
    build("forward_kl").load_state_dict({})
    with pytest.raises(ValueError):
        build("forward_kl").load_state_dict({"t": 1.0})


# --- layer maps ----------------------------------------------------------------------------------


def test_uniform_layer_map_values():
    assert uniform_layer_map(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert uniform_layer_map(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]  # 1.5, 3, 4.5, 6 rounded half up
    assert uniform_layer_map(2, 2) == [(0, 0), (1, 1)]
    assert uniform_layer_map(6, 3) == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]
    assert uniform_layer_map(1, 12) == [(0, 11)]
    assert resolve_layer_map("uniform", 3, 6) == uniform_layer_map(3, 6)
    assert resolve_layer_map(" 0:1, 2:5 ", 3, 6) == [(0, 1), (2, 5)]
    assert resolve_layer_map({0: 2}, 3, 6) == [(0, 2)]


@pytest.mark.parametrize("spec", ["0:6", "3:1", "-1:0", "a:b", "0-1", "0:1:2", "", "0:1,0:1", "1.5:2"])
def test_bad_layer_map_raises_config_error(spec):
    with pytest.raises(ConfigError) as info:
        resolve_layer_map(spec, 3, 6)
    assert "layer map" in info.value.message
    assert info.value.hint
    with pytest.raises(ConfigError):
        build("hidden_mse", student_config=cfg(3, 8, 2), teacher_config=cfg(6, 8, 2), layer_map=spec)


# --- hidden-state losses ---------------------------------------------------------------------------


def hidden_states(layers, batch, length, width, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, length, width, generator=g, dtype=torch.float64) for _ in range(layers + 1))


def test_projection_created_when_widths_differ():
    loss = build("hidden_mse", student_config=cfg(3, 16, 2), teacher_config=cfg(6, 32, 4))
    assert loss.layers() == ([0, 1, 2], [1, 3, 5])
    modules = loss.modules()
    assert sorted(modules) == ["proj_s0_t1", "proj_s1_t3", "proj_s2_t5"]
    for module in modules.values():
        assert isinstance(module, torch.nn.Linear)
        assert module.weight.shape == (32, 16)
        assert module.bias is None
    assert loss.modules()["proj_s0_t1"] is modules["proj_s0_t1"]  # stable objects for the optimizer
    same = build("hidden_cosine", student_config=cfg(3, 32, 4), teacher_config=cfg(6, 32, 4))
    assert same.modules() == {}


def test_gpt2_style_config_attribute_names():
    from transformers import GPT2Config

    student = GPT2Config(n_layer=2, n_embd=16, n_head=2)
    teacher = SimpleNamespace(n_layer=4, n_embd=24, n_head=3)
    loss = build("hidden_mse", student_config=student, teacher_config=teacher)
    assert loss.layers() == ([0, 1], [1, 3])
    assert loss.modules()["proj_s0_t1"].weight.shape == (24, 16)
    with pytest.raises(ConfigError):
        build("hidden_mse", student_config=SimpleNamespace(), teacher_config=teacher)
    with pytest.raises(ConfigError):
        build("hidden_mse")


def test_hidden_mse_hand_value_identity_projection():
    loss = build("hidden_mse", student_config=cfg(2, 4, 2), teacher_config=cfg(2, 4, 2), layer_map="1:1")
    s = tuple(torch.zeros(1, 2, 4) for _ in range(3))
    t = tuple(torch.full((1, 2, 4), float(i)) for i in range(3))  # block 1 is entry 2: all 2s
    assert loss(Features(hidden_states=s), Features(hidden_states=t), None, progress=0).item() == 4.0


def test_hidden_cosine_hand_values():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]]])
    b = torch.tensor([[[0.0, 2.0], [-2.0, -2.0], [0.0, 1.0]]])
    # orthogonal 1, opposite 2, parallel 0
    assert F.hidden_cosine(a, b).item() == pytest.approx(1.0)
    assert F.hidden_cosine(a, b, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.5)


@pytest.mark.parametrize("name", ["hidden_mse", "hidden_cosine"])
def test_hidden_loss_value_gradient_and_padding(name):
    loss = build(name, student_config=cfg(2, 6, 2), teacher_config=cfg(4, 10, 2))
    for module in loss.modules().values():
        module.double()
    s = tuple(x.requires_grad_(True) for x in hidden_states(2, 2, 5, 6, seed=4))
    t = hidden_states(4, 2, 5, 10, seed=5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    value = loss(Features(hidden_states=s), Features(hidden_states=t), mask, progress=0.0)

    expected = 0.0
    for s_block, t_block in [(0, 1), (1, 3)]:
        weight = loss.modules()[f"proj_s{s_block}_t{t_block}"].weight
        x, y = s[s_block + 1] @ weight.T, t[t_block + 1]
        if name == "hidden_mse":
            per = ((x - y) ** 2).sum(-1) / 10
        else:
            per = 1 - (x * y).sum(-1) / (x.pow(2).sum(-1).sqrt() * y.pow(2).sum(-1).sqrt())
        expected = expected + ref_masked_mean(per, mask) / 2
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    params = [s[1], s[2], *[m.weight for m in loss.modules().values()]]
    grads = torch.autograd.grad(value, params)
    for got, want in zip(grads, torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    s2 = tuple(scramble(x, mask, 7).requires_grad_(True) for x in s)
    t2 = tuple(scramble(x, mask, 8) for x in t)
    value2 = loss(Features(hidden_states=s2), Features(hidden_states=t2), mask, progress=0.0)
    torch.testing.assert_close(value2, value, rtol=1e-12, atol=0)
    grads2 = torch.autograd.grad(value2, [s2[1], s2[2]])
    for got, want in zip(grads2, grads[:2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    zero = loss(Features(hidden_states=s), Features(hidden_states=t), torch.zeros_like(mask), progress=0.0)
    assert zero.item() == 0.0


def test_hidden_cosine_zero_padding_vectors_keep_gradients_finite():
    s = torch.randn(1, 3, 4, dtype=torch.float64)
    s[0, 2] = 0
    s.requires_grad_(True)
    t = torch.randn(1, 3, 4, dtype=torch.float64)
    t[0, 2] = 0
    value = F.hidden_cosine(s, t, torch.tensor([[1, 1, 0]]))
    (grad,) = torch.autograd.grad(value, s)
    assert torch.isfinite(grad).all() and (grad[0, 2] == 0).all()


# --- MiniLM relation losses ---------------------------------------------------------------------


def ref_relation_loss(sa, sb, ta, tb, heads, mask):
    """Loops over heads; explicit softmax with padded keys removed by a -inf bias."""
    bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask.bool(), -math.inf)[:, None, :]
    per_head = []
    for r in range(heads):
        rels = []
        for a, b in ((sa, sb), (ta, tb)):
            d = a.shape[-1] // heads
            ar, br = a[..., r * d : (r + 1) * d], b[..., r * d : (r + 1) * d]
            scores = ar @ br.transpose(-1, -2) / math.sqrt(d) + bias
            e = torch.exp(scores - scores.max(-1, keepdim=True).values)
            rels.append(e / e.sum(-1, keepdim=True))
        p_s, p_t = rels
        keys = mask.bool()[:, None, :]
        one = torch.ones((), dtype=torch.float64)
        # Padded keys have p = 0 on both sides; log(1) keeps their 0 * log 0 out of the gradient.
        terms = p_t * (torch.log(torch.where(keys, p_t, one)) - torch.log(torch.where(keys, p_s, one)))
        per_head.append(ref_masked_mean(terms.sum(-1), mask))
    return sum(per_head) / heads


def qkv(batch, length, width, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, length, width, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("name", ["minilm_attention", "minilm_value"])
def test_minilm_zero_for_identical_and_positive_otherwise(name):
    loss = build(name, student_config=cfg(2, 32, 4), teacher_config=cfg(4, 32, 4))
    assert loss.layers() == ([1], [3])
    assert loss.relation_heads == 4
    assert loss.modules() == {}
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    same = qkv(2, 6, 32, seed=1)
    value = loss(Features(qkv={1: same}), Features(qkv={3: tuple(x.clone() for x in same)}), mask, progress=0)
    assert abs(value.item()) < 1e-12
    other = loss(Features(qkv={1: same}), Features(qkv={3: qkv(2, 6, 32, seed=2)}), mask, progress=0)
    assert other.item() > 1e-3


@pytest.mark.parametrize("name", ["minilm_attention", "minilm_value"])
def test_minilm_width_agnostic_value_gradient_and_padding(name):
    # student 4 heads x 16 = 64 wide, teacher 8 heads x 16 = 128 wide: gcd -> 4 relation heads.
    loss = build(name, student_config=cfg(2, 64, 4), teacher_config=cfg(3, 128, 8))
    assert loss.relation_heads == 4
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    s = tuple(x.requires_grad_(True) for x in qkv(2, 7, 64, seed=3))
    t = qkv(2, 7, 128, seed=4)
    value = loss(Features(qkv={1: s}), Features(qkv={2: t}), mask, progress=0.0)
    operands = (lambda x: (x[0], x[1])) if name == "minilm_attention" else (lambda x: (x[2], x[2]))
    expected = ref_relation_loss(*operands(s), *operands(t), 4, mask)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    assert value.item() > 0
    grads = torch.autograd.grad(value, s, allow_unused=True)
    want = torch.autograd.grad(expected, s, allow_unused=True)
    for got, ref in zip(grads, want, strict=True):
        if ref is None:
            assert got is None
        else:
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)

    s2 = tuple(scramble(x, mask, 5 + i) for i, x in enumerate(s))
    t2 = tuple(scramble(x, mask, 9 + i) for i, x in enumerate(t))
    value2 = loss(Features(qkv={1: s2}), Features(qkv={2: t2}), mask, progress=0.0)
    torch.testing.assert_close(value2, value, rtol=1e-12, atol=1e-15)
    zero = loss(Features(qkv={1: s}), Features(qkv={2: t}), torch.zeros_like(mask), progress=0.0)
    assert zero.item() == 0.0


def test_minilm_zero_across_widths_when_relations_match():
    # A teacher relation head of width 32 holding [c * a, 0] with c**2 / sqrt(32) = 1 / sqrt(16)
    # has the same scores as the student head a of width 16.
    c = 2**0.25
    s = qkv(2, 5, 64, seed=6)
    t = tuple(
        torch.cat([c * x.reshape(2, 5, 4, 16), torch.zeros(2, 5, 4, 16, dtype=x.dtype)], -1).reshape(2, 5, 128)
        for x in s
    )
    for name in ("minilm_attention", "minilm_value"):
        loss = build(name, student_config=cfg(1, 64, 4), teacher_config=cfg(1, 128, 8))
        assert abs(loss(Features(qkv={0: s}), Features(qkv={0: t}), None, progress=0).item()) < 1e-12


def test_minilm_relation_heads_validation():
    assert build("minilm_value", student_config=cfg(2, 32, 4), teacher_config=cfg(2, 48, 6)).relation_heads == 2
    explicit = build("minilm_value", student_config=cfg(2, 32, 4), teacher_config=cfg(2, 48, 6), relation_heads=8)
    assert explicit.relation_heads == 8
    with pytest.raises(ConfigError) as info:
        build("minilm_attention", student_config=cfg(2, 64, 4), teacher_config=cfg(2, 128, 8), relation_heads=3)
    assert "relation heads" in info.value.message
    # head_dim from the config wins over hidden_size / heads (e.g. Qwen3-style configs).
    wide = build("minilm_value", student_config=cfg(2, 32, 4, head_dim=12), teacher_config=cfg(2, 32, 4))
    assert wide.student_width == 48
    mapped = build("minilm_value", student_config=cfg(2, 32, 4), teacher_config=cfg(4, 32, 4), layer_map="0:1,1:3")
    assert mapped.layers() == ([0, 1], [1, 3])


# --- embedding loss ------------------------------------------------------------------------------


def test_embedding_cosine_projection_values_and_gradient():
    loss = build("embedding_cosine", student_config=cfg(2, 16, 2), teacher_config=cfg(4, 32, 4))
    proj = loss.modules()["proj"].double()
    assert proj.weight.shape == (32, 16)
    g = torch.Generator().manual_seed(7)
    s = torch.randn(3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 32, generator=g, dtype=torch.float64)
    value = loss(Features(embedding=s), Features(embedding=t), None, progress=0.0)
    x = s @ proj.weight.T
    expected = (1 - (x * t).sum(-1) / (x.norm(dim=-1) * t.norm(dim=-1))).mean()
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(
        torch.autograd.grad(value, (s, proj.weight)), torch.autograd.grad(expected, (s, proj.weight)), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    same = build("embedding_cosine", student_config=cfg(2, 8, 2), teacher_config=cfg(4, 8, 2))
    assert same.modules() == {}
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    orthogonal = torch.tensor([[0.0, 5.0], [3.0, 0.0]])
    assert same(Features(embedding=e), Features(embedding=e.clone()), None, progress=0).item() == pytest.approx(0.0)
    assert same(Features(embedding=e), Features(embedding=orthogonal), None, progress=0).item() == pytest.approx(1.0)


# --- registry and context -------------------------------------------------------------------------


def test_registry_names_kinds_and_contract():
    assert set(ALL_LOSSES) <= set(LOSSES.names())
    kinds = {name: LOSSES.get(name).meta["kind"] for name in ALL_LOSSES}
    assert {n for n, k in kinds.items() if k == "logits"} == set(LOGIT_LOSSES)
    assert {n for n, k in kinds.items() if k == "features"} == set(FEATURE_LOSSES)
    assert kinds["embedding_cosine"] == "embedding"
    allowed = {"logits", "hidden_states", "qkv", "embedding"}
    for name in LOSSES.names():
        assert LOSSES.get(name).help
        assert LOSSES.get(name).obj.needs <= allowed
    assert build("forward_kl").layers() == ([], []) and build("forward_kl").modules() == {}


def test_loss_context_validation():
    for bad in (
        {"temperature": 0.0},
        {"jsd_beta": 1.5},
        {"skew_lambda": 1.0},
        {"taid_t_end": 2.0},
        {"relation_heads": 0},
    ):
        with pytest.raises(ConfigError):
            LossContext(**bad)


def test_losses_module_imports_without_torch():
    code = (
        "import sys, distillkit.distill.losses\n"
        "from distillkit.registry import LOSSES\n"
        "assert 'forward_kl' in LOSSES.names()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
