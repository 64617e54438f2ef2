"""The `train` split read once into memory, for training in one process without Ray.

For tests, benchmarks, debugging on small data, and runs on a machine that has torch and pyarrow but not
Ray (`bench/device_train.py` on a lent GPU): rows become batches through `batching.TrainBatcher`, the same
code behind the Ray Data path's `loader.SequenceCollate`, so both give the same tensors for the same rows.
This module must not import Ray (tests/test_device_bench.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from autocdsr.config import TrainConfig
from autocdsr.data import batching
from autocdsr.data.shards import DatasetInfo, list_arrays, list_split_files
from autocdsr.models.ib import LayoutPlan

TRAIN_COLUMNS = ["item_idx", "domain_idx"]


def in_memory_batches(
    info: DatasetInfo, cfg: TrainConfig, restrict_domain: int | None = None
) -> Callable[[int], Iterator[dict[str, torch.Tensor | LayoutPlan]]]:
    """The `train` split as ``epoch -> batches`` for `training.LocalContext`: a seeded permutation per
    epoch, incomplete last batches dropped. Loads the whole split: not for datasets beyond one machine's
    memory (the Ray Data path streams)."""
    table = pa.concat_tables(pq.read_table(f, columns=TRAIN_COLUMNS) for f in list_split_files(info, "train"))
    items, domains = list_arrays(table.column("item_idx")), list_arrays(table.column("domain_idx"))
    batcher = batching.TrainBatcher(
        cfg.model.backbone,
        cfg.data.max_len,
        cfg.model.mask_prob,
        info.vocab.num_items + 1,
        restrict_domain,
        cfg.seed,
        batching.training_domain_table(cfg, info),
        batching.ib_plan_spec(cfg, info),
    )
    size = cfg.train.batch_size

    def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        batcher.epoch = epoch
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(items))
        for start in range(0, len(order) - size + 1, size):
            idx = order[start : start + size]
            yield batcher.batch([items[i] for i in idx], [domains[i] for i in idx])

    return batches
