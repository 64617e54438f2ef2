"""Batch building: left padding and truncation, SASRec shift, BERT4Rec cloze masking, evaluation, single."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocdsr.data.batching import (
    TrainBatcher,
    cloze_batch,
    eval_batch,
    left_pad,
    relabelled_domains,
    restrict_to_domain,
    sasrec_batch,
)


def ragged(*seqs) -> np.ndarray:
    """A numpy object array of int arrays, as a Ray Data batch column holds them."""
    out = np.empty(len(seqs), dtype=object)
    for i, s in enumerate(seqs):
        out[i] = np.asarray(s, dtype=np.int32)
    return out


def test_left_pad_right_aligns_and_keeps_the_newest():
    out = left_pad(ragged([1, 2, 3], [4], [5, 6, 7, 8, 9]), max_len=4)
    np.testing.assert_array_equal(out, [[0, 1, 2, 3], [0, 0, 0, 4], [6, 7, 8, 9]])
    assert out.dtype == np.int64
    np.testing.assert_array_equal(left_pad([[1, 2]], max_len=5, width=4), [[0, 0, 1, 2]])
    assert left_pad([np.array([], dtype=np.int64)], max_len=3).shape == (1, 1)


def test_sasrec_batch_shifts_inputs_and_targets_with_target_domains():
    items = ragged([11, 12, 21, 13], [22, 23])
    doms = ragged([1, 1, 2, 1], [2, 2])
    b = sasrec_batch(items, doms, max_len=5)
    assert set(b) == {"item_idx", "domain_idx", "target_idx", "target_domain"}
    assert all(v.dtype == torch.long and v.shape == (2, 3) for v in b.values())
    assert b["item_idx"].tolist() == [[11, 12, 21], [0, 0, 22]]
    assert b["target_idx"].tolist() == [[12, 21, 13], [0, 0, 23]]
    assert b["domain_idx"].tolist() == [[1, 1, 2], [0, 0, 2]]
    assert b["target_domain"].tolist() == [[1, 2, 1], [0, 0, 2]]


def test_sasrec_batch_truncates_to_the_newest_max_len_positions():
    b = sasrec_batch([np.arange(1, 11)], [np.ones(10, dtype=int)], max_len=4)
    assert b["item_idx"].tolist() == [[6, 7, 8, 9]]
    assert b["target_idx"].tolist() == [[7, 8, 9, 10]]


def test_cloze_batch_masks_reproducibly_and_labels_only_masked_positions():
    rng_items = np.random.default_rng(0)
    items = [rng_items.integers(1, 50, size=n) for n in (30, 12, 45)]
    doms = [rng_items.integers(1, 4, size=len(s)) for s in items]
    b1 = cloze_batch(items, doms, 40, 0.3, mask_token=51, rng=np.random.default_rng(7), last_item_prob=0.0)
    b2 = cloze_batch(items, doms, 40, 0.3, mask_token=51, rng=np.random.default_rng(7), last_item_prob=0.0)
    for k in b1:
        assert torch.equal(b1[k], b2[k])
    original = torch.as_tensor(left_pad(items, 40))
    masked = b1["item_idx"] == 51
    assert torch.equal(masked, b1["target_idx"] != 0)
    assert torch.equal(b1["target_idx"][masked], original[masked])
    assert torch.equal(b1["item_idx"][~masked], original[~masked])
    assert torch.equal(b1["domain_idx"], torch.as_tensor(left_pad(doms, 40)))  # tags survive masking
    assert not masked[original == 0].any()
    rate = masked.sum().item() / (original != 0).sum().item()
    assert 0.2 < rate < 0.4


def test_cloze_batch_last_item_only_and_at_least_one_mask():
    items = [np.array([3, 4, 5]), np.array([7])]
    doms = [np.array([1, 1, 2]), np.array([2])]
    b = cloze_batch(items, doms, 5, 0.3, mask_token=9, rng=np.random.default_rng(0), last_item_prob=1.0)
    assert b["item_idx"].tolist() == [[3, 4, 9], [0, 0, 9]]
    assert b["target_idx"].tolist() == [[0, 0, 5], [0, 0, 7]]
    for seed in range(20):  # tiny mask probability: still one masked item per sequence
        b = cloze_batch(
            items, doms, 5, 0.01, mask_token=9, rng=np.random.default_rng(seed), last_item_prob=0.0
        )
        assert ((b["target_idx"] != 0).sum(1) >= 1).all()
    with pytest.raises(ValueError, match="mask_prob"):
        cloze_batch(items, doms, 5, 0.0, mask_token=9, rng=np.random.default_rng(0))


def test_eval_batch_splits_history_and_target():
    b = eval_batch(ragged([1, 2, 3, 4], [5, 6]), ragged([1, 1, 2, 2], [3, 1]), max_len=2)
    assert b["item_idx"].tolist() == [[2, 3], [0, 5]]
    assert b["domain_idx"].tolist() == [[1, 2], [0, 3]]
    assert b["target_idx"].tolist() == [4, 6]
    assert b["target_domain"].tolist() == [2, 1]
    with pytest.raises(ValueError, match="at least 2"):
        eval_batch([np.array([1])], [np.array([1])], max_len=2)


def test_restrict_to_domain_and_length_checks():
    items, doms = restrict_to_domain(np.array([1, 2, 3, 4]), np.array([1, 2, 1, 2]), 2)
    assert items.tolist() == [2, 4] and doms.tolist() == [2, 2]
    with pytest.raises(ValueError, match="domains"):
        sasrec_batch([np.array([1, 2])], [np.array([1])], max_len=3)


def test_relabelled_domains_moves_exactly_the_fraction_to_other_domains():
    item_domain = np.array([0] + [1] * 40 + [2] * 30 + [3] * 30)  # 100 items, 3 domains
    for fraction in (0.0, 0.1, 0.25, 0.5, 1.0):
        table = relabelled_domains(item_domain, fraction, seed=3)
        moved = table != item_domain
        assert table[0] == 0 and table.shape == item_domain.shape
        assert moved.sum() == round(fraction * 100)  # a moved item never lands on its own domain
        assert set(np.unique(table[1:])) <= {1, 2, 3}
    np.testing.assert_array_equal(
        relabelled_domains(item_domain, 0.3, 3), relabelled_domains(item_domain, 0.3, 3)
    )
    assert (relabelled_domains(item_domain, 0.3, 3) != relabelled_domains(item_domain, 0.3, 4)).any()
    # the new domain is uniform over the other two (not always the next one)
    table = relabelled_domains(item_domain, 1.0, 0)
    assert {int(t) for t in table[1:41]} == {2, 3}
    with pytest.raises(ValueError, match="fraction"):
        relabelled_domains(item_domain, 1.5, 0)


def test_train_batcher_domain_table_relabels_training_inputs_only_where_told():
    items, doms = ragged([1, 2, 3, 4]), ragged([1, 1, 2, 2])
    table = np.array([0, 2, 1, 2, 1])  # items 1, 2 and 4 relabelled
    plain = TrainBatcher("sasrec", 10, 0.2, 99, None, seed=0).batch(items, doms)
    relab = TrainBatcher("sasrec", 10, 0.2, 99, None, seed=0, domain_table=table).batch(items, doms)
    assert plain["domain_idx"].tolist() == [[1, 1, 2]]
    assert relab["domain_idx"].tolist() == [[2, 1, 2]] and relab["target_domain"].tolist() == [[1, 2, 1]]
    assert torch.equal(plain["item_idx"], relab["item_idx"]) and torch.equal(
        plain["target_idx"], relab["target_idx"]
    )
