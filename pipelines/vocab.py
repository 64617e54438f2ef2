"""Domain and item vocabularies.

- ``domain_idx``: 1..D in sorted order of the named domains found in the input (0 = padding), so it is
  stable for a given set of domains, empty ones included.
- ``item_idx``: 1..N (0 = padding). Item identity is (domain, item_id). Items are numbered in the order
  (domain_idx, count descending, item_id): each domain's items occupy one contiguous range of item_idx,
  popular items first, which lets models restrict retrieval to a domain by slicing.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.storagelevel import StorageLevel

from pipelines.config import check_domain_name


def item_order() -> tuple[Column, ...]:
    """(domain_idx, count descending, item_id): a total order on items."""
    return (F.col("domain_idx").asc(), F.col("count").desc(), F.col("item_id").asc())


class VocabularyError(RuntimeError):
    """The distributed numbering came out inconsistent (e.g. after a lost cached partition)."""


def domain_index(domains: list[str]) -> dict[str, int]:
    """Named domain -> domain_idx (1-based, sorted by name)."""
    for d in domains:
        check_domain_name(d, where="domain")
    return {d: i for i, d in enumerate(sorted(set(domains)), start=1)}


def domain_index_frame(spark: SparkSession, index: dict[str, int]) -> DataFrame:
    return spark.createDataFrame(
        [(d, i) for d, i in sorted(index.items(), key=lambda kv: kv[1])], "domain string, domain_idx short"
    )


def with_global_index(df: DataFrame, order: tuple[Column, ...], name: str, start: int = 1) -> DataFrame:
    """Add ``name`` = rank of each row in ``order`` (a total order), counting from ``start``.

    Distributed: a range-partitioned sort, then per-partition row counts (one small row per partition on
    the driver) turn each row's position in its partition into a global rank. No single task sees all rows.
    """
    tagged = (
        df.orderBy(*order)
        .withColumn("_pid", F.spark_partition_id())
        .withColumn("_mid", F.monotonically_increasing_id())
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    counts = sorted((r["_pid"], r["count"]) for r in tagged.groupBy("_pid").count().collect())
    offsets: list[Column] = []
    acc = start
    for pid, n in counts:
        offsets += [F.lit(pid), F.lit(acc)]
        acc += n
    if not offsets:
        return tagged.withColumn(name, F.lit(None).cast("int")).drop("_pid", "_mid")
    offset_of = F.create_map(*offsets)
    # monotonically_increasing_id = partition id << 33 | position within the partition
    position = F.col("_mid") - F.shiftleft(F.col("_pid").cast("long"), 33)
    return tagged.withColumn(name, (offset_of[F.col("_pid")] + position).cast("int")).drop("_pid", "_mid")


def item_vocabulary(events: DataFrame, domains: DataFrame) -> DataFrame:
    """``item_idx, item_id, domain, domain_idx, count`` from events with ``domain, item_id``.

    ``count`` is the number of kept interactions with the item (over whole subsequences).
    """
    counts = events.groupBy("domain", "item_id").agg(F.count(F.lit(1)).alias("count"))
    with_domain = counts.join(F.broadcast(domains), "domain", "inner")
    indexed = with_global_index(with_domain, item_order(), "item_idx", start=1)
    return indexed.select(
        F.col("item_idx").cast("int"),
        F.col("item_id").cast("string"),
        F.col("domain").cast("string"),
        F.col("domain_idx").cast("short"),
        F.col("count").cast("long"),
    )


def check_item_index(items: DataFrame) -> int:
    """Verify item_idx is exactly 1..N; return N. Raises VocabularyError otherwise."""
    row = items.agg(
        F.count(F.lit(1)).alias("n"),
        F.countDistinct("item_idx").alias("distinct"),
        F.min("item_idx").alias("lo"),
        F.max("item_idx").alias("hi"),
    ).first()
    n = int(row["n"])
    if n and (row["distinct"] != n or row["lo"] != 1 or row["hi"] != n):
        raise VocabularyError(
            f"item_idx is not contiguous 1..{n}: {row['distinct']} distinct, range [{row['lo']}, {row['hi']}]"
        )
    return n
