"""Training and evaluation batches from variable-length sequences (pure numpy/torch, no Ray).

Inputs are what a Ray Data collate function holds: a list (or numpy object array) of 1-D integer arrays,
one per subsequence, oldest item first, with a parallel list of domain arrays. Outputs are dicts of
torch.long tensors, LEFT-padded with 0 (the newest item sits at the last column) and truncated to the
newest items. The batch width is the longest kept sequence (never more than ``max_len``); models align
positions to the right, so the width does not change results.

Keys:
- `sasrec_batch`: item_idx, domain_idx (inputs = seq[:-1]), target_idx, target_domain (= seq[1:] and its
  domains, per position; the next position's domain tag). [B, L].
- `cloze_batch`: item_idx with ``mask_token`` at masked positions, domain_idx (unchanged: a masked position
  keeps its domain tag, the target's), target_idx (the hidden item where masked, 0 elsewhere). [B, L].
- `eval_batch`: item_idx, domain_idx (the history = seq[:-1]) [B, L]; target_idx, target_domain [B]
  (the last item and its domain). The models append the query position themselves: BERT4Rec a [MASK]
  tagged target_domain, SASRec the target_domain tag on the last history position.
- `TrainBatcher` for an AutoCDSR⁺ model (``ib_plan``) adds the encoder's packing plan under
  `autocdsr.models.ib.PLAN_KEY`: a host-side `LayoutPlan`, not a tensor (move only the tensors to a device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from autocdsr.models.ib import BUCKET_RATIO, PLAN_KEY, SHORT_ROW, LayoutPlan

if TYPE_CHECKING:
    from autocdsr.config import TrainConfig
    from autocdsr.data.shards import DatasetInfo

Sequences = Sequence[np.ndarray] | np.ndarray

# `TrainBatcher`'s ``ib_plan``: (domains, IB tokens[, bucket ratio, short row]), `layout_plan`'s arguments
IBPlanSpec = tuple[int, int] | tuple[int, int, float, int]


def left_pad(seqs: Sequences, max_len: int, width: int | None = None) -> np.ndarray:
    """[B, W] int64, each sequence's newest ``max_len`` elements right-aligned, 0 on the left.

    W = ``width`` if given, else the longest kept sequence (at least 1).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    kept = [np.asarray(s, dtype=np.int64).reshape(-1)[-max_len:] for s in seqs]
    W = width if width is not None else max([len(s) for s in kept], default=0) or 1
    out = np.zeros((len(kept), W), dtype=np.int64)
    for row, s in zip(out, kept, strict=True):
        if len(s) > W:
            raise ValueError(f"a sequence of length {len(s)} does not fit width {W}")
        if len(s):
            row[W - len(s) :] = s
    return out


def _check(items: Sequences, domains: Sequences) -> None:
    if len(items) != len(domains):
        raise ValueError(f"{len(items)} item sequences but {len(domains)} domain sequences")
    for i, (s, d) in enumerate(zip(items, domains, strict=True)):
        if len(s) != len(d):
            raise ValueError(f"sequence {i}: {len(s)} items but {len(d)} domains")


def sasrec_batch(items: Sequences, domains: Sequences, max_len: int) -> dict[str, torch.Tensor]:
    """Next-item training: at position t the input is item t and the target item t + 1 (with its domain)."""
    _check(items, domains)
    # keep max_len + 1 items so that max_len positions have a target
    items = [np.asarray(s)[-(max_len + 1) :] for s in items]
    domains = [np.asarray(d)[-(max_len + 1) :] for d in domains]
    batch = {
        "item_idx": left_pad([s[:-1] for s in items], max_len),
        "domain_idx": left_pad([d[:-1] for d in domains], max_len),
        "target_idx": left_pad([s[1:] for s in items], max_len),
        "target_domain": left_pad([d[1:] for d in domains], max_len),
    }
    W = max(b.shape[1] for b in batch.values())
    return {k: torch.as_tensor(_widen(v, W)) for k, v in batch.items()}


