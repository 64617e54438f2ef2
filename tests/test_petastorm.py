"""The petastorm adapter (autocdsr/data/petastorm_source.py) against the Ray Data path, on shards built by the
real pipeline.

petastorm lives in its own environment (`make petastorm-env`, .venv-petastorm/): the reads run there in a
subprocess (tests/petastorm_reads.py) and come back as .npz; the same rows, in the same order, then go
through Ray Data and `SequenceCollate` here, and every batch must be equal. Also: the builder's row groups
(all exactly `rows_per_row_group` rows but a split's last) balance petastorm's row-group shards, and nothing
on the training path imports petastorm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from autocdsr.config import load_train_config
from autocdsr.data.loader import SequenceCollate
from tests.conftest import REPO

PETASTORM_PYTHON = REPO / ".venv-petastorm" / "bin" / "python"
ROWS_PER_GROUP = 20
MAX_LEN = 30  # the training data.max_len: shorter than the data's (50), so truncation is exercised
BATCH = 24  # not a divisor of a row group: batches straddle row groups and shards end with short batches

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def petastorm_python() -> Path:
    """The legacy environment, created on first use (`make petastorm-env` is a no-op when it is current)."""
    make = subprocess.run(
        ["make", "petastorm-env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ),
    )
    assert make.returncode == 0, f"make petastorm-env failed:\n{make.stdout[-3000:]}\n{make.stderr[-3000:]}"
    return PETASTORM_PYTHON


@pytest.fixture(scope="module")
def dataset(spark, synth_logs: Path, tmp_path_factory) -> Path:
    """The generated logs built by the real pipeline into ~4 files per split of 20-row row groups."""
    from pipelines.build import build_sequences
    from pipelines.config import load_config

    out = tmp_path_factory.mktemp("petastorm") / "sequences"
    cfg = load_config(None, ["max_len=50", "rows_per_shard=100", f"rows_per_row_group={ROWS_PER_GROUP}"])
    build_sequences(spark, str(synth_logs), str(out), cfg)
    return out


def _row_groups(split_dir: Path) -> list[int]:
    """Row counts of every row group of a split, in petastorm's order (files by path, groups in file order)."""
    sizes = []
    for f in sorted(split_dir.glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        sizes += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return sizes


def test_builder_writes_full_row_groups_but_the_last(dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    n = manifest["counts"]["subsequences"]
    assert manifest["config"]["rows_per_row_group"] == ROWS_PER_GROUP
    ids = {}
    for split in ("train", "valid", "test"):
        files = sorted((dataset / split).glob("*.parquet"))
        assert len(files) == manifest["shards"][split] > 1
        sizes = _row_groups(dataset / split)
        assert sum(sizes) == n
        assert sizes[:-1] == [ROWS_PER_GROUP] * (len(sizes) - 1), sizes
        assert 0 < sizes[-1] <= ROWS_PER_GROUP
        for f in files:  # the contract's order within a file is kept
            seq = pq.read_table(f, columns=["sequence_id"]).column(0).to_pylist()
            assert seq == sorted(seq)
        ids[split] = [
            pq.read_table(f, columns=["sequence_id"]).column(0).to_pylist() for f in files
        ]  # file by file
    assert ids["train"] == ids["valid"] == ids["test"]  # the splits share the file layout, row for row


def test_row_group_size_is_a_validated_config_key() -> None:
    from pipelines.config import ConfigError, load_config

    assert load_config(None, []).rows_per_row_group == 1000
    with pytest.raises(ConfigError, match="rows_per_row_group must be >= 1"):
        load_config(None, ["rows_per_row_group=0"])


def _training_path_modules() -> set[str]:
    code = (
        "import sys, autocdsr, autocdsr.train, autocdsr.data.loader, autocdsr.data.batching\n"
        "print('\\n'.join(sorted(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_training_path_does_not_import_petastorm() -> None:
    modules = _training_path_modules()
    assert "autocdsr.train" in modules and "ray" in modules  # the imports really ran
    leaked = sorted(m for m in modules if m.split(".")[0] == "petastorm" or m.endswith("petastorm_source"))
    assert not leaked, leaked


@pytest.fixture(scope="module")
def reads(petastorm_python: Path, dataset: Path, tmp_path_factory) -> dict[str, np.ndarray]:
    """All petastorm reads of this module, from one subprocess in .venv-petastorm."""
    mask_token = json.loads((dataset / "manifest.json").read_text())["counts"]["items"] + 1
    sasrec = {"backbone": "sasrec", "max_len": MAX_LEN, "batch_size": BATCH}
    bert = {
        **sasrec,
        "backbone": "bert4rec",
        "mask_prob": 0.3,
        "mask_token": mask_token,
        "seed": 17,
        "epoch": 2,
    }
    jobs = [
        {"name": "sasrec_all", **sasrec},
        *({"name": f"sasrec_{k}of2", **sasrec, "cur_shard": k, "shard_count": 2} for k in range(2)),
        *({"name": f"bert4rec_{k}of2", **bert, "cur_shard": k, "shard_count": 2} for k in range(2)),
        {"name": "single_all", **sasrec, "restrict_domain": 2},
        *(
            {"name": f"ids_{k}of4", **sasrec, "cur_shard": k, "shard_count": 4, "ids_only": True}
            for k in range(4)
        ),
    ]
    work = tmp_path_factory.mktemp("petastorm_reads")
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(petastorm_python), str(REPO / "tests" / "petastorm_reads.py"), "--data", str(dataset),
         "--jobs", str(work / "jobs.json"), "--out", str(work / "reads.npz")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    with np.load(work / "reads.npz") as npz:
        out = {k: npz[k] for k in npz.files}
    out["jobs"] = jobs  # type: ignore[assignment]
    return out


def _job_batches(reads: dict[str, np.ndarray], name: str) -> list[dict[str, np.ndarray]]:
    batches: dict[int, dict[str, np.ndarray]] = {}
    for key, value in reads.items():
        parts = key.split("/")
        if parts[0] == name and len(parts) == 3:
            batches.setdefault(int(parts[1]), {})[parts[2]] = value
    return [batches[i] for i in range(len(batches))]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _ray_batches(dataset: Path, ids: np.ndarray, job: dict) -> list[dict[str, np.ndarray]]:
    """The Ray Data training path (Arrow rows -> iter_torch_batches -> SequenceCollate) over ``ids`` in order."""
    table = pq.read_table(dataset / "train", columns=["sequence_id", "item_idx", "domain_idx"])
    position = {s: i for i, s in enumerate(table.column("sequence_id").to_pylist())}
    rows = table.take(pa.array([position[s] for s in ids.tolist()])).select(["item_idx", "domain_idx"])
    cfg = load_train_config(
        None,
        [f"model.backbone={job['backbone']}", f"data.max_len={job['max_len']}", f"model.mask_prob={job.get('mask_prob', 0.2)}"],
    )  # fmt: skip
    collate = SequenceCollate(
        cfg, job.get("restrict_domain"), job.get("mask_token") or 0, seed=job.get("seed", 0)
    )
    collate.epoch = job.get("epoch", 0)
    ds = ray.data.from_arrow(rows)
    return [
        {k: v.numpy() for k, v in b.items()}
        for b in ds.iter_torch_batches(batch_size=job["batch_size"], collate_fn=collate, drop_last=False)
    ]


def test_petastorm_batches_equal_the_ray_data_path(reads, dataset: Path, ray_local) -> None:
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    all_ids = set(pq.read_table(dataset / "train", columns=["sequence_id"]).column(0).to_pylist())
    for job in reads["jobs"]:  # type: ignore[union-attr]
        if job.get("ids_only"):
            continue
        name = job["name"]
        ids = reads[f"{name}/ids"]
        if "cur_shard" not in job:
            assert sorted(ids.tolist()) == sorted(all_ids), name  # an unsharded reader reads every row once
        got = _job_batches(reads, name)
        want = _ray_batches(dataset, ids, job)
        assert len(got) == len(want) == -(-len(ids) // BATCH), name
        assert set(got[0]) == set(want[0]), name
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            for key in w:
                assert g[key].dtype == w[key].dtype == np.int64, (name, i, key)
                np.testing.assert_array_equal(g[key], w[key], err_msg=f"{name} batch {i} {key}")
    first = _job_batches(reads, "bert4rec_0of2")[0]
    assert (first["target_idx"] != 0).any() and (first["item_idx"] == reads["jobs"][3]["mask_token"]).any()


@pytest.mark.parametrize("shards", [2, 4])
def test_petastorm_row_group_shards_partition_and_balance(reads, dataset: Path, shards: int) -> None:
    prefix = "sasrec" if shards == 2 else "ids"
    per_reader = [reads[f"{prefix}_{k}of{shards}/ids"].tolist() for k in range(shards)]
    every = [s for ids in per_reader for s in ids]
    all_ids = pq.read_table(dataset / "train", columns=["sequence_id"]).column(0).to_pylist()
    assert sorted(every) == sorted(all_ids)  # disjoint, and together every row
    sizes = [len(ids) for ids in per_reader]
    assert max(sizes) - min(sizes) <= ROWS_PER_GROUP, sizes
    groups = _row_groups(dataset / "train")
    assert len(groups) >= 2 * shards  # enough groups that balance is not trivial
