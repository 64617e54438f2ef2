"""Run by tests/test_petastorm.py inside .venv-petastorm: read shards through the petastorm adapter.

``python tests/petastorm_reads.py --data OUT --jobs JOBS.json --out READS.npz``. Each job names a reader
(shard, backbone, ...); for each, the npz gets ``NAME/ids`` (the sequence_ids in reading order, from a bare
reader) and ``NAME/BATCH/KEY`` (the DataLoader's tensors), so the main environment can rebuild the same
rows through the Ray Data path and compare batch for batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from autocdsr.data.petastorm_source import make_sequence_reader, make_train_loader


def read_job(data: str, job: dict[str, Any]) -> dict[str, np.ndarray]:
    shard = {"cur_shard": job.get("cur_shard"), "shard_count": job.get("shard_count")}
    common = {"shuffle_row_groups": False, "workers_count": 1, **shard}
    out: dict[str, np.ndarray] = {}
    with make_sequence_reader(
        data,
        max_len=job["max_len"],
        restrict_domain=job.get("restrict_domain"),
        extra_fields=["sequence_id"],
        **common,
    ) as reader:
        ids = [str(s) for group in reader for s in group.sequence_id]
    out["ids"] = np.asarray(ids)
    if job.get("ids_only"):
        return out
    with make_train_loader(
        data,
        batch_size=job["batch_size"],
        max_len=job["max_len"],
        backbone=job["backbone"],
        mask_prob=job.get("mask_prob", 0.2),
        mask_token=job.get("mask_token"),
        restrict_domain=job.get("restrict_domain"),
        seed=job.get("seed", 0),
        epoch=job.get("epoch", 0),
        **common,
    ) as loader:
        for i, batch in enumerate(loader):
            for key, value in batch.items():
                out[f"{i}/{key}"] = value.numpy()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="Read sequence shards through autocdsr.data.petastorm_source.")
    p.add_argument("--data", required=True, help="the sequence builder's output folder")
    p.add_argument("--jobs", required=True, help="JSON file: a list of reader specs, each with a 'name'")
    p.add_argument("--out", required=True, help="the .npz file to write")
    args = p.parse_args()
    arrays = {}
    for job in json.loads(Path(args.jobs).read_text()):
        for key, value in read_job(args.data, job).items():
            arrays[f"{job['name']}/{key}"] = value
    np.savez(args.out, **arrays)


if __name__ == "__main__":
    main()