def cloze_batch(
    items: Sequences,
    domains: Sequences,
    max_len: int,
    mask_prob: float,
    mask_token: int,
    rng: np.random.Generator,
    last_item_prob: float = 0.1,
) -> dict[str, torch.Tensor]:
    """BERT4Rec cloze training on each sequence's newest ``max_len`` items.

    Each item is masked with probability ``mask_prob`` (at least one per non-empty sequence). With
    probability ``last_item_prob`` a sequence instead has only its last item masked, the situation at
    serving time (BERT4Rec trains on such samples too). ``rng`` makes the masks reproducible.
    """
    _check(items, domains)
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    item_idx = left_pad(items, max_len)
    domain_idx = left_pad(domains, max_len, width=item_idx.shape[1])
    present = item_idx != 0
    masked = (rng.random(item_idx.shape) < mask_prob) & present
    last_only = rng.random(len(item_idx)) < last_item_prob
    masked[last_only] = False
    masked[last_only, -1] = present[last_only, -1]
    # a sequence with nothing masked gives no signal: mask one of its items at random
    for row in np.flatnonzero(~masked.any(axis=1) & present.any(axis=1)):
        masked[row, rng.choice(np.flatnonzero(present[row]))] = True
    target_idx = np.where(masked, item_idx, 0)
    item_idx = np.where(masked, mask_token, item_idx)
    return {
        "item_idx": torch.as_tensor(item_idx),
        "domain_idx": torch.as_tensor(domain_idx),
        "target_idx": torch.as_tensor(target_idx),
    }


def eval_batch(items: Sequences, domains: Sequences, max_len: int) -> dict[str, torch.Tensor]:
    """Leave-one-out: the last item of each sequence is the target, the ``max_len`` before it the history."""
    _check(items, domains)
    if any(len(s) < 2 for s in items):
        raise ValueError("eval_batch needs sequences of at least 2 items (history + target)")
    hist_items = left_pad([np.asarray(s)[:-1] for s in items], max_len)
    return {
        "item_idx": torch.as_tensor(hist_items),
        "domain_idx": torch.as_tensor(
            left_pad([np.asarray(d)[:-1] for d in domains], max_len, hist_items.shape[1])
        ),
        "target_idx": torch.as_tensor(np.array([s[-1] for s in items], dtype=np.int64)),
        "target_domain": torch.as_tensor(np.array([d[-1] for d in domains], dtype=np.int64)),
    }


def restrict_to_domain(items: np.ndarray, domains: np.ndarray, domain: int) -> tuple[np.ndarray, np.ndarray]:
    """One sequence's items of ``domain`` only, order kept (the `single` baseline's view of a sequence)."""
    items, domains = np.asarray(items), np.asarray(domains)
    keep = domains == domain
    return items[keep], domains[keep]


def relabelled_domains(item_domain: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The item -> domain table with ``round(fraction · N)`` items moved to another domain at random.

    The robustness study of the paper's Table 5 (domain labels corrupted during training): the items are
    drawn uniformly without replacement, each gets a domain drawn uniformly from the *other* domains, and
    the same item is relabelled the same way everywhere it occurs (a property of the item, as a wrong
    catalogue label would be). ``item_domain`` is the vocabulary's [N + 1] table (row 0 = padding, kept 0).
    A pure function of (table, fraction, seed): every worker builds the same table.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"relabel fraction must be in [0, 1], got {fraction}")
    table = np.asarray(item_domain, dtype=np.int64).copy()
    num_domains = int(table.max(initial=0))
    n = len(table) - 1
    moved = int(round(fraction * n))
    if moved == 0 or num_domains < 2:
        return table
    rng = np.random.default_rng([seed, n, num_domains])
    items = rng.choice(np.arange(1, n + 1), size=moved, replace=False)
    # a uniform draw from the D - 1 other domains: shift by 1..D-1 modulo D
    shift = rng.integers(1, num_domains, size=moved)
    table[items] = (table[items] - 1 + shift) % num_domains + 1
    return table


