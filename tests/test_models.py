"""Model core: padding, a_cd (Eq. 5 / Eq. 13), AutoCDSR⁺ isolation and causality, retrieval, parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autocdsr.data.batching import TrainBatcher, cloze_batch, layout_plan, sasrec_batch
from autocdsr.models import ModelConfig, build_model
from autocdsr.models.attention import a_cd_from_maps
from autocdsr.models.ib import PLAN_KEY, LayoutPlan

V, D, MAX_LEN = 60, 3, 24
ITEM_DOMAIN = torch.tensor([0] + [1 + (i - 1) // (V // D) for i in range(1, V + 1)])  # contiguous ranges
BACKBONES = ["sasrec", "bert4rec"]


def make_model(
    backbone: str, ib: bool = False, exchange: bool = True, seed: int = 0, ib_tokens: int = 2, **kw
) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        backbone=backbone, num_items=V, num_domains=D, max_len=MAX_LEN, d_model=16, n_layers=2, n_heads=2,
        dropout=0.0, ib=ib, num_ib_tokens=ib_tokens, ib_exchange=exchange, **kw,
    )  # fmt: skip
    model = build_model(cfg, ITEM_DOMAIN)
    # random (not ~0.02) LayerNorm/bias parameters so that every path visibly carries signal
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def random_sequence(
    rng: np.random.Generator, length: int, switch: float = 0.35
) -> tuple[np.ndarray, np.ndarray]:
    """Items with runs of domains, as stitched cross-domain sequences have."""
    doms = np.empty(length, dtype=np.int64)
    d = rng.integers(1, D + 1)
    for t in range(length):
        if rng.random() < switch:
            d = rng.integers(1, D + 1)
        doms[t] = d
    items = (doms - 1) * (V // D) + rng.integers(1, V // D + 1, size=length)
    return items, doms


def inputs(backbone: str, items: list[np.ndarray], doms: list[np.ndarray], width: int | None = None) -> dict:
    """A forward batch with every position a target (SASRec) or unmasked (BERT4Rec), left-padded to width."""
    width = width or max(len(s) for s in items)
    it = torch.zeros(len(items), width, dtype=torch.long)
    dm = torch.zeros_like(it)
    for b, (s, d) in enumerate(zip(items, doms, strict=True)):
        it[b, width - len(s) :] = torch.as_tensor(s)
        dm[b, width - len(s) :] = torch.as_tensor(d)
    batch = {"item_idx": it, "domain_idx": dm, "target_idx": it.clone()}
    if backbone == "sasrec":
        # next-domain tags held fixed as an input: the domain of the next position (or domain 1 at the end)
        nxt = torch.cat([dm[:, 1:], torch.ones_like(dm[:, :1])], dim=1)
        batch["target_domain"] = nxt * (it != 0)
    return batch


def hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).hidden


# -- padding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ib", [False, True])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_padding_never_influences_outputs(backbone, ib):
    rng = np.random.default_rng(1)
    model = make_model(backbone, ib)
    a, da = random_sequence(rng, 9)
    b, db = random_sequence(rng, 17)
    alone = model(inputs(backbone, [a], [da]))
    batch = inputs(backbone, [a, b], [da, db], width=20)
    # garbage domain tags on padding positions: padding is item 0, whatever else the slot holds
    batch["domain_idx"][0, :11] = torch.as_tensor(rng.integers(1, D + 1, size=11))
    together = model(batch)
    torch.testing.assert_close(together.hidden[0, -9:], alone.hidden[0], atol=2e-5, rtol=1e-5)
    assert torch.isfinite(together.hidden).all()
    # a_cd is a mean over valid rows: adding padding to a sequence leaves it unchanged
    padded = model(inputs(backbone, [a], [da], width=MAX_LEN))
    torch.testing.assert_close(padded.a_cd, alone.a_cd, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(padded.hidden[0, -9:], alone.hidden[0], atol=2e-5, rtol=1e-5)


# -- a_cd (Eq. 5) -----------------------------------------------------------------------------------------


def a_cd_by_hand(
    maps: list[torch.Tensor], domain_idx: torch.Tensor, valid: torch.Tensor, own: torch.Tensor | None = None
) -> float:
    """Eq. 5 with explicit loops: cross-domain attention mass per valid query row, averaged. ``own``: each
    query row's domain, when it is not its item's."""
    own = domain_idx if own is None else own
    total, rows = 0.0, 0
    for m in maps:
        B, H, L, _ = m.shape
        for b in range(B):
            for h in range(H):
                for i in range(L):
                    if not valid[b, i]:
                        continue
                    rows += 1
                    for j in range(L):
                        if valid[b, j] and domain_idx[b, j] != own[b, i]:
                            total += float(m[b, h, i, j])
    return total / rows


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_cd_weighted_by_the_query_rows_domain(backbone):
    """cd_query_weights: each query row's cross-domain mass counts with its own domain's weight (the mean
    still over all valid rows); value and gradient match the explicit attention maps, the forward pass is
    unchanged, weights of 1 are Eq. 5 itself, and the training config resolves weights by domain name."""
    rng = np.random.default_rng(5)
    seqs = [random_sequence(rng, n, switch=0.5) for n in (10, 13)]
    batch = inputs(backbone, [s for s, _ in seqs], [d for _, d in seqs])
    weights = tuple(float(w) for w in rng.uniform(0.0, 2.0, size=D))
    plain, weighted = make_model(backbone), make_model(backbone, cd_query_weights=weights)
    out_p, out_w = plain(batch), weighted(batch)
    torch.testing.assert_close(out_w.hidden, out_p.hidden)
    torch.testing.assert_close(make_model(backbone, cd_query_weights=(1.0,) * D)(batch).a_cd, out_p.a_cd)
    valid, dom = batch["item_idx"] != 0, batch["domain_idx"]
    maps = weighted._encode_batch(batch, need_a_cd=False, return_maps=True).maps
    # by hand: Σ over layers, heads, rows of w[d(row)] · mass on other domains' keys, over (rows · heads · layers)
    w = torch.tensor((0.0, *weights))
    cross = (dom[:, :, None] != dom[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    by_hand = sum((m.detach() * cross[:, None] * w[dom][:, None, :, None]).sum() for m in maps)
    by_hand = by_hand / (valid.sum() * maps[0].shape[1] * len(maps))
    assert out_w.a_cd.item() == pytest.approx(float(by_hand), rel=1e-4, abs=1e-6)
    assert abs(out_w.a_cd.item() - out_p.a_cd.item()) > 0.01
    shared = list(weighted.shared_parameters())
    fused = torch.autograd.grad(out_w.a_cd, shared, materialize_grads=True)
    explicit = torch.autograd.grad(
        a_cd_from_maps(maps, dom, valid, query_weights=weights), shared, materialize_grads=True
    )
    for g1, g2 in zip(fused, explicit, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-3)
    # only domain 1's rows count: a_cd is their mass alone
    only_first = (1.0,) + (0.0,) * (D - 1)
    first = sum((m.detach() * cross[:, None] * (dom == 1)[:, None, :, None]).sum() for m in maps)
    first = first / (valid.sum() * maps[0].shape[1] * len(maps))
    assert make_model(backbone, cd_query_weights=only_first)(batch).a_cd.item() == pytest.approx(
        float(first), rel=1e-4, abs=1e-6
    )
    with pytest.raises(ValueError, match="cd_query_weights"):
        make_model(backbone, cd_query_weights=(1.0,) * (D - 1))
    with pytest.raises(ValueError, match="cd_query_weights"):
        make_model(backbone, ib=True, cd_query_weights=(1.0,) * D)
    # from a training config, by domain name; a domain not named weighs 1
    from autocdsr.config import ConfigError, load_train_config

    names = [f"dom{i}" for i in range(1, D + 1)]
    cfg = load_train_config(None, ["method=cd+autocdsr", "model.cd_query_weights={dom2: 0, dom1: 0.5}"])
    assert cfg.model_config(V, D, names).cd_query_weights == (0.5, 0.0) + (1.0,) * (D - 2)
    with pytest.raises(ConfigError, match=r"unknown domain\(s\) \['dom9'\]"):
        load_train_config(None, ["model.cd_query_weights={dom9: 1}"]).model_config(V, D, names)
    with pytest.raises(ConfigError, match="domain names"):
        cfg.model_config(V, D)
    with pytest.raises(ConfigError, match="every domain weighs 0"):
        load_train_config(
            None, [f"model.cd_query_weights={{{', '.join(f'{n}: 0' for n in names)}}}"]
        ).model_config(V, D, names)
    with pytest.raises(ConfigError, match=r"finite and >= 0"):
        load_train_config(None, ["model.cd_query_weights={dom1: -1}"])
    with pytest.raises(ConfigError, match=r"cd_query_weights .*method=cd\+autocdsr_plus"):
        load_train_config(None, ["method=cd+autocdsr_plus", "model.cd_query_weights={dom1: 0}"])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_cd_averaged_over_query_domains(backbone):
    """cd_query_average="domains": a_cd is the mean over the batch's query domains of each domain's mean
    cross-domain mass per row (Eq. 5 averages rows alike); value by hand from the attention maps, gradient
    against the explicit computation, forward pass unchanged, a domain without query rows left out of the
    mean, 0 for single-domain input, combined with cd_query_weights, and the refusals."""
    rng = np.random.default_rng(11)
    seqs = [random_sequence(rng, n, switch=0.3) for n in (9, 16, 12)]
    batch = inputs(backbone, [s for s, _ in seqs], [d for _, d in seqs])
    plain, balanced = make_model(backbone), make_model(backbone, cd_query_average="domains")
    out_p, out_b = plain(batch), balanced(batch)
    torch.testing.assert_close(out_b.hidden, out_p.hidden)
    valid, dom = batch["item_idx"] != 0, batch["domain_idx"]
    maps = balanced._encode_batch(batch, need_a_cd=False, return_maps=True).maps
    cross = (dom[:, :, None] != dom[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    per_row = sum((m.detach() * cross[:, None]).sum(dim=(1, 3)) for m in maps) / (
        maps[0].shape[1] * len(maps)
    )
    present = [q for q in range(1, D + 1) if bool(((dom == q) & valid).any())]
    by_hand = sum(float(per_row[(dom == q) & valid].mean()) for q in present) / len(present)
    assert out_b.a_cd.item() == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
    assert out_p.a_cd.item() == pytest.approx(float(per_row[valid].mean()), rel=1e-4, abs=1e-6)
    assert abs(out_b.a_cd.item() - out_p.a_cd.item()) > 1e-3  # unequal domain counts: not Eq. 5's mean
    shared = list(balanced.shared_parameters())
    fused = torch.autograd.grad(out_b.a_cd, shared, materialize_grads=True)
    explicit = torch.autograd.grad(
        a_cd_from_maps(maps, dom, valid, average="domains"), shared, materialize_grads=True
    )
    for g1, g2 in zip(fused, explicit, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-3)
    # with per-domain weights as well: (1/P) Σ_q w_q · (domain q's row mean)
    weights = tuple(float(w) for w in rng.uniform(0.5, 2.0, size=D))
    both = make_model(backbone, cd_query_average="domains", cd_query_weights=weights)(batch).a_cd
    expected = sum(weights[q - 1] * float(per_row[(dom == q) & valid].mean()) for q in present) / len(present)
    assert both.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # two domains only: the third has no query rows and does not count as a zero in the mean
    two = [np.where(d == 3, 1, d) for _, d in seqs]
    batch2 = inputs(backbone, [s for s, _ in seqs], two)
    dom2 = batch2["domain_idx"]
    maps2 = balanced._encode_batch(batch2, need_a_cd=False, return_maps=True).maps
    cross2 = (dom2[:, :, None] != dom2[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    row2 = sum((m.detach() * cross2[:, None]).sum(dim=(1, 3)) for m in maps2) / (
        maps2[0].shape[1] * len(maps2)
    )
    expected2 = (float(row2[(dom2 == 1) & valid].mean()) + float(row2[(dom2 == 2) & valid].mean())) / 2
    assert balanced(batch2).a_cd.item() == pytest.approx(expected2, rel=1e-4, abs=1e-6)
    one = [np.ones_like(d) for _, d in seqs]
    assert balanced(inputs(backbone, [s for s, _ in seqs], one)).a_cd.item() == 0.0
    with pytest.raises(ValueError, match="cd_query_average"):
        make_model(backbone, cd_query_average="heads")
    with pytest.raises(ValueError, match="cd_query_average"):
        make_model(backbone, ib=True, cd_query_average="domains")
    from autocdsr.config import ConfigError, load_train_config

    cfg = load_train_config(None, ["method=cd+autocdsr", "model.cd_query_average=domains"])
    assert cfg.model_config(V, D).cd_query_average == "domains"
    with pytest.raises(ConfigError, match="cd_query_average must be one of rows, domains"):
        load_train_config(None, ["model.cd_query_average=heads"])
    with pytest.raises(ConfigError, match=r"cd_query_average .*method=cd\+autocdsr_plus"):
        load_train_config(None, ["method=cd+autocdsr_plus", "model.cd_query_average=domains"])
    with pytest.raises(ConfigError, match="cd_query_average=rows"):
        load_train_config(
            None, ["method=cd+autocdsr", "model.cd_query_average=domains", "autocdsr.gate.enabled=true"]
        )


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_cd_equals_direct_computation_from_attention_maps(backbone):
    rng = np.random.default_rng(2)
    model = make_model(backbone)
    seqs = [random_sequence(rng, n) for n in (7, 12)]
    batch = inputs(backbone, [s for s, _ in seqs], [d for _, d in seqs])
    maps = model.attention_maps(batch)
    valid = batch["item_idx"] != 0
    # the maps are proper attention: rows sum to 1, nothing on padding, nothing on the future for SASRec
    for m in maps:
        torch.testing.assert_close(
            m.sum(-1)[valid[:, None].expand_as(m[..., 0])], torch.ones(int(valid.sum()) * 2)
        )
        assert (m[~valid[:, None, None, :].expand_as(m)] == 0).all()
        if backbone == "sasrec":
            assert (m.triu(1) == 0).all()
    expected = a_cd_by_hand(maps, batch["domain_idx"], valid)
    a_cd = model(batch).a_cd
    assert 0.05 < expected < 0.95
    assert a_cd.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert a_cd_from_maps(maps, batch["domain_idx"], valid).item() == pytest.approx(expected, rel=1e-4)


def test_sasrec_a_cd_against_the_predicted_domain():
    """cd_query_domain="target": a SASRec position counts attention outside the domain it predicts (its
    next-domain tag), not outside its item's; the forward pass is the same model's, only a_cd changes,
    and the fused value and gradient match the explicit attention maps."""
    rng = np.random.default_rng(12)
    seqs = [random_sequence(rng, n, switch=0.6) for n in (9, 14)]
    batch = inputs("sasrec", [s for s, _ in seqs], [d for _, d in seqs])
    batch["target_domain"][0, -1] = 0  # a valid position with nothing to predict keeps its item's domain
    as_written, by_target = make_model("sasrec"), make_model("sasrec", cd_query_domain="target")
    out_w, out_t = as_written(batch), by_target(batch)
    torch.testing.assert_close(out_t.hidden, out_w.hidden)
    valid = batch["item_idx"] != 0
    own = torch.where(batch["target_domain"] > 0, batch["target_domain"], batch["domain_idx"])
    assert (own != batch["domain_idx"])[valid].float().mean() > 0.15  # transitions: the definitions differ
    maps = by_target.attention_maps(batch)
    expected = a_cd_by_hand(maps, batch["domain_idx"], valid, own)
    assert out_t.a_cd.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert abs(out_w.a_cd.item() - expected) > 0.02
    shared = list(by_target.shared_parameters())
    fused = torch.autograd.grad(out_t.a_cd, shared, materialize_grads=True)
    maps = by_target._encode_batch(batch, need_a_cd=False, return_maps=True).maps
    explicit = torch.autograd.grad(
        a_cd_from_maps(maps, batch["domain_idx"], valid, own), shared, materialize_grads=True
    )
    for g1, g2 in zip(fused, explicit, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-3)
    # one domain throughout: nothing is cross-domain under either definition
    one = inputs("sasrec", [seqs[0][0] * 0 + 5], [np.ones(9, dtype=np.int64)])
    assert by_target(one).a_cd.item() == 0.0
    # BERT4Rec's masked queries carry their target's domain already: the same a_cd either way
    cloze = inputs("bert4rec", [s for s, _ in seqs], [d for _, d in seqs])
    torch.testing.assert_close(
        make_model("bert4rec", cd_query_domain="target")(cloze).a_cd, make_model("bert4rec")(cloze).a_cd
    )
    with pytest.raises(ValueError, match="cd_query_domain"):
        make_model("sasrec", ib=True, cd_query_domain="target")
    # from a training config: the model gets the key; AutoCDSR⁺ and unknown values are refused by name
    from autocdsr.config import ConfigError, load_train_config

    cfg = load_train_config(None, ["method=cd+autocdsr", "model.cd_query_domain=target"])
    assert cfg.model_config(V, D).cd_query_domain == "target"
    with pytest.raises(ConfigError, match=r"cd_query_domain=target .*method=cd\+autocdsr_plus"):
        load_train_config(None, ["method=cd+autocdsr_plus", "model.cd_query_domain=target"])
    with pytest.raises(ConfigError, match=r"model\.cd_query_domain must be"):
        load_train_config(None, ["model.cd_query_domain=output"])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_cd_gradient_matches_explicit_attention(backbone):
    """The fused a_cd (one-hot value columns through SDPA) has the gradient of the explicit Eq. 5."""
    rng = np.random.default_rng(3)
    model = make_model(backbone)
    seqs = [random_sequence(rng, n) for n in (6, 10)]
    batch = inputs(backbone, [s for s, _ in seqs], [d for _, d in seqs])
    shared = list(model.shared_parameters())
    # the last block's FFN is upstream of no attention, hence materialize_grads
    fused = torch.autograd.grad(model(batch).a_cd, shared, materialize_grads=True)
    out = model._encode_batch(batch, need_a_cd=False, return_maps=True)
    explicit_a_cd = a_cd_from_maps(out.maps, batch["domain_idx"], batch["item_idx"] != 0)
    explicit = torch.autograd.grad(explicit_a_cd, shared, materialize_grads=True)
    assert any(g.abs().sum() > 0 for g in fused)
    for g1, g2 in zip(fused, explicit, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("ib", [False, True])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_cd_is_zero_for_single_domain_sequences(backbone, ib):
    rng = np.random.default_rng(4)
    model = make_model(backbone, ib=False)
    items = [rng.integers(1, V // D + 1, size=n) for n in (5, 11)]  # domain 1 only
    batch = inputs(backbone, items, [np.ones_like(s) for s in items])
    assert model(batch).a_cd.item() == pytest.approx(0.0, abs=1e-7)
    if ib:  # AutoCDSR⁺'s a_cd (Eq. 13) is mass on IB tokens, so it is not zero there; it is a fraction
        a_cd = make_model(backbone, ib=True)(batch).a_cd.item()
        assert 0.0 < a_cd < 1.0


def test_fast_path_without_a_cd_gives_the_same_outputs():
    rng = np.random.default_rng(5)
    model = make_model("sasrec")
    seqs = [random_sequence(rng, n) for n in (8, 13)]
    batch = inputs("sasrec", [s for s, _ in seqs], [d for _, d in seqs])
    with torch.no_grad():
        a, b = model(batch, need_a_cd=True), model(batch, need_a_cd=False)
    assert b.a_cd is None
    torch.testing.assert_close(a.hidden, b.hidden, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss_rec, b.loss_rec)


# -- AutoCDSR⁺ ------------------------------------------------------------------------------------------


def perturb_domain_item(rng, items, doms, domain) -> np.ndarray:
    """A copy of ``items`` with one item of ``domain`` replaced by another item of the same domain."""
    out = items.copy()
    j = rng.choice(np.flatnonzero(doms == domain))
    lo = (domain - 1) * (V // D) + 1
    out[j] = lo + (out[j] - lo + 1 + rng.integers(0, V // D - 1)) % (V // D)
    assert out[j] != items[j] and ITEM_DOMAIN[out[j]] == domain
    return out


@pytest.mark.parametrize("backbone", BACKBONES)
def test_ib_domains_exchange_only_through_ib_tokens(backbone):
    rng = np.random.default_rng(6)
    items, doms = random_sequence(rng, 20)
    while len(np.unique(doms)) < 3:
        items, doms = random_sequence(rng, 20)
    changed = perturb_domain_item(rng, items, doms, domain=2)
    other = doms != 2
    if backbone == "sasrec":
        # causality aside (tested below), compare positions after the first domain-2 item
        other &= np.arange(len(doms)) > np.flatnonzero(doms == 2)[0]
    base_batch, pert_batch = inputs(backbone, [items], [doms]), inputs(backbone, [changed], [doms])

    isolated = make_model(backbone, ib=True, exchange=False)
    h0, h1 = hidden(isolated, base_batch)[0], hidden(isolated, pert_batch)[0]
    assert torch.equal(h0[torch.as_tensor(other)], h1[torch.as_tensor(other)])  # not a single bit moves
    assert (h0[torch.as_tensor(doms == 2)] - h1[torch.as_tensor(doms == 2)]).abs().max() > 1e-3

    exchanging = make_model(backbone, ib=True, exchange=True)
    h0, h1 = hidden(exchanging, base_batch)[0], hidden(exchanging, pert_batch)[0]
    assert (h0[torch.as_tensor(other)] - h1[torch.as_tensor(other)]).abs().amax(-1).min() > 1e-5


@pytest.mark.parametrize(("ib", "exchange"), [(False, True), (True, False), (True, True)])
def test_sasrec_changing_item_j_never_changes_earlier_positions(ib, exchange):
    rng = np.random.default_rng(7)
    model = make_model("sasrec", ib=ib, exchange=exchange)
    items, doms = random_sequence(rng, 22)
    base = inputs("sasrec", [items], [doms])
    h0 = hidden(model, base)[0]
    for j in (0, 5, 11, 12, 21):
        for new_dom in range(1, D + 1):  # the item at j changes, possibly its domain too
            batch = {k: v.clone() for k, v in base.items()}
            batch["item_idx"][0, j] = (new_dom - 1) * (V // D) + 1 + (j % (V // D))
            batch["domain_idx"][0, j] = new_dom
            if batch["item_idx"][0, j] == base["item_idx"][0, j]:
                continue
            h1 = hidden(model, batch)[0]
            torch.testing.assert_close(h1[:j], h0[:j], atol=2e-5, rtol=1e-5)
            assert (h1[j] - h0[j]).abs().max() > 1e-4


class ReferenceLayout:
    """The paper's way (App. A.2): one explicit [n, n] mask over all item and IB tokens of a sequence."""

    def __init__(self, allowed: torch.Tensor, n_heads: int, item_rows: torch.Tensor, ib_cols: torch.Tensor):
        self.allowed, self.H, self.item_rows, self.ib_cols = allowed, n_heads, item_rows, ib_cols

    def attend(self, qkv):
        n = qkv.shape[0]
        q, k, v = qkv.view(n, 3, self.H, -1).permute(1, 2, 0, 3)
        p = (
            (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
            .masked_fill(~self.allowed, float("-inf"))
            .softmax(-1)
        )
        mass = p[:, self.item_rows][:, :, self.ib_cols].sum()  # Eq. 13: item rows -> IB columns
        return (p @ v).transpose(0, 1).reshape(n, -1), mass


def reference_ib(model, items: np.ndarray, doms: np.ndarray) -> tuple[torch.Tensor, float, int]:
    """AutoCDSR⁺ for one unpadded sequence with explicit masks: (hidden [L, d], Σ item->IB mass, rows)."""
    cfg, enc = model.cfg, model.encoder
    T, L, d = cfg.num_ib_tokens, len(items), cfg.d_model
    it, dm = torch.as_tensor(items)[None], torch.as_tensor(doms)[None]
    x = model.item_emb(it) + model.domain_emb(dm) + model.pos_emb(torch.arange(cfg.max_len - L, cfg.max_len))
    if cfg.causal:
        nxt = torch.cat([dm[:, 1:], torch.ones_like(dm[:, :1])], 1)
        x = x + model.next_domain_emb(nxt)
    x = model.input_norm(x)[0]
    same = torch.as_tensor(doms[:, None] == doms[None, :])
    if cfg.causal:
        run = np.cumsum(np.r_[True, doms[1:] != doms[:-1]]) - 1
        groups = [(int(doms[run == r][0]), int(np.flatnonzero(run == r)[-1])) for r in range(run[-1] + 1)]
    else:
        groups = [(int(dd), L - 1) for dd in np.unique(doms)]
    G = len(groups)
    n = L + G * T
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:L, :L] = same & (torch.ones(L, L).tril().bool() if cfg.causal else True)
    for g, (dd, last) in enumerate(groups):
        cols = slice(L + g * T, L + (g + 1) * T)
        allowed[cols, cols] = True
        allowed[cols, :L] = torch.as_tensor(doms == dd) & (torch.arange(L) <= last)
        members = (run == g) if cfg.causal else (doms == dd)
        allowed[
            torch.as_tensor(members).nonzero().squeeze(1)[:, None], torch.arange(L + g * T, L + (g + 1) * T)
        ] = True
    layout = ReferenceLayout(allowed, cfg.n_heads, torch.arange(L), torch.arange(L, n))
    initial = model.input_norm(enc.ib_tokens(torch.as_tensor([dd for dd, _ in groups])).view(G * T, d))
    ib, total = initial, 0.0
    for i, block in enumerate(enc.blocks):
        h, mass = block(torch.cat([x, ib]), layout)
        x, out = h[:L], h[L:].view(G, T, d)
        total += float(mass)
        if i + 1 == len(enc.blocks):
            break
        new = []
        for g, (dd, _) in enumerate(groups):
            if not cfg.causal:
                new.append(out.sum(0) if cfg.ib_exchange else out[g])
                continue
            # runs that ended before run g began: the latest per domain (exchange) or of its own domain
            latest = {}
            for g2 in range(g):
                latest[groups[g2][0]] = g2
            srcs = list(latest.values()) if cfg.ib_exchange else [latest[dd]] if dd in latest else []
            new.append(sum(out[s] for s in srcs) if srcs else initial.view(G, T, d)[g])
        ib = torch.stack(new).view(G * T, d)
    return enc.ln_final(x), total, L


