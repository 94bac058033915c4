"""The blocked GPTQ against a plain column-by-column reference, the clip search against brute force, and the
block-by-block calibration against running the whole model for every block."""

from __future__ import annotations

import pytest
import torch

from distillkit.quantize import functional as qf
from distillkit.quantize.gptq import CLIP_GRID, HessianAccumulator, gptq_quantize, group_params


def _reference_gptq(w, H, bits, g, sym, damp, act_order):
    """GPTQ as the paper states it: one column at a time, every later column updated after each, in float64."""
    W = w.double().clone()
    o, n = W.shape
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.diag(H).clone()
    H += torch.eye(n, dtype=torch.float64) * damp * torch.mean(torch.diag(H))
    order = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(n)
    static = act_order or g == n
    scales = torch.zeros(o, n // g, dtype=torch.float64)
    zeros = torch.full((o, n // g), float(2 ** (bits - 1)), dtype=torch.float64)
    if static:
        s, z = qf.uniform_params(W, bits, g, sym)
        scales[:] = s
        if z is not None:
            zeros[:] = z
    W, H = W[:, order], H[order][:, order]
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes = torch.zeros(o, n, dtype=torch.uint8)
    for c in range(n):
        j = int(order[c])
        if not static and j % g == 0:
            s, z = qf.uniform_params(W[:, c : c + g], bits, 0, sym)
            scales[:, j // g] = s[:, 0]
            if z is not None:
                zeros[:, j // g] = z[:, 0]
        s, z = scales[:, j // g], zeros[:, j // g]
        u = torch.clamp(torch.round(W[:, c] / s) + z, 0, 2**bits - 1)
        codes[:, j] = u.to(torch.uint8)
        err = (W[:, c] - (u - z) * s) / Hinv[c, c]
        W[:, c:] -= err[:, None] * Hinv[c, c:][None, :]
    return codes, scales


def _problem(seed, o=48, n=256):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) * 0.2 + torch.eye(n, dtype=torch.float64)
    x = torch.randn(2048, n, generator=gen, dtype=torch.float64) @ mix
    x[:, 5] = 0.0  # a dead input
    x[:, 7] *= 6.0  # and a loud one, so activation order moves columns
    w = torch.randn(o, n, generator=gen, dtype=torch.float64)
    return w, 2 * x.t() @ x / len(x), x


@pytest.mark.parametrize(
    "bits,g,sym,act_order",
    [(4, 64, False, False), (4, 64, False, True), (3, 32, False, True), (4, 0, True, False), (2, 128, True, True)],
)
def test_blocked_gptq_equals_the_column_by_column_reference(bits, g, sym, act_order):
    w, H, _ = _problem(bits * 10 + g)
    st = gptq_quantize(w, H, bits=bits, group_size=g, symmetric=sym, damp=0.01, act_order=act_order)
    codes, scales = _reference_gptq(w, H, bits, qf.effective_group(w.shape[1], g), sym, 0.01, act_order)
    assert torch.equal(st.codes, codes)
    torch.testing.assert_close(st.scales.double(), scales, rtol=0, atol=0)


def test_activation_order_and_clip_search_lower_the_layer_error():
    # heavy-tailed weights and inputs whose channels differ in scale, as in trained models
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 256, generator=gen) * torch.exp(torch.randn(256, generator=gen))
    torch.manual_seed(3)
    w = torch.distributions.StudentT(3.0).sample((48, 256))
    H = 2 * x.t() @ x / len(x)

    def err(**kw):
        q = gptq_quantize(w, H, bits=4, group_size=64, symmetric=False, **kw).dequantize()
        return ((x @ w.t() - x @ q.t()) ** 2).mean().item()

    plain, better = err(), err(act_order=True, clip_search=True)
    assert better < 0.95 * plain, (better, plain)


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_picks_the_best_factor_of_the_grid(sym):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(6, 3, 32, generator=gen)
    w[0, 0, 0] = 9.0  # an outlier a shrunk range should clip
    wt = torch.rand(3, 32, generator=gen) + 0.1
    s, z = group_params(w, 4, sym, wt, clip_search=True)
    for row in range(6):
        for grp in range(3):
            x = w[row, grp]
            best = None
            for p in CLIP_GRID:
                if sym:
                    cs = qf.round_scale(x.abs().max() * p / 7)
                    cz = torch.tensor(8.0)
                else:
                    lo, hi = x.min().clamp(max=0) * p, x.max().clamp(min=0) * p
                    cs = qf.round_scale((hi - lo) / 15)
                    cz = torch.round(-lo / cs).clamp(0, 15)
                q = (torch.clamp(torch.round(x / cs) + cz, 0, 15) - cz) * cs
                e = float(((x - q) ** 2 * wt[grp]).sum())
                if best is None or e < best[0]:
                    best = (e, cs, cz)
            assert s[row, grp] == best[1]
            if not sym:
                assert z[row, grp] == best[2]
    plain_s, _ = qf.uniform_params(w.reshape(6, 96), 4, 32, sym)
    assert s[0, 0] < plain_s[0, 0]  # the outlier's group was clipped


def test_hessian_leaves_padding_out():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 16, generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    acc = HessianAccumulator(16)
    acc.add(x[:2], mask[:2])
    acc.add(x[2:], mask[2:])
    real = x[mask.bool()]
    assert acc.n == len(real)
    torch.testing.assert_close(acc.H, 2 * real.t() @ real / len(real))


def _padded_batches(seed=6, length=12, pad=(1, 9)):
    """Three batches of two random sequences; row ``pad[0]`` is padding from position ``pad[1]`` on."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(3):
        ids = torch.randint(3, 120, (2, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[pad[0], pad[1] :] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_block_by_block_calibration_equals_running_the_model_for_every_block(tmp_path, monkeypatch):
    from distillkit.models.load import load_model
    from distillkit.quantize import engine
    from distillkit.quantize.surgery import find_targets
    from tests import tiny

    _, path = tiny.tiny_llama(tmp_path / "m")
    model = load_model(path, task="causal-lm", dtype="float32", device="cpu").model.eval()
    batches = _padded_batches()
    targets = find_targets(model, (), embeddings=True)
    r = {"bits": 4, "group_size": 32, "symmetric": False}
    chains = engine._chains(model, [model.model.layers[0], model.model.layers[1]], batches[0], "cpu")
    assert chains == [True]  # decoder layers chain, so the fast path is the one compared
    fast = engine.gptq_states(model, targets, batches, r, 0.01, "cpu", act_order=True)
    monkeypatch.setattr(engine, "_chains", lambda model, blocks, batch, device: [False] * (len(blocks) - 1))
    slow = engine.gptq_states(model, targets, batches, r, 0.01, "cpu", act_order=True)
    assert fast.keys() == slow.keys()
    for name in fast:
        assert torch.equal(fast[name].codes, slow[name].codes), name
        assert torch.equal(fast[name].scales, slow[name].scales), name


def test_embedding_bits_defaults_and_refusals():
    from distillkit.errors import ConfigError
    from distillkit.quantize import QuantizeConfig

    assert QuantizeConfig(scheme="int4").resolved()["embedding_bits"] == 8
    assert QuantizeConfig(scheme="int2", embedding_bits=4).resolved()["embedding_bits"] == 4
    assert QuantizeConfig(scheme="int4", qat_steps=5, teacher="t").resolved()["embedding_bits"] == 8
    assert QuantizeConfig(scheme="int2", embedding_bits=2, qat_steps=5, teacher="t").resolved()["embedding_bits"] == 2
    assert QuantizeConfig(scheme="int3").resolved()["embedding_bits"] == 8
    with pytest.raises(ConfigError, match="not supported"):
        QuantizeConfig(scheme="int4", embedding_bits=5)
    with pytest.raises(ConfigError, match="packed schemes"):
        QuantizeConfig(scheme="dynamic-int8", embedding_bits=8)


# ----------------------------------------------------------------------------------------------------------------
# The faster paths against the plain computations they replace


def test_inverse_cholesky_factor_equals_factorising_the_inverse():
    from distillkit.quantize.gptq import _inverse_cholesky_upper, _lower_triangular_inverse

    _, H, _ = _problem(11, n=300)  # above the leaf size, so the triangular inverse recurses
    H = H + torch.eye(300, dtype=torch.float64) * 0.01 * torch.diag(H).mean()
    U = _inverse_cholesky_upper(H)
    torch.testing.assert_close(U, torch.linalg.cholesky(torch.linalg.inv(H), upper=True), rtol=1e-9, atol=1e-12)
    assert torch.equal(U, U.triu())
    L = torch.linalg.cholesky(H)
    eye = torch.eye(300, dtype=torch.float64)
    want = torch.linalg.solve_triangular(L, eye, upper=False)
    for leaf in (16, 37, 128):
        torch.testing.assert_close(_lower_triangular_inverse(L, leaf), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_in_row_chunks_equals_one_pass(sym, monkeypatch):
    from distillkit.quantize import gptq

    gen = torch.Generator().manual_seed(12)
    w = torch.randn(40, 3, 32, generator=gen)
    wt = torch.rand(3, 32, generator=gen)
    whole = group_params(w, 4, sym, wt, clip_search=True)
    monkeypatch.setattr(gptq, "_CLIP_CHUNK", 100)  # one row per chunk
    chunked = group_params(w, 4, sym, wt, clip_search=True)
    assert torch.equal(whole[0], chunked[0])
    assert (whole[1] is None) == (chunked[1] is None) and (sym or torch.equal(whole[1], chunked[1]))


@pytest.mark.parametrize("act_order,clip", [(True, True), (False, False)])
def test_stacked_weights_quantize_as_each_alone(act_order, clip):
    # rows are independent given H, which is what lets Linears with one input share a Hessian and one GPTQ call
    w, H, _ = _problem(13, o=96)
    kw = dict(bits=4, group_size=64, symmetric=False, damp=0.01, act_order=act_order, clip_search=clip)
    both = gptq_quantize(w, H, **kw)
    parts = [gptq_quantize(p, H, **kw) for p in w.split([40, 56])]
    assert torch.equal(both.codes, torch.cat([p.codes for p in parts]))
    assert torch.equal(both.scales, torch.cat([p.scales for p in parts]))
    assert torch.equal(both.zeros, torch.cat([p.zeros for p in parts]))


def test_gptq_leaves_the_thread_count_as_it_was():
    w, H, _ = _problem(14, o=8, n=64)
    n = torch.get_num_threads()
    gptq_quantize(w, H, bits=4, group_size=32, symmetric=False)
    assert torch.get_num_threads() == n


def _plain_hessians(model, block, names, inputs, masks):
    """Every Linear's own Hessian from running the whole block on every batch (no sharing, no early stop)."""
    accs = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in names}
    cur = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, _n=n: accs[_n].add(a[0], cur["mask"]))
        for n in names
    ]
    try:
        with torch.no_grad():
            for (args, kwargs), mask in zip(inputs, masks, strict=True):
                cur["mask"] = mask
                block(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {n: a.H for n, a in accs.items()}


def test_linears_reading_one_input_share_its_hessian_and_the_pass_stops_early(tmp_path):
    from distillkit.models.load import load_model
    from distillkit.quantize import engine
    from distillkit.quantize.surgery import find_targets
    from tests import tiny

    _, path = tiny.tiny_llama(tmp_path / "m")
    model = load_model(path, task="causal-lm", dtype="float32", device="cpu").model.eval()
    batches = _padded_batches()
    block = model.model.layers[1]
    stage = [t for t in find_targets(model, ()) if t.name.startswith("model.layers.1.")]
    with torch.no_grad():
        inputs = engine._block_inputs(model, block, batches, "cpu")
    masks = [b["attention_mask"] for b in batches]
    calls = []
    h = block.mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))  # the last Linear of the block
    try:
        with torch.no_grad():
            groups = engine._stage_hessians(model, block, stage, inputs, masks, "cpu")
    finally:
        h.remove()
    assert len(calls) == 1  # run on the first batch only: later batches stop once down_proj has its input
    names = [[t.name.split(".", 3)[-1] for t in members] for members, _ in groups]
    assert names == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    want = _plain_hessians(model, block, [t.name for t in stage], inputs, masks)
    for members, H in groups:
        for t in members:
            assert torch.equal(H, want[t.name]), t.name