class TrainBatcher:
    """Rows (ragged item/domain arrays, oldest first) -> the backbone's training batch.

    The reader-independent part of training batches, shared by the Ray Data collate
    (`autocdsr.data.loader.SequenceCollate`) and the petastorm adapter (`autocdsr.data.petastorm_source`), so
    both give the same tensors for the same rows. It needs only numpy and torch.

    ``restrict_domain`` gives the `single` baseline's view: only that domain's items, rows with fewer than
    two left out. BERT4Rec masks are drawn from a generator seeded by (seed, epoch) and consumed batch after
    batch, so a rerun over the same batches masks identically; set ``epoch`` before each pass.
    ``domain_table`` (item -> domain, e.g. `relabelled_domains`) replaces the rows' domain tags when given.
    ``ib_plan`` = (number of domains, IB tokens per domain[, the model's ``ib_bucket_ratio``, ``ib_short_row``])
    for an AutoCDSR⁺ model: each batch then also
    carries the encoder's packing plan (`autocdsr.models.ib.LayoutPlan`, under ``ib.PLAN_KEY``), built here
    in the data path, off the training thread and from host arrays (`ib_plan_spec` gives the value).
    """

    def __init__(
        self,
        backbone: str,
        max_len: int,
        mask_prob: float,
        mask_token: int,
        restrict_domain: int | None,
        seed: int,
        domain_table: np.ndarray | None = None,
        ib_plan: IBPlanSpec | None = None,
    ) -> None:
        if backbone not in ("sasrec", "bert4rec"):
            raise ValueError(f"backbone must be 'sasrec' or 'bert4rec', got {backbone!r}")
        self.backbone = backbone
        self.max_len = max_len
        self.mask_prob = mask_prob
        self.mask_token = mask_token
        self.restrict_domain = restrict_domain
        self.seed = seed
        self.domain_table = domain_table
        self.ib_plan = ib_plan
        self.epoch = 0
        self._rng: np.random.Generator | None = None
        self._rng_epoch = -1

    def _generator(self) -> np.random.Generator:
        if self._rng is None or self._rng_epoch != self.epoch:
            self._rng = np.random.default_rng([self.seed, self.epoch])
            self._rng_epoch = self.epoch
        return self._rng

    def batch(self, items: Sequences, domains: Sequences) -> dict[str, torch.Tensor | LayoutPlan]:
        batch = self._tensors(items, domains)
        if self.ib_plan is not None:
            batch[PLAN_KEY] = layout_plan(batch, self.backbone, *self.ib_plan)
        return batch

    def _tensors(self, items: Sequences, domains: Sequences) -> dict[str, torch.Tensor]:
        items, domains = list(items), list(domains)
        if self.domain_table is not None:
            domains = [self.domain_table[np.asarray(i, dtype=np.int64)] for i in items]
        if self.restrict_domain is not None:
            pairs = [
                restrict_to_domain(i, d, self.restrict_domain) for i, d in zip(items, domains, strict=True)
            ]
            pairs = [p for p in pairs if len(p[0]) >= 2] or [(np.zeros(2, np.int64), np.zeros(2, np.int64))]
            items, domains = [p[0] for p in pairs], [p[1] for p in pairs]
        if self.backbone == "sasrec":
            return sasrec_batch(items, domains, self.max_len)
        return cloze_batch(items, domains, self.max_len, self.mask_prob, self.mask_token, self._generator())


def _widen(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[1] == width:
        return a
    return np.concatenate([np.zeros((a.shape[0], width - a.shape[1]), dtype=a.dtype), a], axis=1)


def layout_plan(
    batch: dict[str, torch.Tensor],
    backbone: str,
    num_domains: int,
    tokens: int,
    bucket_ratio: float = BUCKET_RATIO,
    short_row: int = SHORT_ROW,
) -> LayoutPlan:
    """The AutoCDSR⁺ packing plan of a host training batch (T = ``tokens`` IB tokens per domain, the model's
    ``ib_bucket_ratio`` / ``ib_short_row``), as the encoder would build it: padding is item 0
    (`SequenceRecommender.encode`), SASRec is causal."""
    valid = batch["item_idx"].numpy() != 0
    return LayoutPlan(
        batch["domain_idx"].numpy(), valid, num_domains, tokens, backbone == "sasrec", bucket_ratio, short_row
    )


def ib_plan_spec(cfg: TrainConfig, info: DatasetInfo) -> IBPlanSpec | None:
    """`TrainBatcher`'s ``ib_plan`` for a training config: (domains, IB tokens, bucket ratio, short row) for
    AutoCDSR⁺, else None."""
    if not cfg.uses_ib_tokens:
        return None
    m = cfg.model
    return (info.vocab.num_domains, m.num_ib_tokens, m.ib_bucket_ratio, m.ib_short_row)


def training_domain_table(cfg: TrainConfig, info: DatasetInfo) -> np.ndarray | None:
    """The item -> domain table training batches use: None (the data's own tags) unless
    ``data.relabel_fraction`` > 0, then `relabelled_domains` (the Table 5 robustness study).
    Evaluation always reads the true tags."""
    if cfg.data.relabel_fraction == 0:
        return None
    return relabelled_domains(info.vocab.item_domain, cfg.data.relabel_fraction, cfg.data.relabel_seed)
