"""Ray Data side of training: stream the `train` split and turn Arrow rows into model batches on workers.

Padding/truncation, SASRec next-item targets and BERT4Rec cloze masking happen here, inside the worker's
`iter_torch_batches` (the data path), never on the driver. Memory stays bounded: Ray Data streams blocks
and the local shuffle buffer holds `train.shuffle_buffer` rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray.data
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from autocdsr.config import TrainConfig
from autocdsr.data import batching
from autocdsr.data.shards import DatasetInfo

TRAIN_COLUMNS = ["item_idx", "domain_idx"]


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
    ds = ray.data.read_parquet(info.split_path("train"), file_extensions=["parquet"]).select_columns(TRAIN_COLUMNS)
    if copies == 1:
        return ds

    def repeat(block: pa.Table) -> pa.Table:
        rng = np.random.default_rng([seed, block.num_rows, copies])
        return pa.concat_tables([block.take(rng.permutation(block.num_rows)) for _ in range(copies)])

    return ds.map_batches(repeat, batch_format="pyarrow", batch_size=None)


class SequenceCollate(NumpyBatchCollateFn):
    """Rows (ragged item/domain arrays) -> the backbone's training batch.

    ``restrict_domain`` gives the `single` baseline's view: only that domain's items, rows with fewer than
    two left out. Masks are drawn from a generator seeded by (seed, epoch), so a rerun masks identically.
    """

    def __init__(self, cfg: TrainConfig, restrict_domain: int | None, mask_token: int, seed: int) -> None:
        self.backbone = cfg.model.backbone
        self.max_len = cfg.data.max_len
        self.mask_prob = cfg.model.mask_prob
        self.mask_token = mask_token
        self.restrict_domain = restrict_domain
        self.seed = seed
        self.epoch = 0
        self._rng: np.random.Generator | None = None
        self._rng_epoch = -1

    def _generator(self) -> np.random.Generator:
        if self._rng is None or self._rng_epoch != self.epoch:
            self._rng = np.random.default_rng([self.seed, self.epoch])
            self._rng_epoch = self.epoch
        return self._rng

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        items, domains = list(batch["item_idx"]), list(batch["domain_idx"])
        if self.restrict_domain is not None:
            pairs = [batching.restrict_to_domain(i, d, self.restrict_domain) for i, d in zip(items, domains, strict=True)]
            pairs = [p for p in pairs if len(p[0]) >= 2] or [(np.zeros(2, np.int64), np.zeros(2, np.int64))]
            items, domains = [p[0] for p in pairs], [p[1] for p in pairs]
        if self.backbone == "sasrec":
            return batching.sasrec_batch(items, domains, self.max_len)
        return batching.cloze_batch(items, domains, self.max_len, self.mask_prob, self.mask_token, self._generator())
