"""petastorm reader of the sequence builder's shards: an optional adapter, for its own environment only.

petastorm 0.13.1 cannot share the training environment (README, "Why Ray Data, not petastorm"): it runs in
``.venv-petastorm/`` (``make petastorm-env``: Python 3.11, pyarrow 14.0.2, numpy 1.26.4, pandas 2.1.x,
setuptools < 70, torch without dependencies). Nothing on the training path imports this module.

It reads ``OUT/train`` (or ``valid``/``test``) as they are, no second copy:

- ``make_batch_reader`` over the split's Parquet files, one row group at a time;
- row-group sharding: reader ``cur_shard`` of ``shard_count`` gets row groups ``cur_shard``,
  ``cur_shard + shard_count``, ... The sequence builder writes every row group of a split with exactly
  ``rows_per_row_group`` rows but the split's last one, so readers' shares differ by at most one row group;
- a padding ``TransformSpec``: petastorm collates a list column into a matrix and fails on ragged rows
  ("expected to be the same length"), so each row is cut to its newest ``max_len + 1`` items (all a training
  batch uses; after the `single` baseline's domain restriction, as the Ray path does) and LEFT-padded to that
  width, with its true length in a ``length`` column;
- ``petastorm.pytorch.DataLoader`` with a collate that strips the padding again and hands the rows to
  `autocdsr.data.batching.TrainBatcher`, the code behind the Ray Data path's collate: the same rows in the
  same order give the same tensors (masks included, for the same seed and epoch).

Usage (in ``.venv-petastorm``)::

    from autocdsr.data.petastorm_source import make_train_loader

    with make_train_loader("data/quickstart/sequences", batch_size=256, max_len=50,
                           cur_shard=rank, shard_count=world_size) as loader:
        for batch in loader:  # dict of torch.long tensors: item_idx, domain_idx, target_idx, ...
            ...

The module imports only numpy, pandas, torch, petastorm and `autocdsr.data.batching` (numpy + torch).
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from petastorm import make_batch_reader
from petastorm.pytorch import DataLoader
from petastorm.reader import Reader
from petastorm.transform import TransformSpec

from autocdsr.data.batching import TrainBatcher, restrict_to_domain

# petastorm 0.13.1 drives pyarrow 14's deprecated legacy ParquetDataset: one FutureWarning per row group.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\.")

SPLITS = ("train", "valid", "test")
SEQUENCE_FIELDS = ("item_idx", "domain_idx")
LENGTH = "length"


def split_url(data: str, split: str = "train") -> str:
    """The URL petastorm reads for ``split`` of the builder's output ``data`` (a local path or a URL).

    A local folder must hold ``_SUCCESS`` (the builder writes it last): a half-written folder is refused.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if "://" in data:
        return f"{data.rstrip('/')}/{split}"
    root = Path(data).resolve()
    if not (root / "_SUCCESS").is_file():
        raise FileNotFoundError(f"{root}: no _SUCCESS marker; not a complete output of the sequence builder")
    version = json.loads((root / "manifest.json").read_text())["schema_version"]
    if version != 1:
        raise ValueError(f"{root}: schema_version {version} is not supported (this adapter reads version 1)")
    return (root / split).as_uri()