class _TwoReaders(torch.nn.Module):
    """Two Linears on one input; from the second call on, ``b`` reads a copy unless ``always_shared``."""

    def __init__(self, always_shared: bool):
        super().__init__()
        self.a = torch.nn.Linear(8, 4)
        self.b = torch.nn.Linear(8, 4)
        self.calls = 0
        self.always_shared = always_shared

    def forward(self, x):
        self.calls += 1
        return self.a(x) + self.b(x if self.always_shared or self.calls == 1 else x * 1.0)


@pytest.mark.parametrize("always_shared", [True, False])
def test_sharing_is_checked_on_every_batch(always_shared):
    from distillkit.quantize import engine
    from distillkit.quantize.surgery import Target

    model = torch.nn.Sequential()
    model.add_module("blk", _TwoReaders(always_shared))
    gen = torch.Generator().manual_seed(15)
    inputs = [((torch.randn(3, 5, 8, generator=gen),), {}) for _ in range(3)]
    masks = [None] * 3
    stage = [Target("blk.a", "linear", 8, 4), Target("blk.b", "linear", 8, 4)]
    with torch.no_grad():
        groups = engine._stage_hessians(model, model.blk, stage, inputs, masks, "cpu")
    assert [[t.name for t in m] for m, _ in groups] == (
        [["blk.a", "blk.b"]] if always_shared else [["blk.a"], ["blk.b"]]
    )
    model.blk.calls = 0
    want = _plain_hessians(model, model.blk, ["blk.a", "blk.b"], inputs, masks)
    for members, H in groups:
        for t in members:
            torch.testing.assert_close(H, want[t.name], rtol=0, atol=0)