@pytest.mark.parametrize("ib_tokens", [1, 2])
@pytest.mark.parametrize("exchange", [False, True])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_ib_packed_attention_equals_masked_full_attention(backbone, exchange, ib_tokens):
    """Packed block-diagonal attention with sink keys = the paper's masked full-length formulation, for the
    hidden states and for a_cd (Eq. 13), on a batch whose rows fall into several length buckets."""
    rng = np.random.default_rng(8)
    model = make_model(backbone, ib=True, exchange=exchange, ib_tokens=ib_tokens)
    seqs = [random_sequence(rng, n, switch=s) for n, s in ((23, 0.1), (6, 0.5), (15, 0.3), (1, 0.3))]
    batch = inputs(backbone, [s for s, _ in seqs], [d for _, d in seqs])
    with torch.no_grad():
        out = model(batch)
        total, rows = 0.0, 0
        for b, (s, dd) in enumerate(seqs):
            h_ref, mass, n_rows = reference_ib(model, s, dd)
            torch.testing.assert_close(out.hidden[b, -len(s) :], h_ref, atol=5e-5, rtol=1e-4)
            total, rows = total + mass, rows + n_rows
    expected = total / (rows * model.cfg.n_heads * model.cfg.n_layers)
    assert 0.0 < expected < 1.0
    assert out.a_cd.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("ib_tokens", [1, 2])
