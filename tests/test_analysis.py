"""autocdsr.analysis: attention by domain pair (hand-computed on explicit maps, consistent with a_cd), the
negative-transfer strata of bench/reproduce.py (by hand; Spearman's correlation against scipy), the
rank-distribution comparisons of bench/rank_compare.py (by hand and against brute force), and the phases of
the loss weights of bench/weight_trace.py (by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocdsr.analysis import (
    RANK_GROUPS,
    TRANSFER_GROUPS,
    add_domain_pair_mass,
    domain_pair_figure,
    paired_comparison,
    per_row_a_cd,
    popularity_ranks,
    rank_groups,
    rank_summary,
    spearman,
    transfer_by_a_cd,
    transfer_groups,
    weight_phases,
)
from autocdsr.models.attention import a_cd_from_maps
from tests.test_models import BACKBONES, inputs, make_model, random_sequence


def test_domain_pair_mass_by_hand():
    # one sequence [pad, A, B, A], one layer, one head; rows are the query positions
    domain_idx = torch.tensor([[0, 1, 2, 1]])
    m = torch.tensor(
        [[[[0.0, 0.0, 0.0, 0.0],
           [0.0, 1.0, 0.0, 0.0],
           [0.0, 0.3, 0.7, 0.0],
           [0.0, 0.2, 0.5, 0.3]]]]
    )  # fmt: skip
    mass, queries = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    add_domain_pair_mass([m], domain_idx, mass, queries)
    matrix = (mass / queries.clamp_min(1)[:, None])[1:, 1:].numpy()
    # domain A queries: positions 1 and 3 -> A mass (1.0 + 0.5) / 2, B mass (0 + 0.5) / 2
    np.testing.assert_allclose(matrix, [[0.75, 0.25], [0.3, 0.7]])
    assert queries.tolist() == [0.0, 2.0, 1.0]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_off_diagonal_mass_weighted_by_queries_is_a_cd(backbone):
    rng = np.random.default_rng(5)
    model = make_model(backbone)
    seqs = [random_sequence(rng, n) for n in (6, 11, 15)]
    batch = inputs(backbone, [s for s, _ in seqs], [d for _, d in seqs])
    maps = model.attention_maps(batch)
    D1 = int(batch["domain_idx"].max()) + 1
    mass, queries = torch.zeros(D1, D1, dtype=torch.float64), torch.zeros(D1, dtype=torch.float64)
    add_domain_pair_mass(maps, batch["domain_idx"], mass, queries)
    rows = mass[1:, 1:]
    np.testing.assert_allclose(rows.sum(1), queries[1:], rtol=1e-6)  # each query row's mass is 1
    cross = float(rows.sum() - rows.diagonal().sum()) / float(queries.sum())
    valid = batch["domain_idx"] != 0
    assert cross == pytest.approx(float(a_cd_from_maps(maps, batch["domain_idx"], valid)), rel=1e-5)
    fig = domain_pair_figure((rows / queries[1:, None]).numpy(), [f"d{i}" for i in range(1, D1)])
    assert len(fig.axes) == 2  # heatmap + colour bar


@pytest.mark.parametrize("backbone", BACKBONES)
def test_per_row_a_cd_is_each_rows_own_a_cd(backbone):
    rng = np.random.default_rng(8)
    model = make_model(backbone)
    seqs = [random_sequence(rng, n) for n in (5, 9, 14)]
    single_domain = (np.array([3, 4, 5, 6, 7, 8]), np.array([2, 2, 2, 2, 2, 2]))
    seqs.append(single_domain)
    batch = inputs(backbone, [s for s, _ in seqs], [d for _, d in seqs])
    maps = model.attention_maps(batch)
    per_row = per_row_a_cd(maps, batch["domain_idx"])
    for b in range(len(seqs)):
        dom = batch["domain_idx"][b : b + 1]
        alone = a_cd_from_maps([m[b : b + 1] for m in maps], dom, dom != 0)
        assert float(per_row[b]) == pytest.approx(float(alone), rel=1e-6, abs=1e-12)
    assert float(per_row[-1]) == 0.0 and (per_row[:-1] > 0).all()


def test_transfer_groups_are_the_four_strata_of_examples_scored_by_both():
    single = {"a": True, "b": True, "c": False, "d": False, "only_single": True}
    cd = {"a": True, "b": False, "c": True, "d": False, "only_cd": False}
    groups = transfer_groups(single, cd)
    assert list(groups) == list(TRANSFER_GROUPS)
    assert [groups[g] for g in TRANSFER_GROUPS] == [["a"], ["b"], ["c"], ["d"]]


def test_rank_groups_split_every_example_scored_by_both_by_which_model_ranks_it_higher():
    single = {"a": 3, "b": 50, "c": 7, "only_single": 0}
    cd = {"a": 10, "b": 2, "c": 7, "only_cd": 1}
    groups = rank_groups(single, cd)
    assert list(groups) == list(RANK_GROUPS)
    assert [groups[g] for g in RANK_GROUPS] == [["a"], ["c"], ["b"]]


def test_spearman_matches_scipy_with_ties_and_is_nan_when_constant():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=200).astype(float)  # many ties
    y = x + rng.normal(size=200)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0))) and np.isnan(spearman(np.ones(1), np.ones(1)))


def test_transfer_by_a_cd_bins_by_hand():
    # six examples; cd does worse than single exactly where a_cd is high
    a_cd = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.6, "e": 0.7, "f": 0.9, "no_rank": 0.5}
    single = {"a": 9, "b": 9, "c": 99, "d": 0, "e": 9, "f": 9}
    cd = {"a": 0, "b": 9, "c": 9, "d": 9, "e": 99, "f": 999}
    out = transfer_by_a_cd(single, cd, a_cd, bins=2)
    assert out["n"] == 6 and [b["n"] for b in out["bins"]] == [3, 3]
    low, high = out["bins"]
    assert (low["a_cd_min"], low["a_cd_max"]) == (0.1, 0.3) and high["a_cd_mean"] == pytest.approx(2.2 / 3)
    # log10(rank + 1) differences cd − single: low bin −1, 0, −1; high bin +1, +1, +2
    assert low["d_log10_rank"] == pytest.approx(-2 / 3) and high["d_log10_rank"] == pytest.approx(4 / 3)
    assert (low["share_single_higher"], low["share_cd_higher"]) == (0.0, pytest.approx(2 / 3))
    assert (high["share_single_higher"], high["share_cd_higher"]) == (1.0, 0.0)
    assert out["spearman"] > 0.8
    with pytest.raises(ValueError, match="bins"):
        transfer_by_a_cd(single, cd, a_cd, bins=0)


def test_paired_comparison_by_hand():
    a = np.array([0, 9, 99])
    b = np.array([9, 9, 999])
    out = paired_comparison(a, b, n_boot=500, seed=1)
    assert out["d_log10_rank"] == pytest.approx(((0 - 1) + (1 - 1) + (2 - 3)) / 3)
    assert out["d_ndcg_10"] == pytest.approx((1.0 - 1.0 / np.log2(11.0)) / 3)
    assert out["share_a_higher"] == pytest.approx(2 / 3) and out["share_a_lower"] == 0.0
    assert out["d_log10_rank_lo"] <= out["d_log10_rank"] <= out["d_log10_rank_hi"] <= 0.0
    # the same models on the same examples: no difference and no interval
    same = paired_comparison(a, a)
    assert all(same[k] == 0.0 for k in ("d_log10_rank", "d_log10_rank_lo", "d_log10_rank_hi", "d_ndcg_10"))
    assert paired_comparison(a, b, seed=3) == paired_comparison(a, b, seed=3)  # seeded bootstrap
    with pytest.raises(ValueError, match="equal-length"):
        paired_comparison(a, b[:2])


def test_rank_summary_by_hand():
    s = rank_summary(np.array([0, 5, 50, 5000]))
    assert s["recall_10"] == 0.5 and s["recall_100"] == 0.75 and s["recall_10000"] == 1.0
    assert s["ndcg_10"] == pytest.approx((1.0 + 1.0 / np.log2(7.0)) / 4)
    assert s["mrr"] == pytest.approx((1 + 1 / 6 + 1 / 51 + 1 / 5001) / 4)
    assert s["median_rank"] == 27.5


def test_popularity_ranks_equal_brute_force_with_ties_and_history():
    rng = np.random.default_rng(0)
    n = 60
    counts = rng.integers(0, 6, size=n + 1)  # many ties
    histories = [rng.integers(1, n + 1, size=rng.integers(0, 12)) for _ in range(40)]
    targets = rng.integers(1, n + 1, size=40)
    histories[0] = np.append(histories[0], targets[0])  # a target that is also in its own history
    got = popularity_ranks(counts, histories, targets)
    for h, t, r in zip(histories, targets, got, strict=True):
        candidates = [i for i in range(1, n + 1) if i != t and i not in set(h.tolist())]
        assert r == sum(counts[i] >= counts[t] for i in candidates)  # ties count against the target


def _history(alpha2, a_cd, loss_rec, solves):
    """Per-step metrics of steps 1..n as MLflow returns them; solves: step -> (L̃_rec, L̃_cd)."""
    h = {
        "alpha2": list(enumerate(alpha2, 1)),
        "a_cd": list(enumerate(a_cd, 1)),
        "loss_rec": list(enumerate(loss_rec, 1)),
        "pareto/normalised_loss_rec": [(s, v[0]) for s, v in solves.items()],
        "pareto/normalised_a_cd": [(s, v[1]) for s, v in solves.items()],
    }
    return {k: v[::-1] for k, v in h.items()}  # any order: phases sort by step


def test_weight_phases_by_hand():
    history = _history(
        alpha2=[1.0, 1.0, 0.5, 0.0, 0.0, 0.25],
        a_cd=[0.3, 0.2, 0.1, 0.1, 0.2, 0.4],
        loss_rec=[9.0, 9.0, 8.0, 7.0, 6.0, 5.0],
        solves={1: (1.0, 1.0), 3: (1.0, 0.5), 5: (1.0, 0.1), 6: (2.0, 0.2)},
    )
    first, second = weight_phases(history, [0, 2, 6], band=(0.2, 0.67), tail=2)
    assert first == {
        "first_step": 1.0, "last_step": 2.0, "steps": 2.0, "alpha2_mean": 1.0, "share_rec_only": 0.0,
        "share_cd_only": 1.0, "a_cd_end": pytest.approx(0.25), "loss_rec_end": 9.0, "solves": 1.0,
        "ratio_median": 1.0, "share_below_band": 0.0, "share_in_band": 0.0, "share_above_band": 1.0,
    }  # fmt: skip
    # steps 3-6: ratios 0.5 (inside), 0.1 (below) and 0.1 (below)
    assert second == {
        "first_step": 3.0, "last_step": 6.0, "steps": 4.0, "alpha2_mean": pytest.approx(0.1875),
        "share_rec_only": 0.5, "share_cd_only": 0.0, "a_cd_end": pytest.approx(0.3), "loss_rec_end": 5.5,
        "solves": 3.0, "ratio_median": pytest.approx(0.1), "share_below_band": pytest.approx(2 / 3),
        "share_in_band": pytest.approx(1 / 3), "share_above_band": 0.0,
    }  # fmt: skip
    # without a band (cd, fixed) there are no solve columns; a phase past the run's end is empty
    rows = weight_phases(history, [0, 6, 9])
    assert "solves" not in rows[0] and rows[1] == {"first_step": 7.0, "last_step": 9.0, "steps": 0.0}
    # the lowest preference vector has no band below it
    assert weight_phases(history, [0, 6], band=(0.0, 0.2))[0]["share_below_band"] == 0.0


def test_weight_phases_rejects_what_it_cannot_summarise():
    history = _history([0.0], [0.1], [5.0], {1: (1.0, 0.5)})
    with pytest.raises(ValueError, match="ascending"):
        weight_phases(history, [0, 5, 5])
    with pytest.raises(ValueError, match="alpha2"):
        weight_phases({**history, "alpha2": []}, [0, 1])
    with pytest.raises(ValueError, match="1 pareto/normalised_loss_rec but 0"):
        weight_phases({**history, "pareto/normalised_a_cd": []}, [0, 1], band=(0.2, 0.67))
