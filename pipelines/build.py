"""The sequence build, stage by stage: read -> validate -> dedupe -> stitch/cut -> vocabularies -> split -> write.

Each stage is a pure DataFrame function in its own module; this module only wires them, counts what
flows between them, and publishes the result atomically (``pipelines.output``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window
from pyspark.storagelevel import StorageLevel

from pipelines import read, split, stitch, validate, vocab
from pipelines.config import DOMAIN_NAME_RE, DataConfig, check_domain_name, epoch_ms
from pipelines.fs import HadoopFS
from pipelines.output import AtomicOutput

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PERCENTILES = (0.5, 0.9, 0.99)
ITEMS_PER_FILE = 1_000_000
REJECTED_PER_FILE = 1_000_000
# Row-group byte limit: parquet-java's default, raised when rows_per_row_group rows of max_len items could
# exceed it (item_idx int32 + domain_idx int16 + timestamp int64 per item, with room to spare; ids per row).
DEFAULT_BLOCK_BYTES = 128 * 1024 * 1024
BYTES_PER_ITEM = 32
BYTES_PER_ROW = 512


class RejectedRowsError(ValueError):
    """Too many input rows are bad; nothing was written."""


class LedgerError(RuntimeError):
    """Counts do not add up: input != kept + rejected + duplicates + short. A bug, never silently ignored."""


@dataclass
class BuildResult:
    output: str
    manifest: dict[str, Any]


def _reference_ms(cfg: DataConfig, started: datetime) -> int:
    if cfg.reference_time is None:
        return int(started.timestamp() * 1000)
    return epoch_ms(cfg.reference_time)


def _check_rejected(parsed: DataFrame, by_reason: dict[str, int], input_rows: int, cfg: DataConfig) -> None:
    bad = {r: n for r, n in by_reason.items() if r not in validate.DELIBERATE_REASONS}
    n_bad = sum(bad.values())
    if input_rows == 0 or n_bad / input_rows <= cfg.max_rejected_fraction:
        return
    worst = sorted(bad.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    lines = [
        f"{n_bad} of {input_rows} input rows ({n_bad / input_rows:.2%}) are bad, above "
        f"max_rejected_fraction={cfg.max_rejected_fraction:.2%}; nothing was written. Worst reasons:"
    ]
    for reason, n in worst:
        lines.append(f"  {reason}: {n} rows, e.g.")
        examples = validate.rejected_rows(parsed).filter(F.col("reason") == reason).limit(3).collect()
        for ex in examples:
            if ex["malformed_record"] is not None:
                lines.append(f"    {ex['source_file']}: {ex['malformed_record']!r}")
            else:
                lines.append(
                    f"    {ex['source_file']}: user_id={ex['user_id']!r} item_id={ex['item_id']!r} "
                    f"timestamp={ex['timestamp']!r} domain={ex['raw_domain']!r}"
                )
        if reason == "malformed_record":
            lines.append(
                "    (records that do not split into the header's fields, or lines that are not JSON; a quoted "
                "CSV field holding a line break needs csv_multiline=true)"
            )
    raise RejectedRowsError("\n".join(lines))


def _place_in_files(
    spark: SparkSession, subsequences: DataFrame, n: int, cfg: DataConfig
) -> tuple[DataFrame, int, int]:
    """Add ``_file``: the split file of each row, so that every file but the last holds the same number of
    rows, a multiple of the row-group size. Returns (rows with ``_file``, files, row-group size).

    Rows are ordered by (bucket = hash of sequence_id mod ceil(n / rows_per_shard), sequence_id) and cut into
    consecutive files of ``rows_per_file`` rows; positions come from per-bucket ranks plus the preceding
    buckets' counts, so no step sees more than one bucket at a time. The result depends only on the set of
    sequence_ids and the config, not on partitioning. Then every row group of a split holds exactly the
    row-group size except the split's very last one, which is what makes petastorm's row-group sharding
    (group i to reader i mod N) give any N readers shares within one row group of each other.
    """
    buckets = max(1, math.ceil(n / cfg.rows_per_shard))
    share = max(1, math.ceil(n / buckets))
    group = min(cfg.rows_per_row_group, share)  # a row group never spans more than a file's share
    rows_per_file = math.ceil(share / group) * group
    files = max(1, math.ceil(n / rows_per_file))
    bucketed = subsequences.withColumn("_bucket", F.pmod(F.xxhash64("sequence_id"), F.lit(buckets)))
    counts = {int(r["_bucket"]): int(r["count"]) for r in bucketed.groupBy("_bucket").count().collect()}
    offsets, before = [], 0
    for b in range(buckets):
        offsets.append((b, before))
        before += counts.get(b, 0)
    offsets_df = spark.createDataFrame(offsets, "_bucket long, _offset long")
    rank = F.row_number().over(Window.partitionBy("_bucket").orderBy("sequence_id"))
    placed = (
        bucketed.join(F.broadcast(offsets_df), "_bucket")
        .withColumn("_rank", rank)
        .withColumn("_file", F.expr(f"(_offset + _rank - 1) div {rows_per_file}").cast("int"))
        .drop("_bucket", "_offset", "_rank")
    )
    return placed, files, group


def _write(df: DataFrame, path: str, files: int, rows_per_row_group: int, max_len: int) -> None:
    """Rows with ``_file`` (see `_place_in_files`) -> one Parquet file per ``_file``, sorted by sequence_id,
    in row groups of ``rows_per_row_group`` rows.

    Range partitioning on ``_file`` puts each file's rows in one task (should sampling ever put two values in
    one task, that file holds both, still a multiple of the row-group size but for the last). parquet-java
    ends a row group at the row count or at ``parquet.block.size`` bytes, whichever comes first: the byte
    limit is raised above what the longest rows could fill, so that the row count alone decides.
    """
    block_bytes = max(DEFAULT_BLOCK_BYTES, rows_per_row_group * (max_len * BYTES_PER_ITEM + BYTES_PER_ROW))
    (
        df.repartitionByRange(files, "_file")
        .sortWithinPartitions("sequence_id")
        .drop("_file")
        .write.mode("errorifexists")
        .option("parquet.block.row.count.limit", str(rows_per_row_group))
        .option("parquet.block.size", str(block_bytes))
        .parquet(path)
    )


def build_sequences(
    spark: SparkSession, input_path: str, output_path: str, cfg: DataConfig, force: bool = False
) -> BuildResult:
    """Run the whole build and publish OUT atomically; on any error OUT is left as it was."""
    started = datetime.now(UTC)
    t0 = time.monotonic()
    fs = HadoopFS(spark, output_path)
    out = AtomicOutput(fs, output_path, input_path=input_path, force=force)
    out.prepare()
    cached: list[DataFrame] = []
    try:
        manifest = _build(spark, input_path, out, cfg, started, cached)
        manifest["run"] = {
            "started_at": started.isoformat(),
            "duration_s": round(time.monotonic() - t0, 2),
            "spark_version": spark.version,
            "input": HadoopFS(spark, input_path).qualify(input_path),
            "output": out.output,
        }
        out.commit(manifest)
        return BuildResult(out.output, manifest)
    except BaseException:
        out.abort()
        raise
    finally:
        for df in cached:
            df.unpersist()


def _build(
    spark: SparkSession,
    input_path: str,
    out: AtomicOutput,
    cfg: DataConfig,
    started: datetime,
    cached: list[DataFrame],
) -> dict[str, Any]:
    def keep(df: DataFrame) -> DataFrame:
        cached.append(df.persist(StorageLevel.MEMORY_AND_DISK))
        return cached[-1]

    log.info("[1/6] reading %s", input_path)
    raw, report = read.read_logs(spark, input_path, cfg)
    assigned = None
    if cfg.split == "by_sequence":
        # Checked first (values, duplicates) so that a bad file fails before the expensive stages.
        assert cfg.split_file is not None  # DataConfig requires it with by_sequence
        log.info("[1/6] reading split_file %s", cfg.split_file)
        file_rows = read.read_split_file(spark, cfg.split_file)
        assigned = keep(split.assignments(file_rows, cfg.split_names, cfg.split_file))
    parsed = keep(validate.parse_events(raw, cfg, _reference_ms(cfg, started)))

    log.info("[2/6] validating rows")
    with read.read_failures(input_path):  # the first full scan of the input: unreadable files show up here
        by_reason_rows = parsed.groupBy("reject_reason").count().collect()
    counts_by_reason = {r["reject_reason"]: int(r["count"]) for r in by_reason_rows}
    input_rows = sum(counts_by_reason.values())
    valid_rows = counts_by_reason.pop(None, 0)
    rejected_total = sum(counts_by_reason.values())
    _check_rejected(parsed, counts_by_reason, input_rows, cfg)

    if cfg.layout == "per_domain":
        named = [cfg.named_domain(raw_d) for raw_d in report.domains]
        domain_names = sorted({d for d in named if d is not None})
    else:
        domain_names = sorted(
            r["domain"] for r in validate.valid_events(parsed).select("domain").distinct().collect()
        )
        bad_names = [d for d in domain_names if not DOMAIN_NAME_RE.match(d)]
        if bad_names:
            example = parsed.filter(F.col("domain") == bad_names[0]).select("source_file").first()
            check_domain_name(
                bad_names[0],
                where=f"{example['source_file']}: column {cfg.columns.domain!r} ({len(bad_names)} invalid name(s))",
            )
    domain_idx = vocab.domain_index(domain_names)
    domains_df = vocab.domain_index_frame(spark, domain_idx)

    log.info("[3/6] dropping duplicates, stitching and cutting histories (max_len=%d)", cfg.max_len)
    deduped = stitch.drop_exact_duplicates(validate.valid_events(parsed))
    chunked = keep(stitch.assign_chunks(deduped, cfg.max_len, cfg.min_len))
    by_kept = {r["kept"]: int(r["count"]) for r in chunked.groupBy("kept").count().collect()}
    kept_rows, short_rows = by_kept.get(True, 0), by_kept.get(False, 0)
    duplicates = valid_rows - kept_rows - short_rows
    if input_rows != kept_rows + rejected_total + duplicates + short_rows or duplicates < 0:
        raise LedgerError(
            f"input {input_rows} != kept {kept_rows} + rejected {rejected_total} + duplicates {duplicates} "
            f"+ short {short_rows}"
        )
    if kept_rows == 0:
        raise read.InputError(
            f"{input_path}: no interactions left after validation and min_len={cfg.min_len} "
            f"({input_rows} input rows, {rejected_total} rejected, {duplicates} duplicates, {short_rows} in short "
            f"subsequences)"
        )
    kept_events = chunked.filter(F.col("kept"))

    log.info("[4/6] numbering items")
    items = keep(vocab.item_vocabulary(kept_events, domains_df))
    num_items = vocab.check_item_index(items)
    indexed = kept_events.join(
        items.select("domain", "item_id", "item_idx", "domain_idx"), ["domain", "item_id"], "inner"
    )

    log.info("[5/6] building subsequences")
    subsequences = keep(stitch.build_subsequences(indexed))
    lengths = F.size("item_idx")
    stats = subsequences.agg(
        F.count(F.lit(1)).alias("subsequences"),
        F.countDistinct("user_id").alias("users"),
        F.min(lengths).alias("min"),
        F.max(lengths).alias("max"),
        F.avg(lengths).alias("mean"),
        F.sum(lengths).alias("total"),
        F.percentile(lengths, list(PERCENTILES)).alias("pct"),
    ).first()
    n_subsequences = int(stats["subsequences"])
    if int(stats["total"]) != kept_rows:
        raise LedgerError(f"subsequences hold {stats['total']} interactions, but {kept_rows} were kept")
    per_domain = {
        r["domain"]: r
        for r in items.groupBy("domain")
        .agg(
            F.count(F.lit(1)).alias("items"),
            F.sum("count").alias("interactions"),
            F.min("item_idx").alias("lo"),
            F.max("item_idx").alias("hi"),
        )
        .collect()
    }

    if assigned is not None:
        assert cfg.split_file is not None
        not_in_data = split.check_coverage(assigned, subsequences, cfg.split_file)
        frames = {name: keep(df) for name, df in split.by_sequence(subsequences, assigned).items()}
        rows = {name: frames[name].count() for name in split.SPLITS}
        if sum(rows.values()) != n_subsequences:
            raise LedgerError(
                f"by_sequence splits hold {sum(rows.values())} rows ({rows}), but there are {n_subsequences} "
                f"subsequences"
            )
        for name in split.SPLITS:
            if rows[name] == 0:
                log.warning(
                    "split %r is empty: %s assigns no user with a subsequence to it", name, cfg.split_file
                )
        split_info = {
            "protocol": cfg.split,
            "file": HadoopFS(spark, cfg.split_file).qualify(cfg.split_file),
            "rows": rows,
            "users_in_file_not_in_data": not_in_data,
        }
        # The splits hold different rows: files and row groups are laid out per split.
        layouts = {name: _place_in_files(spark, frames[name], rows[name], cfg) for name in split.SPLITS}
    else:
        placed, files, group = _place_in_files(spark, subsequences, n_subsequences, cfg)
        placed = keep(placed)
        n_placed = placed.count()
        if n_placed != n_subsequences:
            raise LedgerError(
                f"leave_one_out splits hold {n_placed} rows each, but there are {n_subsequences}"
            )
        rows = dict.fromkeys(split.SPLITS, n_placed)  # every subsequence in every split, laid out identically
        split_info = {"protocol": cfg.split, "rows": rows}
        frames = split.leave_one_out(placed)
        layouts = {name: (frames[name], files, group) for name in split.SPLITS}
    log.info("[6/6] %s split: %s rows", cfg.split, ", ".join(f"{k} {v:,}" for k, v in rows.items()))

    log.info("[6/6] writing splits, items and rejected rows to %s", out.staging)
    shards = {}
    for name, (df, files, group) in layouts.items():
        _write(df, out.path(name), files, group, cfg.max_len)
        shards[name] = sum(
            1 for f in out.fs.list_files(out.path(name), recursive=False) if f.endswith(".parquet")
        )
    items.repartitionByRange(max(1, math.ceil(num_items / ITEMS_PER_FILE)), "item_idx").sortWithinPartitions(
        "item_idx"
    ).write.parquet(out.path("items"))
    validate.rejected_rows(parsed).coalesce(
        max(1, math.ceil(rejected_total / REJECTED_PER_FILE))
    ).write.parquet(out.path("rejected"))

    domains_out = []
    for name, idx in sorted(domain_idx.items(), key=lambda kv: kv[1]):
        r = per_domain.get(name)
        domains_out.append(
            {
                "domain": name,
                "domain_idx": idx,
                "items": int(r["items"]) if r else 0,
                "interactions": int(r["interactions"]) if r else 0,
                "item_idx_range": [int(r["lo"]), int(r["hi"])] if r else None,
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "config": cfg.to_dict(),
        "timestamp_unit": "ordinal" if cfg.timestamp_unit == "ordinal" else "ms",
        "counts": {
            "input_rows": input_rows,
            "rejected_rows": rejected_total,
            "rejected_by_reason": dict(sorted(counts_by_reason.items())),
            "duplicates_dropped": duplicates,
            "interactions_kept": kept_rows,
            "interactions_in_short_subsequences": short_rows,
            "users": int(stats["users"]),
            "subsequences": n_subsequences,
            "items": num_items,
        },
        "domains": domains_out,
        "empty_domains": sorted(report.empty_domains),
        "sequence_length": {
            "min": int(stats["min"]),
            "max": int(stats["max"]),
            "mean": round(float(stats["mean"]), 3),
            **{f"p{round(q * 100)}": float(v) for q, v in zip(PERCENTILES, stats["pct"], strict=True)},
        },
        "shards": {name: shards[name] for name in ("train", "valid", "test")},
        "split": split_info,
    }