@pytest.mark.parametrize("exchange", [False, True])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_ib_packed_attention_gradients_equal_masked_full_attention(backbone, exchange, ib_tokens):
    """The packed layout's gathers, scatters and sink columns backpropagate like the paper's masked
    formulation: the same parameter gradients for the same loss on the hidden states."""
    rng = np.random.default_rng(9)
    model = make_model(backbone, ib=True, exchange=exchange, ib_tokens=ib_tokens)
    seqs = [random_sequence(rng, n, switch=s) for n, s in ((22, 0.15), (7, 0.5), (14, 0.3))]
    batch = inputs(backbone, [s for s, _ in seqs], [d for _, d in seqs])
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(len(s), model.cfg.d_model, generator=gen) for s, _ in seqs]
    params = [p for p in model.parameters() if p.requires_grad]

    hidden_states = model(batch).hidden
    loss = sum(
        (hidden_states[b, -len(s) :] * w).sum()
        for b, ((s, _), w) in enumerate(zip(seqs, weights, strict=True))
    )
    loss_ref = sum(
        (reference_ib(model, s, dd)[0] * w).sum() for (s, dd), w in zip(seqs, weights, strict=True)
    )
    packed = torch.autograd.grad(loss, params, allow_unused=True)
    reference = torch.autograd.grad(loss_ref, params, allow_unused=True)
    for g, g_ref in zip(packed, reference, strict=True):
        assert (g is None) == (g_ref is None)
        if g is not None:
            torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("ib_tokens", [1, 2])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_ib_plan_from_the_data_path_gives_identical_outputs_and_gradients(backbone, ib_tokens):
    """A batch from `TrainBatcher` with ``ib_plan`` carries the encoder's packing plan, built from the host
    arrays; the model then uses it instead of planning itself. Loss, a_cd, hidden states and every
    gradient are bitwise those of the same batch without a plan."""
    rng = np.random.default_rng(12)
    model = make_model(backbone, ib=True, ib_tokens=ib_tokens).train()
    seqs = [random_sequence(rng, n, switch=s) for n, s in ((30, 0.1), (9, 0.5), (17, 0.3), (3, 0.3))]
    batcher = TrainBatcher(backbone, MAX_LEN, 0.3, V + 1, None, seed=0, ib_plan=(D, ib_tokens))
    batch = batcher.batch([s for s, _ in seqs], [d for _, d in seqs])
    plan = batch[PLAN_KEY]
    assert isinstance(plan, LayoutPlan) and tuple(batch["item_idx"].shape) == (plan.B, plan.L)
    without = {k: v for k, v in batch.items() if k != PLAN_KEY}
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for b in (batch, without):
        out = model(b)
        grads = torch.autograd.grad(out.loss_rec + 0.7 * out.a_cd, params, allow_unused=True)
        results.append((out, grads))
    (with_plan, g_plan), (own, g_own) = results
    assert torch.equal(with_plan.loss_rec, own.loss_rec) and torch.equal(with_plan.a_cd, own.a_cd)
    assert torch.equal(with_plan.hidden, own.hidden)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g_plan, g_own, strict=True))
    # a plan for another batch shape or model is refused, not silently misapplied
    other = TrainBatcher(backbone, MAX_LEN, 0.3, V + 1, None, seed=0, ib_plan=(D, ib_tokens))
    wrong = other.batch([s for s, _ in seqs[:2]], [d for _, d in seqs[:2]])[PLAN_KEY]
    with pytest.raises(ValueError, match="LayoutPlan does not fit"):
        model({**batch, PLAN_KEY: wrong})
    # a plain model ignores a plan
    plain = make_model(backbone)
    torch.testing.assert_close(plain(batch).loss_rec, plain(without).loss_rec, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_ib_bucket_settings_change_the_kernel_calls_not_the_model(backbone):
    """`model.ib_bucket_ratio` / `ib_short_row` only regroup the packed rows into kernel calls: the same
    weights give the same outputs, a_cd and gradients (to float rounding) with all rows in one call, in
    octave-wide buckets and one bucket per row length, and a data-path plan built for other bucket settings
    is refused."""
    rng = np.random.default_rng(21)
    seqs = [
        random_sequence(rng, n, switch=s) for n, s in ((30, 0.05), (9, 0.5), (17, 0.2), (3, 0.3), (26, 0.1))
    ]
    batcher = TrainBatcher(backbone, MAX_LEN, 0.3, V + 1, None, seed=0)
    batch = batcher.batch([s for s, _ in seqs], [d for _, d in seqs])
    # MAX_LEN is below the default ib_short_row (every row in one call): the reference uses octave buckets
    settings = {"octave": dict(ib_bucket_ratio=2.0, ib_short_row=2),
                "coarse": dict(ib_bucket_ratio=4.0, ib_short_row=64),
                "fine": dict(ib_bucket_ratio=1.0001, ib_short_row=1)}  # fmt: skip
    results, n_buckets = {}, {}
    for name, kw in settings.items():
        model = make_model(backbone, ib=True, ib_tokens=1, **kw)  # same seed: same weights
        plan = layout_plan(batch, backbone, D, 1, model.cfg.ib_bucket_ratio, model.cfg.ib_short_row)
        n_buckets[name] = len(plan.buckets)
        out = model({**batch, PLAN_KEY: plan})
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.loss_rec + 0.7 * out.a_cd, params, allow_unused=True)
        results[name] = (out, grads)
    assert n_buckets["coarse"] == 1 < n_buckets["octave"] < n_buckets["fine"]
    ref_out, ref_grads = results["octave"]
    for name in ("coarse", "fine"):
        out, grads = results[name]
        torch.testing.assert_close(out.hidden, ref_out.hidden, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.a_cd, ref_out.a_cd, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.loss_rec, ref_out.loss_rec, atol=1e-5, rtol=1e-5)
        for g, g_ref in zip(grads, ref_grads, strict=True):
            assert (g is None) == (g_ref is None)
            if g is not None:
                torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-3)
    default_plan = layout_plan(batch, backbone, D, 1)
    coarse = make_model(backbone, ib=True, ib_tokens=1, **settings["coarse"])
    with pytest.raises(ValueError, match="bucket ratio, short row"):
        coarse({**batch, PLAN_KEY: default_plan})
    for bad in (dict(ib_bucket_ratio=1.0), dict(ib_bucket_ratio=True), dict(ib_short_row=0)):
        with pytest.raises(ValueError, match=r"ib_bucket_ratio|ib_short_row"):
            make_model(backbone, ib=True, **bad)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_ib_packed_rows_never_ask_for_cudnn_attention(backbone, monkeypatch):
    """The packed rows' shapes change with every batch; cuDNN attention builds a plan per shape (seconds per
    batch measured on an H200, `ib.PACKED_ROW_BACKENDS`), so every packed-row SDPA call, forward and IB
    queries, runs with cuDNN disabled, and the setting is restored afterwards. CI has no GPU: this checks the
    backend flags each call sees (recorded by a wrapper), not the GPU kernel."""
    from autocdsr.models import ib as ib_module

    seen: list[bool] = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(ib_module.F, "scaled_dot_product_attention", recording)
    rng = np.random.default_rng(3)
    model = make_model(backbone, ib=True)
    seqs = [random_sequence(rng, n, switch=s) for n, s in ((23, 0.3), (9, 0.5), (3, 0.3))]
    before = torch.backends.cuda.cudnn_sdp_enabled()
    model(inputs(backbone, [s for s, _ in seqs], [d for _, d in seqs])).loss_rec.backward()
    assert len(seen) >= model.cfg.n_layers and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