def test_a_pooler_chains_from_the_last_layer_and_embeddings_wait_for_their_own_bits(tmp_path, monkeypatch):
    from distillkit.models.load import load_model
    from distillkit.quantize import engine
    from distillkit.quantize.surgery import find_targets
    from tests import tiny

    _, path = tiny.tiny_bert(tmp_path / "m")
    model = load_model(path, task="feature-extraction", dtype="float32", device="cpu").model.eval()
    batches = _padded_batches(16, length=10, pad=(0, 6))
    chains = engine._chains(model, [model.encoder.layer[3], model.pooler], batches[0], "cpu")
    assert isinstance(chains[0], tuple)  # called with the last layer's output and nothing else
    targets = find_targets(model, (), embeddings=True)
    r = {"bits": 4, "group_size": 32, "symmetric": False, "embedding_bits": 8}
    fast = engine.gptq_states(model, targets, batches, r, 0.01, "cpu", act_order=True, clip_search=True)
    assert not any(t.name in fast for t in targets if t.kind == "embedding")  # the caller quantizes them at 8 bits
    monkeypatch.setattr(engine, "_chains", lambda model, blocks, batch, device: [False] * (len(blocks) - 1))
    slow = engine.gptq_states(
        model, targets, batches, {**r, "embedding_bits": 4}, 0.01, "cpu", act_order=True, clip_search=True
    )
    assert any(t.name in slow for t in targets if t.kind == "embedding")
    assert "pooler.dense" in fast
    for name in fast:
        assert torch.equal(fast[name].codes, slow[name].codes), name
        assert torch.equal(fast[name].scales, slow[name].scales), name


