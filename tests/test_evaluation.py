"""Recall/NDCG against hand-computed cases, pessimistic ties, seeded negatives, exact merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autocdsr import evaluation as ev


def test_metrics_hand_computed() -> None:
    ranks = torch.tensor([0, 1, 4, 9, 10, 25])
    assert ev.recall_at(ranks, 5).mean().item() == pytest.approx(3 / 6)
    assert ev.recall_at(ranks, 10).mean().item() == pytest.approx(4 / 6)
    want_ndcg5 = (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 6
    assert ev.ndcg_at(ranks, 5).mean().item() == pytest.approx(want_ndcg5)
    want_ndcg20 = (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11) + 1 / math.log2(12)) / 6
    assert ev.ndcg_at(ranks, 20).mean().item() == pytest.approx(want_ndcg20)
    assert ev.reference_metrics(ranks.tolist(), 20) == pytest.approx((5 / 6, want_ndcg20))


def test_ties_count_against_the_target() -> None:
    target = torch.tensor([1.0, 1.0, 2.0])
    negatives = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.5, 0.5], [3.0, 2.0, 2.0]])
    assert ev.ranks_against_candidates(target, negatives).tolist() == [2, 0, 3]
    # A constant-score model ranks every target last: it must not look better than random.
    const = ev.ranks_against_candidates(torch.zeros(4), torch.zeros(4, 100))
    assert const.tolist() == [100] * 4 and ev.recall_at(const, 20).sum() == 0


def test_full_ranking_ignores_padding_target_and_masked_items() -> None:
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.5, 0.9, 0.2]])  # column 0 = padding scores high: ignored
    target = torch.tensor([2])
    assert ev.ranks_full(scores, target).tolist() == [2]  # item 3 ties (counts), item 4 beats
    masked = torch.zeros_like(scores, dtype=torch.bool)
    masked[0, 4] = True  # item 4 is in the history
    assert ev.ranks_full(scores, target, masked).tolist() == [1]


def test_negatives_are_seeded_distinct_and_exclude_history() -> None:
    hist = np.array([3, 5, 7, 7, 1000])
    seed = ev.sequence_seed(0, "user:0")
    a = ev.sample_negatives(1000, 100, hist, seed)
    b = ev.sample_negatives(1000, 100, hist, seed)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 100
    assert not set(a.tolist()) & {3, 5, 7, 1000} and a.min() >= 1 and a.max() <= 1000
    c = ev.sample_negatives(1000, 100, hist, ev.sequence_seed(0, "user:1"))
    assert not np.array_equal(a, c)
    assert ev.sequence_seed(0, "x") == ev.sequence_seed(0, "x") != ev.sequence_seed(1, "x")
    dense = ev.sample_negatives(10, 6, np.array([2, 4]), 1)  # more than half the pool: exact enumeration
    assert sorted(dense.tolist()) == sorted(set(dense.tolist())) and not {2, 4} & set(dense.tolist())
    assert len(dense) == 6
    pooled = ev.sample_negatives(1000, 20, hist, 3, pool=(100, 200))
    assert pooled.min() >= 100 and pooled.max() <= 200
    with pytest.raises(ValueError, match="only 8 items remain"):
        ev.sample_negatives(10, 9, np.array([2, 4]), 1)


def test_negatives_are_uniform() -> None:
    counts = np.zeros(51)
    for s in range(2000):
        counts[ev.sample_negatives(50, 5, np.array([1]), s)] += 1
    observed = counts[2:]
    expected = 2000 * 5 / 49
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert counts[1] == 0 and chi2 < 90  # 48 dof: p(chi2 > 90) < 1e-3


def test_negatives_map_positions_onto_exactly_the_allowed_items() -> None:
    rng = np.random.default_rng(0)
    for case in range(300):
        num_items = int(rng.integers(2, 60))
        lo = int(rng.integers(1, num_items + 1))
        hi = int(rng.integers(lo, num_items + 1))
        exclude = rng.integers(0, num_items + 3, size=int(rng.integers(0, 12)))  # duplicates, out of pool
        allowed = set(range(lo, hi + 1)) - set(exclude.tolist())
        if not allowed:
            continue
        # n = all of them: the draw must be exactly the allowed set (every position maps to a distinct item)
        every = ev.sample_negatives(num_items, len(allowed), exclude, case, pool=(lo, hi))
        assert sorted(every.tolist()) == sorted(allowed), (case, lo, hi, exclude)
        some = ev.sample_negatives(num_items, max(1, len(allowed) // 3), exclude, case, pool=(lo, hi))
        assert set(some.tolist()) <= allowed and len(set(some.tolist())) == len(some)


@pytest.mark.parametrize("num_items", [200, 5000])  # dense (table product) and sparse (row gather) paths
def test_candidate_scores_equal_explicit_dot_products(
    num_items: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(num_items)
    emb = torch.nn.functional.normalize(torch.randn(num_items + 1, 8, generator=g), dim=-1)
    emb[7] = emb[3]  # two identical items score exactly alike
    user = torch.randn(40, 8, generator=g)
    cand = torch.randint(1, num_items + 1, (40, 30), generator=g)
    cand[:, 0], cand[:, 1] = 3, 7
    dense = ev.scores_densely(cand.shape[1], num_items + 1)
    assert dense == (num_items == 200)
    got = ev.candidate_scores(user, emb, cand)
    want = torch.stack([torch.stack([user[b] @ emb[c] for c in cand[b]]) for b in range(40)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, 0], got[:, 1])  # a tie, decided against the target by the rank rule
    assert ev.ranks_against_candidates(got[:, 0], got[:, 1:]).min() >= 1
    monkeypatch.setattr(ev, "_CHUNK_FLOATS", 300)  # a few rows per chunk: same scores, same ties
    chunked = ev.candidate_scores(user, emb, cand)
    torch.testing.assert_close(chunked, got, rtol=1e-6, atol=1e-6)
    assert torch.equal(chunked[:, 0], chunked[:, 1])


def test_metric_sums_merge_exactly_and_name_keys() -> None:
    g = torch.Generator().manual_seed(0)
    ranks = torch.randint(0, 40, (500,), generator=g)
    doms = torch.randint(1, 4, (500,), generator=g)
    whole = ev.MetricSums(["a", "b", "c"])
    whole.update(ranks, doms)
    left, right = ev.MetricSums(["a", "b", "c"]), ev.MetricSums(["a", "b", "c"])
    left.update(ranks[:123], doms[:123])
    right.update(ranks[123:], doms[123:])
    left.merge(right)
    assert torch.equal(left.hist, whole.hist) and left.num_sequences == 500
    m = whole.compute("test/")
    assert m["test/num_sequences/all"] == 500
    for d, name in enumerate("abc", start=1):
        mine = ranks[doms == d].tolist()
        assert m[f"test/recall_10/{name}"] == pytest.approx(ev.reference_metrics(mine, 10)[0])
        assert m[f"test/ndcg_20/{name}"] == pytest.approx(ev.reference_metrics(mine, 20)[1])
    assert m["test/ndcg_10/all"] == pytest.approx(ev.reference_metrics(ranks.tolist(), 10)[1])
    assert {"test/recall_5/all", "test/ndcg_5/all", "test/recall_20/c"} <= set(m)
