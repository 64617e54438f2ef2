"""Ray Data side of training: stream the `train` split and turn Arrow rows into model batches on workers.

Padding/truncation, SASRec next-item targets and BERT4Rec cloze masking happen here, inside the worker's
`iter_torch_batches` (the data path), never on the driver. Memory stays bounded: Ray Data streams blocks
and the local shuffle buffer holds `train.shuffle_buffer` rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import ray.data
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from autocdsr.config import TrainConfig
from autocdsr.data import batching
from autocdsr.data.memory import TRAIN_COLUMNS
from autocdsr.data.shards import DatasetInfo
from autocdsr.models.ib import LayoutPlan


MIN_STEPS_PER_PASS = 200


def copies_per_pass(rows: int, batch_size: int, num_workers: int) -> int:
    """How many shuffled copies of each row one Ray Data pass yields.

    Starting a pass over a streaming split costs seconds (measured 10-20 s on 2 loaded cores), which
    dominates when the split holds only a few batches per worker. Small splits therefore yield several
    independently permuted copies per pass, so that a pass lasts at least MIN_STEPS_PER_PASS steps; real
    datasets (more rows than that) get 1, i.e. plain epochs.
    """
    need = MIN_STEPS_PER_PASS * batch_size * num_workers
    return max(1, -(-need // max(rows, 1)))


def train_dataset(info: DatasetInfo, copies: int = 1, seed: int = 0) -> ray.data.Dataset:
    """The `train` split as a lazily read, streamed Ray Dataset (only the columns training needs)."""
    # Per-operator progress bars redraw every second into worker logs that are no terminal: keep logs readable.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(info.split_path("train"), file_extensions=["parquet"]).select_columns(
        TRAIN_COLUMNS
    )
    if copies == 1:
        return ds

    def repeat(block: pa.Table) -> pa.Table:
        rng = np.random.default_rng([seed, block.num_rows, copies])
        return pa.concat_tables([block.take(rng.permutation(block.num_rows)) for _ in range(copies)])

    return ds.map_batches(repeat, batch_format="pyarrow", batch_size=None)


class SequenceCollate(NumpyBatchCollateFn, batching.TrainBatcher):
    """Ray Data's collate: rows (ragged item/domain arrays) -> the backbone's training batch.

    All the work is `batching.TrainBatcher`'s (shared with the petastorm adapter): ``restrict_domain`` gives
    the `single` baseline's view, masks are drawn from a generator seeded by (seed, ``epoch``).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        restrict_domain: int | None,
        mask_token: int,
        seed: int,
        domain_table: np.ndarray | None = None,
        ib_plan: batching.IBPlanSpec | None = None,
    ) -> None:
        batching.TrainBatcher.__init__(
            self,
            cfg.model.backbone,
            cfg.data.max_len,
            cfg.model.mask_prob,
            mask_token,
            restrict_domain,
            seed,
            domain_table,
            ib_plan,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor | LayoutPlan]:
        return self.batch(list(batch["item_idx"]), list(batch["domain_idx"]))