def test_merge_batches_regroups_right_padded_rows_by_length_and_keeps_every_token():
    from distillkit.quantize.engine import PAD_SLACK, merge_batches

    gen = torch.Generator().manual_seed(8)
    batches, rows = [], []
    for n, t in ((4, 9), (3, 20), (5, 6)):
        lengths = torch.randint(1, t + 1, (n,), generator=gen)
        lengths[0] = t
        mask = (torch.arange(t) < lengths[:, None]).long()
        ids = torch.randint(3, 99, (n, t), generator=gen) * mask
        row_id = torch.arange(len(rows), len(rows) + n)  # per row
        labels = torch.where(mask.bool(), ids, -100)  # per position, as a causal LM's
        batches.append(
            {"input_ids": ids, "attention_mask": mask, "labels": labels, "row_id": row_id, "return_loss": False}
        )
        rows += [(tuple(ids[i, : lengths[i]].tolist()), int(row_id[i])) for i in range(n)]
    merged = merge_batches(batches, max_positions=40)
    got, shapes = [], []
    for b in merged:
        m = b["attention_mask"]
        assert m.numel() <= 40 or m.shape[0] == 1
        lengths = m.sum(1)
        assert torch.equal(m.bool(), torch.arange(m.shape[1]) < lengths[:, None])  # still right-padded
        assert int(lengths.max()) == m.shape[1]  # trimmed to its longest row
        assert m.numel() <= PAD_SLACK * int(lengths.sum()) or m.shape[0] == 1
        assert b["return_loss"] is False
        assert torch.equal(b["labels"] == -100, ~m.bool())  # padding added to labels is ignored
        shapes.append((len(m), int(lengths.sum()), int(lengths.min())))
        got += [(tuple(b["input_ids"][i, : lengths[i]].tolist()), int(b["row_id"][i])) for i in range(len(m))]
    assert sorted(got) == sorted(rows)  # every row once, with its own per-row value
    # each cut was needed: the next row did not fit
    for (n, real, _), (_, _, shortest) in zip(shapes, shapes[1:], strict=False):
        assert (n + 1) * shortest > 40 or (n + 1) * shortest > PAD_SLACK * (real + shortest)
    assert len(merged) < len(rows)
    # what cannot be regrouped safely comes back as it was
    left = [{**batches[0], "attention_mask": batches[0]["attention_mask"].flip(1)}]
    assert merge_batches(left) is left
    odd = [batches[0], {**batches[1], "return_loss": True}]
    assert merge_batches(odd) is odd
    images = [{"pixel_values": torch.zeros(2, 3, 4, 4)}]
    assert merge_batches(images) is images
    features = [{**batches[0], "extra": torch.zeros(len(batches[0]["row_id"]), 3)}]  # per row, not per position
    assert merge_batches(features) is features


