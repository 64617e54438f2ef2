"""Reading the sequence builder's output (docs/data-contract.md) for training, evaluation and serving.

- ``open_dataset`` checks the folder is a complete result of a known schema version and loads the
  vocabularies (items, domains) that size the model.
- ``list_arrays`` turns an Arrow list column into per-row numpy views for `autocdsr.data.batching`.
- ``iter_eval_rows`` gives each worker a disjoint share of valid/test rows whose union is every row,
  exactly once (Ray Data's ``streaming_split(equal=True)`` may drop rows to equalise shards: fine for
  training, not for metrics).

Paths may be local or any URI pyarrow's filesystems understand (``s3://``, ``gs://``, ``hdfs://``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SUPPORTED_SCHEMA_VERSIONS = (1,)
SEQUENCE_COLUMNS = ("sequence_id", "item_idx", "domain_idx")


class DatasetError(ValueError):
    """The data folder is not a usable sequence-builder output; the message names the path and problem."""


@dataclass(frozen=True)
class Vocabulary:
    num_items: int
    domains: tuple[str, ...]  # position i holds the name of domain_idx i + 1
    item_domain: np.ndarray  # [num_items + 1] int64, item_idx -> domain_idx (0 for padding)
    item_count: np.ndarray  # [num_items + 1] int64, kept interactions per item (0 for padding)
    domain_ranges: dict[str, tuple[int, int]]  # domain -> inclusive item_idx range

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def domain_idx(self, name: str) -> int:
        try:
            return self.domains.index(name) + 1
        except ValueError:
            raise KeyError(f"unknown domain {name!r}; known: {', '.join(self.domains)}") from None


@dataclass(frozen=True)
class DatasetInfo:
    root: str
    manifest: dict[str, Any]
    manifest_sha256: str
    vocab: Vocabulary

    def split_rows(self, split: str) -> int:
        """Rows of a split: every subsequence under leave-one-out; the split's share under by_sequence."""
        rows = self.manifest.get("split", {}).get("rows", {})
        return int(rows.get(split, self.manifest["counts"]["subsequences"]))

    def split_path(self, split: str) -> str:
        return f"{self.root}/{split}"


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if path.startswith(("s3a://", "s3n://")):  # Spark's Hadoop scheme for the same S3 objects
        path = "s3://" + path.split("://", 1)[1]
    fs, p = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    return fs, p.rstrip("/")


def _read_text(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def open_dataset(root: str) -> DatasetInfo:
    """Validate ``root`` and load its manifest and vocabularies.

    A local path is made absolute: Ray workers run in their own working directories, so the
    ``DatasetInfo.root`` handed to them must not depend on the driver's.
    """
    if "://" not in root:
        root = os.path.abspath(root)
    fs, base = _fs(root)
    root = root.rstrip("/")
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        raise DatasetError(f"data folder {root} does not exist")
    if fs.get_file_info(f"{base}/_SUCCESS").type == pafs.FileType.NotFound:
        raise DatasetError(
            f"{root} has no _SUCCESS marker: it is not a complete output of jobs/build_sequences.py "
            f"(still being written, or a failed run)"
        )
    raw = _read_text(fs, f"{base}/manifest.json")
    manifest = json.loads(raw)
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise DatasetError(
            f"{root}/manifest.json: schema_version {version!r} is not supported by this version of autocdsr "
            f"(supported: {SUPPORTED_SCHEMA_VERSIONS}); rebuild the data or upgrade"
        )
    items = pads.dataset(f"{base}/items", format="parquet", filesystem=fs).to_table(
        columns=["item_idx", "domain_idx", "count"]
    )
    n = manifest["counts"]["items"]
    idx = items.column("item_idx").to_numpy()
    if items.num_rows != n or (n and (idx.min() != 1 or idx.max() != n)):
        raise DatasetError(f"{root}/items: expected item_idx 1..{n}, found {items.num_rows} rows")
    item_domain = np.zeros(n + 1, dtype=np.int64)
    item_domain[idx] = items.column("domain_idx").to_numpy()
    item_count = np.zeros(n + 1, dtype=np.int64)
    item_count[idx] = items.column("count").to_numpy()
    domains = tuple(d["domain"] for d in sorted(manifest["domains"], key=lambda d: d["domain_idx"]))
    ranges = {d["domain"]: tuple(d["item_idx_range"]) for d in manifest["domains"] if d["item_idx_range"]}
    vocab = Vocabulary(n, domains, item_domain, item_count, ranges)  # type: ignore[arg-type]
    return DatasetInfo(root, manifest, hashlib.sha256(raw).hexdigest(), vocab)


def list_arrays(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """An Arrow list column as one numpy array per row (views into one buffer; no per-element Python)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return np.split(values[offsets[0] : offsets[-1]], offsets[1:-1] - offsets[0])


def list_split_files(info: DatasetInfo, split: str) -> list[str]:
    fs, base = _fs(info.root)
    selector = pafs.FileSelector(f"{base}/{split}", recursive=True)
    files = sorted(f.path for f in fs.get_file_info(selector) if f.is_file and f.path.endswith(".parquet"))
    if not files:
        raise DatasetError(f"{info.root}/{split}: no Parquet files")
    return files


def iter_eval_rows(
    info: DatasetInfo, split: str, rank: int, world: int, batch_size: int, columns=SEQUENCE_COLUMNS
) -> Iterator[pa.RecordBatch]:
    """Batches of ``split`` for one worker: batch i of the global sequence goes to worker i % world.

    Every worker walks the same files in the same order, so the shares are disjoint and complete.
    """
    fs, _ = _fs(info.root)
    i = 0
    for path in list_split_files(info, split):
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=list(columns)):
                if i % world == rank:
                    yield batch
                i += 1