def padding_transform(max_len: int, restrict_domain: int | None = None) -> TransformSpec:
    """A TransformSpec that gives every row fixed-width ``item_idx``/``domain_idx`` (int64, ``max_len + 1``)
    holding the row's newest items, LEFT-padded with 0, and its true kept length in ``length``."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    width = max_len + 1

    def pad(frame: pd.DataFrame) -> pd.DataFrame:
        items_col, domains_col, lengths = [], [], []
        for items, domains in zip(frame["item_idx"], frame["domain_idx"], strict=True):
            items, domains = np.asarray(items, np.int64), np.asarray(domains, np.int64)
            if restrict_domain is not None:
                items, domains = restrict_to_domain(items, domains, restrict_domain)
            items, domains = items[-width:], domains[-width:]
            padded_items, padded_domains = np.zeros(width, np.int64), np.zeros(width, np.int64)
            if len(items):
                padded_items[width - len(items) :] = items
                padded_domains[width - len(items) :] = domains
            items_col.append(padded_items)
            domains_col.append(padded_domains)
            lengths.append(len(items))
        out = frame.drop(columns=list(SEQUENCE_FIELDS))
        out["item_idx"] = items_col
        out["domain_idx"] = domains_col
        out[LENGTH] = np.asarray(lengths, np.int64)
        return out

    return TransformSpec(
        pad,
        edit_fields=[
            ("item_idx", np.int64, (width,), False),
            ("domain_idx", np.int64, (width,), False),
            (LENGTH, np.int64, (), False),
        ],
    )


class PaddedRowsCollate:
    """petastorm DataLoader rows (dicts of padded arrays + ``length``) -> the training batch of
    `TrainBatcher`; set ``epoch`` before each pass, as on the Ray path."""

    def __init__(self, batcher: TrainBatcher) -> None:
        self.batcher = batcher

    @property
    def epoch(self) -> int:
        return self.batcher.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.batcher.epoch = value

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        items, domains = [], []
        for row in rows:
            n = int(row[LENGTH])
            items.append(np.asarray(row["item_idx"])[len(row["item_idx"]) - n :])
            domains.append(np.asarray(row["domain_idx"])[len(row["domain_idx"]) - n :])
        return self.batcher.batch(items, domains)


def make_sequence_reader(
    data: str,
    split: str = "train",
    *,
    max_len: int,
    restrict_domain: int | None = None,
    cur_shard: int | None = None,
    shard_count: int | None = None,
    shuffle_row_groups: bool = True,
    seed: int | None = None,
    num_epochs: int | None = 1,
    workers_count: int = 4,
    reader_pool_type: str = "dummy",
    extra_fields: Sequence[str] = (),
) -> Reader:
    """petastorm's batch reader over one split, with the padding TransformSpec and row-group sharding.

    ``extra_fields`` adds other columns of the split (e.g. ``sequence_id``) unchanged; the torch DataLoader
    refuses string columns, so only a bare reader can carry them. ``shuffle_row_groups`` with
    ``workers_count`` > 1 reads in a nondeterministic order; use False and 1 for a reproducible order.

    ``reader_pool_type``: "dummy" (the default here) decodes row groups in the consuming thread, so a pass
    yields the whole shard, in order, every time; one reader per DDP rank gives the parallelism. petastorm's
    own default, "thread" (``workers_count`` threads), is opt-in: in this project's test suite, on 2 CPU cores
    under heavy load, a DataLoader over a "thread" reader once ended its pass after 5 of the shard's 8
    batches without an error, while a bare reader over the same shard read every row.
    """
    if (cur_shard is None) != (shard_count is None):
        raise ValueError("give both cur_shard and shard_count, or neither")
    if shard_count is not None and not 0 <= cur_shard < shard_count:  # type: ignore[operator]
        raise ValueError(f"cur_shard must be in [0, {shard_count}), got {cur_shard}")
    fields = [*SEQUENCE_FIELDS, *extra_fields]
    return make_batch_reader(
        split_url(data, split),
        schema_fields=[f"^{f}$" for f in fields],
        transform_spec=padding_transform(max_len, restrict_domain),
        cur_shard=cur_shard,
        shard_count=shard_count,
        shuffle_row_groups=shuffle_row_groups,
        seed=seed,
        num_epochs=num_epochs,
        workers_count=workers_count,
        reader_pool_type=reader_pool_type,
    )


def make_train_loader(
    data: str,
    split: str = "train",
    *,
    batch_size: int,
    max_len: int,
    backbone: str = "sasrec",
    mask_prob: float = 0.2,
    mask_token: int | None = None,
    restrict_domain: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    cur_shard: int | None = None,
    shard_count: int | None = None,
    shuffle_row_groups: bool = True,
    workers_count: int = 4,
    reader_pool_type: str = "dummy",
    shuffling_queue_capacity: int = 0,
) -> DataLoader:
    """A ``petastorm.pytorch.DataLoader`` of training batches, the tensors the Ray Data path makes.

    ``backbone``, ``max_len`` (the training ``data.max_len``), ``mask_prob``, ``mask_token`` (BERT4Rec's: the
    number of items + 1), ``restrict_domain`` and ``seed``/``epoch`` (mask generator) mean what they mean
    for `autocdsr.data.loader.SequenceCollate`. The last batch may be short. Use it as a context manager
    (``with ... as loader``) so that the reader's threads stop. ``reader_pool_type``: see `make_sequence_reader`.
    """
    if backbone == "bert4rec" and mask_token is None:
        raise ValueError("bert4rec needs mask_token (the number of items + 1)")
    batcher = TrainBatcher(backbone, max_len, mask_prob, mask_token or 0, restrict_domain, seed)
    batcher.epoch = epoch
    reader = make_sequence_reader(
        data,
        split,
        max_len=max_len,
        restrict_domain=restrict_domain,
        cur_shard=cur_shard,
        shard_count=shard_count,
        shuffle_row_groups=shuffle_row_groups,
        seed=seed if shuffle_row_groups else None,
        workers_count=workers_count,
        reader_pool_type=reader_pool_type,
    )
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]] = PaddedRowsCollate(batcher)
    return DataLoader(
        reader, batch_size=batch_size, collate_fn=collate, shuffling_queue_capacity=shuffling_queue_capacity
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m autocdsr.data.petastorm_source --data OUT``: read a split and report shapes (a smoke test)."""
    p = argparse.ArgumentParser(
        prog="python -m autocdsr.data.petastorm_source",
        description="Read the sequence builder's output with petastorm (in .venv-petastorm, see `make "
        "petastorm-env`) and print each reader shard's batch count, row count and first batch's shapes.",
    )
    p.add_argument("--data", required=True, help="the builder's output folder OUT (local path or URL)")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-len", type=int, default=50, help="the training data.max_len")
    p.add_argument("--backbone", default="sasrec", choices=("sasrec", "bert4rec"))
    p.add_argument("--shard-count", type=int, default=1, help="read as this many row-group shards, in turn")
    args = p.parse_args(argv)
    mask_token = None
    if args.backbone == "bert4rec":
        mask_token = json.loads((Path(args.data) / "manifest.json").read_text())["counts"]["items"] + 1
    for shard in range(args.shard_count):
        with make_train_loader(
            args.data,
            args.split,
            batch_size=args.batch_size,
            max_len=args.max_len,
            backbone=args.backbone,
            mask_token=mask_token,
            cur_shard=shard if args.shard_count > 1 else None,
            shard_count=args.shard_count if args.shard_count > 1 else None,
            shuffle_row_groups=False,
        ) as loader:
            batches = list(loader)
        shapes = {k: tuple(v.shape) for k, v in batches[0].items()} if batches else {}
        rows = sum(len(b["item_idx"]) for b in batches)
        print(f"shard {shard}/{args.shard_count}: {len(batches)} batches, {rows} rows; first batch {shapes}")


if __name__ == "__main__":
    main()