def test_gptq_on_merged_batches_matches_the_batches_as_given(tmp_path, monkeypatch):
    from distillkit.models.load import load_model
    from distillkit.quantize import engine
    from distillkit.quantize.surgery import find_targets
    from tests import tiny

    for build, task in ((tiny.tiny_llama, "causal-lm"), (tiny.tiny_bert, "feature-extraction")):
        _, path = build(tmp_path / task)
        model = load_model(path, task=task, dtype="float32", device="cpu").model.eval()
        batches = [b for seed in (6, 7) for b in _padded_batches(seed)]
        assert len(engine.merge_batches(batches)) < len(batches)  # there is something to merge
        targets = find_targets(model, (), embeddings=False)
        r = {"bits": 4, "group_size": 32, "symmetric": False}
        merged = engine.gptq_states(model, targets, batches, r, 0.01, "cpu", act_order=True)
        with monkeypatch.context() as mp:
            mp.setattr(engine, "merge_batches", lambda b, *a, **k: b)
            given = engine.gptq_states(model, targets, batches, r, 0.01, "cpu", act_order=True)
        for name in given:  # the same tokens: the same codes, up to float summation order at a tie
            same = (merged[name].codes == given[name].codes).float().mean().item()
            assert same > 0.999, (task, name, same)


def test_gptq_never_writes_into_the_loaded_weights_and_leaves_the_float_model(tmp_path):
    """The weights of a loaded checkpoint are not written (their pages stay the file's), and the model ends with its
    float weights, bit for bit, while the codes are those of the quantized weights set along the way."""
    from distillkit.models.load import load_model
    from distillkit.quantize import engine
    from distillkit.quantize.surgery import find_targets, weight_of
    from tests import tiny

    _, path = tiny.tiny_llama(tmp_path / "m")
    model = load_model(path, task="causal-lm", dtype="float32", device="cpu").model.eval()
    targets = [t for t in find_targets(model, (), embeddings=False) if t.kind == "linear"]
    before = {t.name: weight_of(model, t) for t in targets}
    kept = {n: (w.detach().clone(), w._version) for n, w in before.items()}
    r = {"bits": 4, "group_size": 32, "symmetric": False}
    states = engine.gptq_states(model, targets, _padded_batches(), r, 0.01, "cpu", act_order=True)
    for n, (value, version) in kept.items():
        assert before[n]._version == version, f"{n}: written in place"
        assert torch.equal(before[n], value), n
    for t in targets:
        assert torch.equal(weight_of(model, t), kept[t.name][0]), t.name  # the float model again
        assert not torch.equal(states[t.name].dequantize(torch.float32), kept[t.name][0]), t.name
