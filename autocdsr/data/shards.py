"""Reading the sequence builder's output (docs/data-contract.md) for training, evaluation and serving.

- ``open_dataset`` checks the folder is a complete result of a known schema version and loads the
  vocabularies (items, domains) that size the model.
- ``list_arrays`` turns an Arrow list column into per-row numpy views for `autocdsr.data.batching`.
- ``iter_eval_rows`` gives each worker a disjoint share of valid/test rows whose union is every row,
  exactly once (Ray Data's ``streaming_split(equal=True)`` may drop rows to equalise shards: fine for
  training, not for metrics).
- ``check_files`` checks the Parquet files against the manifest (file count and rows per split, every
  footer readable) and records a fingerprint of every file a training job reads (relative path, size,
  modification time); ``verify_unchanged`` compares the folder with it and names what changed. Training
  checks before any worker starts, and again at every pass start and every evaluation inside the workers.

Paths may be local or any URI pyarrow's filesystems understand (``s3://``, ``gs://``, ``hdfs://``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SUPPORTED_SCHEMA_VERSIONS = (1,)
SEQUENCE_COLUMNS = ("sequence_id", "item_idx", "domain_idx")
SPLITS = ("train", "valid", "test")
# What training reads: the splits, the item vocabulary and the manifest (rejected/ is never read).
FINGERPRINTED = (*SPLITS, "items")
MARKER_FILES = ("manifest.json", "_SUCCESS")

# relative path -> (size in bytes, modification time in ns or None where the filesystem has none)
Fingerprint = Mapping[str, tuple[int, int | None]]


class DatasetError(ValueError):
    """The data folder is not a usable sequence-builder output; the message names the path and problem."""


class DataChangedError(DatasetError):
    """A data file changed, appeared or disappeared while a job was using the folder; the message names it."""


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
    # The files as `check_files` found them when the job started (None: not checked, nothing to verify).
    files: Fingerprint | None = None

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
    if fs.get_file_info(f"{base}/manifest.json").type == pafs.FileType.NotFound:
        raise DatasetError(
            f"{root} has no manifest.json: it is not an output folder of jobs/build_sequences.py"
        )
    raw = _read_text(fs, f"{base}/manifest.json")
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{root}/manifest.json is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise DatasetError(f"{root}/manifest.json: expected a JSON object, got {type(manifest).__name__}")
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


# ----------------------------------------------------------------------------- files and fingerprints
def _parquet_files(fs: pafs.FileSystem, base: str, sub: str) -> list[pafs.FileInfo]:
    """The Parquet files under ``base/sub`` (recursively, as Ray Data and `list_split_files` read them)."""
    if fs.get_file_info(f"{base}/{sub}").type != pafs.FileType.Directory:
        return []
    selector = pafs.FileSelector(f"{base}/{sub}", recursive=True)
    return sorted(
        (f for f in fs.get_file_info(selector) if f.is_file and f.path.endswith(".parquet")),
        key=lambda f: f.path,
    )


def fingerprint(root: str) -> dict[str, tuple[int, int | None]]:
    """Relative path -> (size, mtime in ns) of the manifest, _SUCCESS and every Parquet file training reads."""
    fs, base = _fs(root)
    out: dict[str, tuple[int, int | None]] = {}
    for name in MARKER_FILES:
        f = fs.get_file_info(f"{base}/{name}")
        if f.is_file:
            out[name] = (int(f.size or 0), f.mtime_ns)
    for sub in FINGERPRINTED:
        for f in _parquet_files(fs, base, sub):
            out[f.path[len(base) + 1 :]] = (int(f.size or 0), f.mtime_ns)
    return out


def check_files(info: DatasetInfo) -> DatasetInfo:
    """Check the Parquet files against the manifest and return ``info`` with their fingerprint.

    Per split (train, valid, test): the number of Parquet files equals the manifest's ``shards`` count,
    every file's footer reads, and the files' rows add up to the manifest's row count (``split.rows``, or
    ``counts.subsequences`` under leave_one_out). Each failure raises `DatasetError` naming the file or
    the split folder. Reads footers only (one small read per file), never the data.
    """
    fs, base = _fs(info.root)
    stamps = fingerprint(info.root)
    for split in SPLITS:
        files = _parquet_files(fs, base, split)
        names = [f.path[len(base) + 1 :] for f in files]
        expected_files = info.manifest.get("shards", {}).get(split)
        if expected_files is not None and len(files) != int(expected_files):
            listed = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise DatasetError(
                f"{info.root}/{split}: manifest.json records {expected_files} Parquet file(s), found "
                f"{len(files)} ({listed or 'none'}): files were added or removed after the build; "
                "rebuild the data or restore the folder"
            )
        rows = 0
        per_file = []
        for f, name in zip(files, names, strict=True):
            try:
                with fs.open_input_file(f.path) as handle:
                    n = pq.ParquetFile(handle).metadata.num_rows
            except (OSError, pa.ArrowException) as e:
                raise DatasetError(
                    f"{info.root}/{name}: not a readable Parquet file ({f.size} bytes): truncated or being "
                    f"rewritten? ({e})"
                ) from e
            rows += n
            per_file.append(f"{name}: {n}")
        expected_rows = info.split_rows(split)
        if rows != expected_rows:
            detail = "; ".join(per_file[:10]) + ("; ..." if len(per_file) > 10 else "")
            raise DatasetError(
                f"{info.root}/{split}: manifest.json records {expected_rows} rows, the Parquet files hold "
                f"{rows} ({detail}): a file was replaced, truncated or appended to after the build"
            )
    return replace(info, files=stamps)


def describe_changes(before: Fingerprint, after: Fingerprint) -> list[str]:
    """One line per file that appeared, disappeared, or changed size or modification time."""
    lines = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if old is None:
            lines.append(f"{name} appeared ({new[0]} bytes)")  # type: ignore[index]
        elif new is None:
            lines.append(f"{name} disappeared (was {old[0]} bytes)")
        elif old[0] != new[0]:
            lines.append(f"{name} changed size: {old[0]} -> {new[0]} bytes")
        else:
            lines.append(f"{name} was rewritten (modification time {old[1]} -> {new[1]} ns, same size)")
    return lines


def verify_unchanged(info: DatasetInfo) -> None:
    """Raise `DataChangedError` naming every file that differs from ``info.files`` (no-op without one)."""
    if info.files is None:
        return
    changes = describe_changes(info.files, fingerprint(info.root))
    if changes:
        shown = "; ".join(changes[:10]) + (f"; and {len(changes) - 10} more" if len(changes) > 10 else "")
        raise DataChangedError(
            f"{info.root} changed while training was using it: {shown}. Stopping: batches and metrics "
            "would mix two versions of the data. Train on a folder no job rewrites (jobs/build_sequences.py "
            "publishes each build as a new folder when given a new --output)"
        )