# -- serving ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ib", [False, True])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_user_embedding_matches_training_readout(backbone, ib):
    """Serving reads the same state training optimises: SASRec's last position tagged with the target's
    domain, BERT4Rec's [MASK] appended with the target's domain."""
    rng = np.random.default_rng(9)
    model = make_model(backbone, ib=ib)
    seqs = [random_sequence(rng, n) for n in (9, 14)]
    items, doms = [s for s, _ in seqs], [d for _, d in seqs]
    if backbone == "sasrec":
        batch = sasrec_batch(items, doms, MAX_LEN)
        train_state = hidden(model, batch)[:, -1]
    else:
        batch = cloze_batch(items, doms, MAX_LEN, 0.5, model.cfg.mask_token, rng, last_item_prob=1.0)
        train_state = hidden(model, batch)[:, -1]
    hist_items = torch.as_tensor(
        np.stack([np.r_[np.zeros(14 - len(s) + 1, dtype=np.int64), s[:-1]] for s in items])
    )
    hist_doms = torch.as_tensor(
        np.stack([np.r_[np.zeros(14 - len(d) + 1, dtype=np.int64), d[:-1]] for d in doms])
    )
    target_dom = torch.as_tensor([d[-1] for d in doms])
    with torch.no_grad():
        user = model.user_embedding(hist_items, hist_doms, target_dom)
    torch.testing.assert_close(user, F.normalize(train_state, dim=-1), atol=2e-5, rtol=1e-4)
    assert torch.allclose(user.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_recommend_never_returns_padding_and_respects_the_domain(backbone):
    rng = np.random.default_rng(10)
    model = make_model(backbone)
    # make padding the best-scoring "item" were it allowed: its embedding row aligned with every user
    seqs = [random_sequence(rng, n) for n in (5, 9, 12)]
    hist = inputs(backbone, [s for s, _ in seqs], [d for _, d in seqs])
    target = torch.tensor([1, 2, 3])
    user = model.user_embedding(hist["item_idx"], hist["domain_idx"], target)
    with torch.no_grad():
        model.item_emb.weight[0] = user[0] * 100
    scores, top = model.recommend(hist["item_idx"], hist["domain_idx"], target, k=V)
    assert (top != 0).all() and top.shape == (3, V)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    expected = user @ model.item_embeddings().T / model.cfg.temperature
    torch.testing.assert_close(scores, expected.gather(1, top), atol=1e-4, rtol=1e-5)
    scores_r, top_r = model.recommend(
        hist["item_idx"], hist["domain_idx"], target, k=V // D, restrict_to_domain=True
    )
    assert (ITEM_DOMAIN[top_r] == target[:, None]).all()
    assert (top_r != 0).all() and torch.isfinite(scores_r).all()
    with pytest.raises(ValueError, match="exceeds"):
        model.recommend(hist["item_idx"], hist["domain_idx"], target, k=V // D + 1, restrict_to_domain=True)


# -- parameters, configuration, training ------------------------------------------------------------------


@pytest.mark.parametrize("ib", [False, True])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_shared_and_embedding_parameters_partition_the_model(backbone, ib):
    model = make_model(backbone, ib=ib)
    shared = {id(p) for p in model.shared_parameters()}
    emb = {id(p) for p in model.embedding_parameters()}
    assert not shared & emb
    assert shared | emb == {id(p) for p in model.parameters()}
    assert id(model.item_emb.weight) in emb and id(model.pos_emb.weight) in emb
    assert all(p.dim() >= 1 for p in model.shared_parameters()) and len(shared) > 0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="backbone"):
        ModelConfig(backbone="gru", num_items=5, num_domains=2)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(backbone="sasrec", num_items=5, num_domains=2, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="temperature"):
        ModelConfig(backbone="sasrec", num_items=5, num_domains=2, temperature=0.0)
    with pytest.raises(ValueError, match="item_domain"):
        build_model(
            ModelConfig(backbone="sasrec", num_items=5, num_domains=2), torch.zeros(4, dtype=torch.long)
        )


@pytest.mark.parametrize("ib", [False, True])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_few_steps_lower_the_loss(backbone, ib):
    """Every path trains: a deterministic pattern (next item = item + 1 within a domain) is learnt."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, num_items=V, num_domains=D, max_len=MAX_LEN, d_model=16, n_layers=2,
                      n_heads=2, dropout=0.0, ib=ib, temperature=0.1)  # fmt: skip
    model = build_model(cfg, ITEM_DOMAIN)
    rng = np.random.default_rng(11)
    items, doms = [], []
    for _ in range(16):
        d = rng.integers(1, D + 1, size=12)
        start = rng.integers(1, V // D - 12)
        items.append((d - 1) * (V // D) + start + np.arange(12))
        doms.append(d)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        batch = (
            sasrec_batch(items, doms, MAX_LEN)
            if backbone == "sasrec"
            else cloze_batch(items, doms, MAX_LEN, 0.3, cfg.mask_token, rng)
        )
        out = model(batch)
        opt.zero_grad()
        (out.loss_rec + 0.1 * out.a_cd).backward()
        opt.step()
        losses.append(out.loss_rec.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    if ib:
        assert model.encoder.ib_tokens.weight.grad[1:].abs().sum() > 0  # the IB path receives gradient


# -- mixed precision ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["full", "sampled"])
@pytest.mark.parametrize("ib", [False, True])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_bf16_autocast_step_matches_fp32(backbone, ib, loss):
    """The GPU path trains under bf16 autocast (`train.mixed_precision`). The same autocast on the CPU runs
    every op of a training step in the dtypes autocast chooses, so dtype mismatches (index_put/scatter into
    fp32 buffers, concatenations with constant columns, the Pareto Gram matrix) fail here without a GPU. The
    step's loss, a_cd, Pareto weights and update must agree with fp32 to bf16 precision."""
    from autocdsr.objectives.balancer import BalancerConfig, LossBalancer
    from autocdsr.objectives.pareto import ParetoConfig

    kw = {"loss": "sampled", "num_sampled": 16} if loss == "sampled" else {}
    model = make_model(backbone, ib=ib, ib_tokens=1, **kw).train()
    rng = np.random.default_rng(5)
    seqs = [random_sequence(rng, int(rng.integers(6, MAX_LEN))) for _ in range(8)]
    items, doms = [s[0] for s in seqs], [s[1] for s in seqs]
    batch = (
        sasrec_batch(items, doms, MAX_LEN)
        if backbone == "sasrec"
        else cloze_batch(items, doms, MAX_LEN, 0.3, model.cfg.mask_token, np.random.default_rng(1))
    )
    low_precision: list[torch.dtype] = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: low_precision.append(o.dtype) if isinstance(o, torch.Tensor) else None
    )
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    try:
        for amp in (False, True):
            low_precision.clear()
            torch.manual_seed(3)  # same sampled negatives
            # ParetoMTL hull: both weights non-zero, so both task gradients are compared (the default
            # gives (0, 1) at a first solve)
            pareto = ParetoConfig(include_task_gradients=True)
            balancer = LossBalancer(BalancerConfig(method="autocdsr", update_every=1, pareto=pareto))
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):  # as autocdsr.training's step
                out = model(batch)
            info = balancer.backward(out.loss_rec, out.a_cd, list(model.shared_parameters()), params, 1)
            grads = [p.grad for p in params if p.grad is not None]
            assert all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
            results[amp] = (info, torch.cat([g.flatten() for g in grads]), torch.bfloat16 in low_precision)
    finally:
        hook.remove()
    (ref, g_ref, bf_ref), (got, g_got, bf_got) = results[False], results[True]
    assert bf_got and not bf_ref  # autocast did run layers in bf16
    assert got.solved and math.isfinite(got.loss_rec) and math.isfinite(got.a_cd)
    assert got.loss_rec == pytest.approx(ref.loss_rec, rel=0.02)
    assert got.a_cd == pytest.approx(ref.a_cd, abs=0.01)
    assert got.alpha1 == pytest.approx(ref.alpha1, abs=0.05) and got.alpha2 == pytest.approx(
        ref.alpha2, abs=0.05
    )
    assert float(F.cosine_similarity(g_ref, g_got, dim=0)) > 0.99
