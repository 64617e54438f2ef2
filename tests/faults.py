"""Helpers that cause faults for real, shared by tests/test_faults.py (single process) and
tests/test_train.py (Ray): a poisoned copy of a dataset, a single-process `fit` for `autocdsr.train.run`,
and file mutations."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from autocdsr.config import TrainConfig
from autocdsr.data.memory import in_memory_batches
from autocdsr.data.shards import DatasetInfo, open_dataset
from autocdsr.training import LocalContext, local_fit, train_worker

# Credentials a job may find in its environment; the sentinel values must never reach MLflow or the logs.
SENTINELS = {
    "MLFLOW_TRACKING_PASSWORD": "sentinel-mlflow-password-5f1d",
    "MLFLOW_TRACKING_TOKEN": "sentinel-mlflow-token-9c2e",
    "AWS_ACCESS_KEY_ID": "AKIASENTINEL7Q3ZK2XW",
    "AWS_SECRET_ACCESS_KEY": "sentinel-aws-secret-0b7a",
    "AWS_SESSION_TOKEN": "sentinel-aws-session-4d8f",
    "AZURE_STORAGE_ACCESS_KEY": "sentinel-azure-key-6e3c",
    "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=sentinel-azure-conn-1a9b",
    "DATABRICKS_TOKEN": "sentinel-databricks-2f6d",
}


def poisoned_copy(src: Path, dst: Path) -> Path:
    """A copy of the dataset whose train rows keep only their last item: the manifest, file count and row
    counts still match (it passes every pre-training check), but a SASRec batch of such rows has no
    next-item target, so L_rec is the mean over zero positions: NaN, computed by the real model."""
    shutil.copytree(src, dst)
    for f in sorted((dst / "train").glob("*.parquet")):
        table = pq.read_table(f)
        for col in ("item_idx", "domain_idx", "timestamp"):
            i = table.schema.get_field_index(col)
            rows = [v[-1:] for v in table.column(col).to_pylist()]
            table = table.set_column(i, table.schema.field(i), pa.array(rows, table.schema.field(i).type))
        pq.write_table(table, f)
    return dst


def drop_last_row(path: Path) -> None:
    """Rewrite a Parquet file without its last row (a valid file that no longer matches the manifest)."""
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)


def append_copy(path: Path) -> None:
    """Append the file's bytes to itself: a shard that grew under a running job (no longer valid Parquet)."""
    data = path.read_bytes()
    with path.open("ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class LocalFit:
    """`autocdsr.training.local_fit` (the signature of `autocdsr.train.fit`) for `train.run(..., fit_fn=...)`:
    the worker loop every Ray worker runs, on the in-memory train split, logging to the same MLflow run.

    ``batches`` replaces the batch source (``(info, cfg) -> epoch -> batches``); ``on_step(step)`` runs
    after every logged training step (to change files mid-run); contexts are kept for inspection.
    """

    def __init__(
        self,
        batches: Callable[[DatasetInfo, TrainConfig], Callable[[int], Iterator[dict[str, torch.Tensor]]]]
        | None = None,
        on_step: Callable[[int], None] | None = None,
        last_checkpoint: str | None = None,
    ) -> None:
        self.batches = batches
        self.on_step = on_step
        self.last_checkpoint = last_checkpoint
        self.contexts: list[LocalContext] = []
        self.calls = 0

    def context(self, info: DatasetInfo, cfg: TrainConfig, restrict_domain: int | None) -> LocalContext:
        self.calls += 1
        batches = self.batches(info, cfg) if self.batches else in_memory_batches(info, cfg, restrict_domain)
        ctx = LocalContext(batches, last_checkpoint=self.last_checkpoint, reports=[])
        self.contexts.append(ctx)
        return ctx

    def __call__(self, *fit_args: Any, **fit_kwargs: Any) -> tuple[dict[str, float], str | None]:
        return local_fit(*fit_args, **fit_kwargs, context=self.context, on_step=self.on_step)


def poison_at(steps: set[int], poisoned: Path) -> Callable[[DatasetInfo, TrainConfig], Any]:
    """Batches of the clean data, except at the given global batch numbers (1-based, = training steps
    without a resume), where the batch at that place in the pass comes from ``poisoned``'s rows."""

    def make(info: DatasetInfo, cfg: TrainConfig) -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
        clean = in_memory_batches(info, cfg)
        bad = in_memory_batches(open_dataset(str(poisoned)), cfg)
        seen = [0]

        def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
            for good, poison in zip(clean(epoch), bad(epoch), strict=True):
                seen[0] += 1
                yield poison if seen[0] in steps else good

        return batches

    return make


class DDPContext(LocalContext):
    """`LocalContext` for one rank of a real torch.distributed (gloo) group: the model is wrapped in
    DistributedDataParallel, as Ray Train's `prepare_model` does; keeps the module for inspection."""

    model: torch.nn.Module | None = None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        return torch.nn.parallel.DistributedDataParallel(model)


def ddp_rank(
    rank: int, world: int, init_file: str, data: str, poisoned: str, overrides: list[str], out: str
) -> None:
    """One rank of tests/test_faults.py's two-process check: only rank 1 meets the poisoned batch at step 3.
    Writes {"error": ...} or {"final": ...} and the final weights to ``out``/rank<r>.pt."""
    import torch.distributed as dist

    from autocdsr.config import load_train_config
    from autocdsr.training import NonFiniteError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = load_train_config(None, overrides)
        info = open_dataset(data)
        batches = poison_at({3}, Path(poisoned))(info, cfg) if rank == 1 else in_memory_batches(info, cfg)
        ctx = DDPContext(batches, rank=rank, world_size=world)
        try:
            result: dict[str, Any] = {"final": train_worker(cfg, info, ctx)}
        except NonFiniteError as e:
            result = {"error": str(e)}
        assert ctx.model is not None
        torch.save({"result": result, "weights": ctx.model.state_dict()}, f"{out}/rank{rank}.pt")
        # Tear down in order: no rank closes its gloo connections while the other is still in a collective
        # or writing its result. CI once saw rank 0 of the stop case die with SIGABRT ("terminate called
        # without an active exception", a C++ thread still joinable at teardown) after both ranks had
        # raised; it never reproduced here. (The DDP wrapper is already freed at this point: checked.)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The result is on disk and the group is gone: leave without interpreter finalisation, whose C++ static
    # destructors are this harness's business, not the behaviour under test (Ray Train owns worker teardown).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
